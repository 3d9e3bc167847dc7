"""fedspatial: federated learning for spatial omics on Flower.

The design card keeps ``server/``, ``client/``, ``shared/`` and ``strategies/`` as
top-level folders, but they import as ``fedspatial.<part>`` so that installing the
project never shadows generic names such as ``server`` or ``shared``. Each part is a
real sub-package of this one:

- in a source checkout, ``fedspatial/<part>`` is a symbolic link to ``../<part>``, so
  Python, mypy and code-structure tools resolve ``fedspatial.server.app`` to
  ``server/app.py`` with no import hook;
- a wheel or an editable install maps the folders into this package
  (``[tool.setuptools.package-dir]``);
- a Flower App bundle (``flwr build``/``flwr run``) leaves symbolic links out, so in an
  unpacked bundle the parts sit beside this folder and the package path is extended to
  them (the one case that needs it; ``tests/test_packaging.py`` covers all three).
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

_here = Path(__file__).resolve().parent
if not (_here / "server" / "__init__.py").is_file() and (_here.parent / "server" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # type: ignore[name-defined]  # unpacked Flower App bundle
