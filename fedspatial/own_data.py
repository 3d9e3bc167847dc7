"""A user's own data on the command line: site paths, manifests and pre-flight refusals.

``fedspatial simulate --data a/ b/ c.h5ad``, ``fedspatial manifest a/ b/ --out F`` and
``fedspatial inspect a/ b/`` (or ``inspect federation.json``) go through here. Nothing
here starts Ray or Flower, and nothing here writes next to the inputs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedspatial.shared.data.preflight import Finding, Preflight, Settings, run_preflight

logger = logging.getLogger(__name__)

_SUFFIXES = (".h5ad", ".zarr")


class PreflightRefused(Exception):
    """The data (or the config against the data) fails pre-flight; ``str()`` is the block to print."""


def site_name_of(path: Path) -> str:
    """A site's default name: its folder's name, or the file/store name without suffix."""
    name = path.resolve().name if path.name in ("", ".", "..") else path.name
    if name == "outs":  # a Space Ranger / Xenium Ranger outs/ folder: name it after its run
        name = path.resolve().parent.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def site_inputs(items: Sequence[str]) -> list[tuple[str, str]]:
    """``PATH`` or ``NAME=PATH`` arguments -> ``(site name, absolute path)``, in order."""
    sites = []
    for item in items:
        name, sep, rest = item.partition("=")
        if sep and name and "/" not in name and not Path(item).exists():
            path = Path(rest).expanduser()
        else:
            name, path = "", Path(item).expanduser()
        sites.append((name or site_name_of(path), str(path.absolute())))
    return sites


def manifest_dict(sites: Sequence[tuple[str, str]], *, relative_to: Path | None = None) -> dict[str, Any]:
    """The manifest's short form; paths relative to ``relative_to`` when given (portable)."""
    entries = []
    for name, path in sites:
        shown = os.path.relpath(path, relative_to) if relative_to is not None else path
        entries.append({"name": name, "data-path": shown})
    return {"sites": entries}


def sites_of_manifest(path: str | Path) -> list[tuple[str, str]]:
    from fedspatial.shared.data.manifest import read_manifest

    manifest = read_manifest(path)
    return [(s["name"], s["data-path"]) for node in manifest["nodes"] for s in node["sites"]]


def is_manifest_path(path: str) -> bool:
    return Path(path).suffix.lower() == ".json"


def sites_of_paths(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Sites from ``inspect``'s arguments: one manifest (.json), or site paths."""
    if len(paths) == 1 and is_manifest_path(paths[0]):
        return sites_of_manifest(paths[0])
    manifests = [p for p in paths if is_manifest_path(p)]
    if manifests:
        from fedspatial.shared.data.manifest import ManifestError

        raise ManifestError(f"give either one manifest or site paths, not both ({', '.join(manifests)})")
    return site_inputs(paths)


def write_manifest(paths: Sequence[str], out: Path, *, overwrite: bool = False) -> Path:
    """``fedspatial manifest``: one site per path, paths relative to the manifest's folder."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it, or another --out")
    sites = site_inputs(paths)
    missing = [p for _, p in sites if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}. Fix: give each site's folder, .h5ad "
                                "file or .zarr store")
    names = [n for n, _ in sites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PreflightRefused(
            f"site name(s) {', '.join(map(repr, dup))} would be used twice (same folder name). Fix: name them "
            "yourself: fedspatial manifest hospital_a=PATH hospital_b=PATH ...")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest_dict(sites, relative_to=out.parent.resolve()), indent=2) + "\n")
    return out


def refusal_block(findings: Sequence[Finding], *, what: str, recheck: str) -> str:
    errors = [f for f in findings if not f.allowable]
    warnings = [f for f in findings if f.allowable]
    lines = [f"{what} stopped before starting: {len(findings)} problem(s) in the data "
             "(nothing ran, no results folder was written)."]
    lines += [f"  - {f.message}" for f in errors]
    lines += [f"  - [{f.kind}] {f.message} (to go ahead anyway: --allow {f.kind})" for f in warnings]
    lines.append(f"The full cross-site report: {recheck}")
    return "\n".join(lines)


def check_before_run(
    sites: Sequence[tuple[str, str]], settings: Settings, *, allow: Iterable[str] = (), recheck: str
) -> Preflight:
    """Run pre-flight; raise :class:`PreflightRefused` with the block to print, or log the
    allowed warnings and return the report."""
    report = run_preflight(sites, settings)
    allowed = set(allow)
    refused = report.refusals(allowed)
    if refused:
        raise PreflightRefused(refusal_block(refused, what="fedspatial simulate", recheck=recheck))
    for finding in report.warnings:
        logger.warning("allowed (--allow %s): %s", finding.kind, finding.message)
    logger.info("pre-flight: %d site(s), %d cells, %d shared features: OK", len(report.sites),
                sum(s.n_cells for s in report.sites), len(report.shared))
    return report


def recheck_command(
    config: str | None, data: Sequence[str] | None, manifest: str, sets: Sequence[str] = ()
) -> str:
    cfg = f" --config {config}" if config else ""
    cfg += "".join(f" --set {item}" for item in sets) if config else ""
    where = " ".join(data) if data else manifest
    return f"fedspatial inspect{cfg} {where}"
