"""fedspatial: federated learning for spatial omics on Flower.

The project keeps the design card's top-level folders (``server/``, ``client/``,
``shared/``, ``strategies/``) but imports them as ``fedspatial.<part>`` so that an
install never shadows generic names such as ``server`` or ``shared``. A wheel maps the
folders into this package (see ``[tool.setuptools.package-dir]``); in a source checkout
or an unpacked Flower App bundle the folders sit beside this one, so the package path
is extended to the project root.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

_project_root = Path(__file__).resolve().parent.parent
if (_project_root / "pyproject.toml").is_file() and (_project_root / "shared" / "__init__.py").is_file():
    __path__.append(str(_project_root))  # type: ignore[name-defined]
