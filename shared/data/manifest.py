"""A simulated federation's manifest: which sites (and their data) each SuperNode holds.

Format (JSON)::

    {"nodes": [{"name": "hospital_a", "sites": [{"name": "hospital_a", "data-path": "a/"}]}]}

or the short form ``{"sites": [{"name", "data-path"}]}`` (one site per node, as
``fedspatial manifest`` and the synthetic federation write it).
A site may carry a ``policy``: its site policy, a TOML file or an inline table
(:mod:`fedspatial.shared.privacy.policy`). Relative data and policy paths resolve against
the manifest's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedspatial.shared.storage.hints import did_you_mean

EXAMPLE = '{"sites": [{"name": "hospital_a", "data-path": "hospital_a/"}]}'


class ManifestError(ValueError):
    """The manifest is missing, not JSON, or not shaped as documented."""


def _fail(path: Path, what: str) -> ManifestError:
    return ManifestError(
        f"federation manifest {path}: {what}. Fix: write it as {EXAMPLE} "
        "(`fedspatial manifest SITE_FOLDER ... --out federation.json` writes one)"
    )


def _check_site(path: Path, where: str, site: Any) -> None:
    if not isinstance(site, dict):
        raise _fail(path, f"{where} is {type(site).__name__}, expected an object with name and data-path")
    for key in ("name", "data-path"):
        if not isinstance(site.get(key), str) or not site[key].strip():
            raise _fail(path, f"{where} has no {key!r} (a non-empty string)")


def _check_shape(path: Path, raw: Any) -> dict[str, Any]:
    """The manifest in its ``nodes`` form, or ManifestError naming what is wrong."""
    if not isinstance(raw, dict):
        raise _fail(path, f"the top level is a JSON {type(raw).__name__}, expected an object")
    if "nodes" not in raw and "sites" in raw:
        if not isinstance(raw["sites"], list):
            raise _fail(path, "'sites' must be a list")
        for i, site in enumerate(raw["sites"]):
            _check_site(path, f"sites[{i}]", site)
        raw = {**raw, "nodes": [{"name": s["name"], "sites": [s]} for s in raw["sites"]]}
    nodes = raw.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise _fail(path, "it lists no sites ('sites' or 'nodes' missing or empty)")
    seen: dict[str, str] = {}
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("sites"), list) or not node["sites"]:
            raise _fail(path, f"nodes[{i}] must be an object with a non-empty 'sites' list")
        for j, site in enumerate(node["sites"]):
            where = f"nodes[{i}].sites[{j}]"
            _check_site(path, where, site)
            if site["name"] in seen:
                raise ManifestError(
                    f"federation manifest {path}: site name {site['name']!r} is used twice "
                    f"({seen[site['name']]} and {where}); two sites would share one results folder. "
                    "Fix: give every site a unique name"
                )
            seen[site["name"]] = where
    return raw


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read a manifest: ``{"nodes": [{"name", "sites": [{"name", "data-path"}]}]}``, or the
    short form ``{"sites": [{"name", "data-path"}]}`` (one site per node).

    Raises
    ------
    ManifestError
        One line naming the file, what is wrong and the fix: missing file, bad JSON,
        wrong shape, a site without name or data-path, a site name used twice.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(
            f"federation manifest {path} does not exist{did_you_mean(path)}. Fix: give the federation's "
            "manifest, write one with `fedspatial manifest SITE_FOLDER ...`, or give the sites with `--data`"
        ) from None
    except IsADirectoryError:
        raise ManifestError(
            f"federation manifest {path} is a folder; give the manifest's .json file, or "
            f"the site folders themselves (`fedspatial simulate CONFIG --data {path}/SITE ...`)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(
            f"federation manifest {path} is not valid JSON: {err}. Fix the file there (`python -m "
            f"json.tool {path}` shows the first error), or write a new one with `fedspatial manifest`"
        ) from None
    raw = _check_shape(path, raw)
    base = path.parent
    for node in raw["nodes"]:
        for site in node["sites"]:
            p = Path(site["data-path"]).expanduser()
            site["data-path"] = str(p if p.is_absolute() else (base / p).resolve())
        for entry in node["sites"]:  # a site policy file, like the data, relative to the manifest
            if isinstance(entry.get("policy"), str):
                p = Path(entry["policy"]).expanduser()
                entry["policy"] = str(p if p.is_absolute() else (base / p).resolve())
    return raw
