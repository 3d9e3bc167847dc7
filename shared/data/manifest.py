"""A simulated federation's manifest: which sites (and their data) each SuperNode holds.

Format (JSON)::

    {"nodes": [{"name": "hospital_a", "sites": [{"name": "hospital_a", "data-path": "a/"}]}]}

or a synthetic federation's ``{"sites": [{"name", "data-path"}]}`` (one site per node).
A site may carry a ``policy``: its site policy, a TOML file or an inline table
(:mod:`fedspatial.shared.privacy.policy`). Relative data and policy paths resolve against
the manifest's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ManifestError(ValueError):
    """The manifest is missing, not JSON, or lists no nodes."""


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read a manifest: ``{"nodes": [{"name", "sites": [{"name", "data-path"}]}]}``, or a
    synthetic federation's ``{"sites": [{"name", "data-path"}]}`` (one site per node)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"federation manifest {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"federation manifest {path} is not valid JSON: {err}") from None
    if "nodes" not in raw and "sites" in raw:
        raw = {"nodes": [{"name": s["name"], "sites": [s]} for s in raw["sites"]]}
    if not raw.get("nodes"):
        raise ManifestError(f"federation manifest {path} lists no nodes")
    base = path.parent
    for node in raw["nodes"]:
        for site in node["sites"]:
            p = Path(site["data-path"])
            site["data-path"] = str(p if p.is_absolute() else (base / p).resolve())
        for entry in node["sites"]:  # a site policy file, like the data, relative to the manifest
            if isinstance(entry.get("policy"), str):
                p = Path(entry["policy"]).expanduser()
                entry["policy"] = str(p if p.is_absolute() else (base / p).resolve())
    return raw
