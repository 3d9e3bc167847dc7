"""A newcomer's first hour (issue 19): bad inputs, and what a first run prints.

Every row runs the real command line (``fedspatial simulate`` / ``inspect`` / ``submit`` /
``client``) in a subprocess, as a user would type it, from a fresh temporary folder that
holds only that case's small synthetic data (three sites of one 30-40-cell section, 30
features; one site broken the case's way) and config. For each kind of bad input it
records the exit code, the message (the first error line, or for a refusal block its
first problem; paths relative to the case's folder), the seconds from start to exit
(time to the message), whether a traceback appeared, whether the input files are
unchanged (SHA-256 before and after), whether anything new was left in the folder (a
results folder), and whether the output names a fix.

Then the default 2-round 3-site run, ``fedspatial simulate configs/demo.yaml --set
training.num-rounds=2`` (the built-in three-hospital demo, its default modes), in a fresh
folder with stdout and stderr on one pipe (no terminal), and the same with ``-v``: lines
printed against the target of at most 40 without ``-v``, and wall seconds.

Writes ``benchmarks/results/newcomer.{json,md}`` (about 7 minutes on 2 idle cores; exit status 1 when a
row is not clear or the run misses the target)::

    python benchmarks/newcomer.py                   # every kind and both runs
    python benchmarks/newcomer.py --only "truncated file" --no-run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from provenance import ROOT, provenance  # benchmarks/provenance.py

log = logging.getLogger("newcomer")
TARGET_LINES = 40
RUN_ARGS = ["simulate", "configs/demo.yaml", "--set", "training.num-rounds=2"]
CASE_TIMEOUT_S = 300
RUN_TIMEOUT_S = 600
SITES = ("hospital_a", "hospital_b", "hospital_c")
HUMAN = [f"GENE{i}A" for i in range(30)]  # upper-case symbols
MOUSE = [f"Gene{i}a" for i in range(30)]  # capitalized symbols
CONFIG = {  # small and quick; every case but the config ones passes with it on good data
    "run-name": "t", "results-dir": "results",
    "features": {"n-top-features": 30}, "clustering": {"n-domains": 3},
    "training": {"num-rounds": 1}, "simulation": {"modes": ["federated"]},
}

Sites = dict[str, Any]  # site name -> AnnData
Builder = Callable[[Path, Sites], list[str]]  # (case folder, good sites) -> argv after `fedspatial`


# ------------------------------------------------------------------ inputs


def _write_sites(work: Path, sites: Sites) -> list[str]:
    """One folder per site under ``data/``; their paths relative to ``work``."""
    paths = []
    for name, adata in sites.items():
        (work / "data" / name).mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(work / "data" / name / f"{name}_s1.h5ad")
        paths.append(f"data/{name}")
    return paths


def _write_config(work: Path, **sections: dict[str, Any]) -> str:
    raw = json.loads(json.dumps(CONFIG))
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    (work / "config.yaml").write_text(json.dumps(raw, indent=2) + "\n")  # YAML is a superset of JSON
    return "config.yaml"


def _copy(sites: Sites) -> Sites:
    return {k: v.copy() for k, v in sites.items()}


def _on_b(fn: Callable[[Any], Any]) -> Callable[[Sites], Sites]:
    """Break hospital_b's section with ``fn`` (in place, or return the new AnnData)."""

    def mutate(sites: Sites) -> Sites:
        sites = _copy(sites)
        changed = fn(sites["hospital_b"])
        if changed is not None:
            sites["hospital_b"] = changed
        return sites

    return mutate


def _renamed(adata: Any, names: list[str]) -> Any:
    adata.var_names = names[: adata.n_vars]
    return adata


def _dense(adata: Any) -> np.ndarray:
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    return np.asarray(x, dtype=np.float32)


def _set_x(adata: Any, fn: Callable[[np.ndarray], np.ndarray | None]) -> None:
    x = _dense(adata)
    y = fn(x)
    adata.X = x if y is None else y


def _nan_coords(a: Any) -> None:
    a.obsm["spatial"] = np.asarray(a.obsm["spatial"], dtype=float)
    a.obsm["spatial"][3] = np.nan


def _negative(x: np.ndarray) -> None:
    x[0, 0] = -2.0


def _nan_x(x: np.ndarray) -> None:
    x[1, 1] = np.nan


def _scaled(a: Any) -> None:
    a.X = np.log1p(_dense(a)) * 1.37 + 0.01


def _scaled_with_layer(a: Any) -> None:
    a.layers["counts"] = a.X.copy()
    _scaled(a)


def _cell_classes(a: Any) -> None:
    import pandas as pd

    a.obs["domain"] = pd.Categorical(np.where(np.arange(a.n_obs) % 2, "Neuron", "Astrocyte"))


def _mouse_and_human(sites: Sites) -> Sites:
    """Human upper-case symbols at two sites; hospital_b mouse symbols, 5 homonyms."""
    return {k: _renamed(v.copy(), HUMAN if k != "hospital_b" else MOUSE[:25] + HUMAN[25:]) for k, v in sites.items()}


def _data_case(mutate: Callable[[Sites], Sites] | None, *extra: str) -> Builder:
    """``fedspatial simulate config.yaml --data data/hospital_a ... [extra]`` on broken data."""

    def build(work: Path, sites: Sites) -> list[str]:
        paths = _write_sites(work, mutate(sites) if mutate else sites)
        return ["simulate", _write_config(work), "--data", *paths, *extra]

    return build


def _path_case(make: Callable[[Path], str]) -> Builder:
    """Good sites plus one more site argument (``make(data folder)`` writes it)."""

    def build(work: Path, sites: Sites) -> list[str]:
        paths = _write_sites(work, sites)
        return ["simulate", _write_config(work), "--data", *paths, make(work / "data")]

    return build


def _truncated(data: Path) -> str:
    (data / "cut").mkdir()
    good = (data / "hospital_a" / "hospital_a_s1.h5ad").read_bytes()
    (data / "cut" / "cut_s1.h5ad").write_bytes(good[: len(good) // 2])
    return "data/cut"


def _vendor(name: str, marker: str) -> Callable[[Path], str]:
    def make(data: Path) -> str:
        (data / name / marker).parent.mkdir(parents=True, exist_ok=True)
        (data / name / marker).write_text("x\n")
        return f"data/{name}"

    return make


def _empty_folder(data: Path) -> str:
    (data / "empty").mkdir()
    return "data/empty"


def _csv(data: Path) -> str:
    (data / "cells.csv").write_text("x,y,gene\n1,2,3\n")
    return "data/cells.csv"


def _spatialdata_without_table(data: Path) -> str:
    """A SpatialData store holding spot shapes but no expression table."""
    import geopandas as gpd  # type: ignore[import-untyped,import-not-found,unused-ignore]
    import spatialdata  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from shapely.geometry import Point  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from spatialdata.models import ShapesModel  # type: ignore[import-untyped,import-not-found,unused-ignore]

    spots = gpd.GeoDataFrame(geometry=[Point(i, i) for i in range(10)])
    spots["radius"] = 1.0
    (data / "sd_site").mkdir()
    spatialdata.SpatialData(shapes={"spots": ShapesModel.parse(spots)}).write(data / "sd_site" / "section.zarr")
    return "data/sd_site"


def _empty_zarr(data: Path) -> str:
    (data / "zarr_site" / "section.zarr").mkdir(parents=True)
    return "data/zarr_site"


def _manifest_case(text: str | None) -> Builder:
    """``fedspatial simulate config.yaml`` whose ``data.manifest`` is ``data/federation.json``
    holding ``text`` (None: the manifest named does not exist)."""

    def build(work: Path, sites: Sites) -> list[str]:
        _write_sites(work, sites)
        if text is None:
            return ["simulate", _write_config(work, data={"manifest": "data/federaton.json"})]
        (work / "data" / "federation.json").write_text(text)
        return ["simulate", _write_config(work, data={"manifest": "data/federation.json"})]

    return build


def _ca_certificate(path: Path) -> None:
    """A self-signed CA certificate valid now (what deploy/gen-certs.sh gives a hospital)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "newcomer benchmark CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _closed_port() -> int:
    from fedspatial.deployment.network import free_loopback_ports

    return free_loopback_ports(1)[0]


def _submit_no_connection(work: Path, sites: Sites) -> list[str]:
    return ["submit", _write_config(work)]  # HOME has no ~/.flwr/config.toml


def _submit_unreachable(work: Path, sites: Sites) -> list[str]:
    _ca_certificate(work / "ca.crt")
    return ["submit", _write_config(work), "--superlink", f"127.0.0.1:{_closed_port()}", "--ca-cert", "ca.crt"]


def _client_bad_data(work: Path, sites: Sites) -> list[str]:
    from fedspatial.deployment.certificates import generate_keypair

    _write_sites(work, _on_b(_nan_coords)(sites))
    _ca_certificate(work / "ca.crt")
    generate_keypair(work / "keys" / "hospital_b.key", comment="hospital_b")
    return ["client", "--superlink", f"127.0.0.1:{_closed_port()}", "--data-path", "data/hospital_b",
            "--ca-cert", "ca.crt", "--auth-key", "keys/hospital_b.key"]


def _existing_run(work: Path, sites: Sites) -> list[str]:
    paths = _write_sites(work, sites)
    (work / "results" / "t" / "federated").mkdir(parents=True)
    (work / "results" / "t" / "federated" / "metrics.json").write_text("{}\n")
    return ["simulate", _write_config(work), "--data", *paths]


def _inspect(mutate: Callable[[Sites], Sites] | None, extra: Callable[[Path], str] | None = None) -> Builder:
    def build(work: Path, sites: Sites) -> list[str]:
        paths = _write_sites(work, mutate(sites) if mutate else sites)
        return ["inspect", *paths, *([extra(work / "data")] if extra else [])]

    return build


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    build: Builder
    expect: str  # text the message should hold
    needs: str = ""  # an optional package the builder imports


CASES = [
    # a site's data, `fedspatial simulate --data` (hospital_b broken)
    Case("missing coordinates", _data_case(_on_b(lambda a: a.obsm.__delitem__("spatial"))), "obsm['spatial'] is missing"),
    Case("NaN coordinates", _data_case(_on_b(_nan_coords)), "NaN or infinite coordinates"),
    Case("coordinates with one column", _data_case(_on_b(lambda a: a.obsm.__setitem__(
        "spatial", np.asarray(a.obsm["spatial"])[:, :1]))), "has shape"),
    Case("text coordinates", _data_case(_on_b(lambda a: a.obsm.__setitem__(
        "spatial", np.asarray(a.obsm["spatial"]).astype(str)))), "non-numeric dtype"),
    Case("negative counts", _data_case(_on_b(lambda a: _set_x(a, _negative))), "negative values"),
    Case("NaN in X", _data_case(_on_b(lambda a: _set_x(a, _nan_x))), "NaN"),
    Case("duplicate feature names", _data_case(_on_b(lambda a: setattr(
        a, "var_names", ["F0000"] * 2 + list(a.var_names[2:])))), "duplicated name"),
    Case("empty section (0 cells)", _data_case(_on_b(lambda a: a[:0].copy())), "the section is empty"),
    Case("non-count X", _data_case(_on_b(_scaled)), "[non-counts]"),
    Case("non-count X with a counts layer", _data_case(_on_b(_scaled_with_layer)), "adata.layers['counts']"),
    Case("all-zero section", _data_case(_on_b(lambda a: setattr(a, "X", np.zeros(a.shape, np.float32)))),
         "[zero-section]"),
    Case("one-cell section", _data_case(_on_b(lambda a: a[:1].copy())), "[tiny-section]"),
    Case("n-neighbors larger than a section", _data_case(_on_b(lambda a: a[:8].copy()), "--set",
                                                          "neighbors.n-neighbors=10"), "neighbors.n-neighbors"),
    Case("identical coordinates", _data_case(_on_b(lambda a: a.obsm.__setitem__(
        "spatial", np.zeros((a.n_obs, 2))))), "[same-coordinates]"),
    Case("mixed label schemes", _data_case(_on_b(_cell_classes)), "[label-schemes]"),
    Case("mouse and human panels", _data_case(_mouse_and_human), "[mixed-species]"),
    Case("few shared features", _data_case(_on_b(lambda a: _renamed(a, [*map(str, a.var_names[:10]),
                                                                         *MOUSE[10:]]))), "[low-overlap]"),
    Case("no shared feature", _data_case(_on_b(lambda a: _renamed(a, [f"X{i}" for i in range(30)]))),
         "share no feature"),
    Case("label key missing everywhere", _data_case(None, "--set", "data.label-key=celltype"), "[no-labels]"),
    Case("n-domains larger than a site's cells", _data_case(
        _on_b(lambda a: a[:12].copy()), "--set", "clustering.n-domains=15", "--set",
        "simulation.modes=[federated,local]", "--allow", "tiny-section"), "clustering.n-domains is 15"),
    Case("n-domains larger than all cells", _data_case(None, "--set", "clustering.n-domains=500"),
         "clustering.n-domains is 500"),
    Case("n-pcs larger than n-top-features", _data_case(None, "--set", "features.n-pcs=50"), "features.n-pcs"),
    Case("n-pcs larger than the shared genes", _data_case(None, "--set", "features.n-top-features=300", "--set",
                                                          "features.n-pcs=50"), "features.n-pcs is 50"),
    Case("feature-key column missing", _data_case(None, "--set", "data.feature-key=gene_ids"), "var['gene_ids']"),
    # site paths given to --data
    Case("missing site folder", _path_case(lambda d: "data/nowhere"), "no such file or folder"),
    Case("empty site folder", _path_case(_empty_folder), "holds no .h5ad files"),
    Case("CSV instead of .h5ad", _path_case(_csv), "not a .h5ad file"),
    Case("truncated file", _path_case(_truncated), "truncated"),
    Case("Space Ranger folder", _path_case(_vendor("visium", "spatial/tissue_positions.csv")), "Space Ranger"),
    Case("Xenium folder", _path_case(_vendor("xenium", "experiment.xenium")), "Xenium"),
    Case("SpatialData store without a table", _path_case(_spatialdata_without_table), "has no table",
         needs="spatialdata"),
    Case("empty .zarr folder", _path_case(_empty_zarr), "section.zarr"),
    Case("duplicate site names (--data)", _path_case(lambda d: "hospital_a=data/hospital_b"), "is given 2 times"),
    # a manifest (data.manifest in the config)
    Case("manifest with bad JSON", _manifest_case('{"sites": ['), "not valid JSON"),
    Case("manifest without data-path", _manifest_case('{"sites": [{"name": "a"}]}'), "has no 'data-path'"),
    Case("manifest as a list", _manifest_case('[{"name": "a", "data-path": "hospital_a"}]'), "JSON list"),
    Case("manifest without sites", _manifest_case('{"hospitals": []}'), "lists no sites"),
    Case("manifest with duplicate site names", _manifest_case(
        '{"sites": [{"name": "a", "data-path": "hospital_a"}, {"name": "a", "data-path": "hospital_b"}]}'),
        "used twice"),
    Case("manifest naming a missing folder", _manifest_case('{"sites": [{"name": "a", "data-path": "nowhere/"}]}'),
         "no such file or folder"),
    Case("missing manifest file (typo)", _manifest_case(None), "does not exist"),
    # the config and the command line
    Case("missing config file (typo)", lambda w, s: ["simulate", "config.yml", "--data", *_write_sites(w, s)],
         "config.yml"),
    Case("misspelt config key", _data_case(None, "--set", "training.num-round=2"), "num-round"),
    Case("results folder of an earlier run", _existing_run, "already exists"),
    # `fedspatial inspect`
    Case("inspect: NaN coordinates", _inspect(_on_b(_nan_coords)), "NaN or infinite coordinates"),
    Case("inspect: truncated file", _inspect(None, _truncated), "truncated"),
    # deployment: a hospital's node, a researcher's submission
    Case("client: site data with NaN coordinates", _client_bad_data, "NaN or infinite coordinates"),
    Case("submit with no connection", _submit_no_connection, "connection"),
    Case("submit to an unreachable SuperLink", _submit_unreachable, "127.0.0.1"),
]


# ------------------------------------------------------------------ running


def _fedspatial() -> str:
    beside = Path(sys.executable).parent / "fedspatial"
    return str(beside) if beside.exists() else (shutil.which("fedspatial") or "fedspatial")


def _env(home: Path) -> dict[str, str]:
    """The user's environment with a fresh HOME (no ~/.flwr connection, no caches)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "PYTHONUNBUFFERED")}
    env["HOME"] = str(home)
    return env


def _digest(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: SHA-256 of files, ``dir`` for folders."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_dir()}


class Sanitizer:
    """Output without this machine's folders: case paths relative, the rest marked."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = [str(tmp.resolve()), str(tmp)]
        self.case: list[str] = []

    def __call__(self, text: str) -> str:
        for base in self.case:
            text = text.replace(base + "/", "").replace(base, ".")
        for base in self.tmp:
            text = text.replace(base, "<tmp>")
        return text.replace(str(ROOT) + "/", "").replace(str(ROOT), "<checkout>")


_ERROR = re.compile(r"^(?:\S+: )?error\b|\berror\(s\)|^\w*(?:Error|Exception)\b|problem\(s\)", re.I)
_WARNING = re.compile(r"\bwarning\b", re.I)
_FIX = re.compile(r"\bFix\b|--allow\b|--set\b|Did you mean|\bCheck:|pick another|Name the")
"""How an output names its fix: `Fix:`, an option to pass, a suggestion, what to check."""


def message_of(output: str) -> tuple[str, str]:
    """(the first error line with the first problem under it, a short form for the table)."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    if not lines:
        return "", "(nothing printed)"
    i = next((k for k, line in enumerate(lines) if _ERROR.search(line)), None)
    if i is None:
        i = next((k for k, line in enumerate(lines) if _WARNING.search(line)), len(lines) - 1)
    head = lines[i].strip()
    bullet = next((b.strip()[2:] for b in lines[i + 1: i + 8] if b.strip().startswith("- ")), "")
    if not bullet and head.endswith(":") and i + 1 < len(lines) and lines[i + 1].startswith(" "):
        head = f"{head} {lines[i + 1].strip()}"  # the fix on the next, indented line
    full = f"{head} {bullet}".strip() if bullet else head
    short = bullet or head
    short = re.sub(r"\s+", " ", short)
    return full, short if len(short) <= 220 else short[:217] + "..."


def _run_cli(exe: str, argv: list[str], work: Path, tmp: Path, timeout: float) -> tuple[int | None, str, float]:
    """``fedspatial ARGV`` from ``work`` with a fresh HOME, all output on one pipe: exit code
    (None: killed after ``timeout`` s), output, seconds."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([exe, *argv], cwd=work, env=_env(tmp / "home"), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        code: int | None = proc.returncode
        output = proc.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as err:
        code, output = None, (err.stdout or b"").decode(errors="replace")
    return code, output, time.perf_counter() - t0


def run_case(case: Case, tmp: Path, sites: Sites, sanitize: Sanitizer, exe: str) -> dict[str, Any]:
    slug = re.sub(r"[^a-z0-9]+", "-", case.kind.lower()).strip("-")
    work = tmp / "cases" / slug
    work.mkdir(parents=True)
    argv = case.build(work, sites)
    sanitize.case = [str(work.resolve()), str(work)]
    before = _digest(work)
    code, output, seconds = _run_cli(exe, argv, work, tmp, CASE_TIMEOUT_S)
    if code is None:
        output += f"\n(killed after {CASE_TIMEOUT_S} s)"
    after = _digest(work)
    output = sanitize(output)
    full, short = message_of(output)
    new = sorted(set(after) - set(before))
    row = {
        "kind": case.kind,
        "command": "fedspatial " + shlex.join(argv),
        "exit_code": code,
        "message": full if len(full) <= 600 else full[:597] + "...",
        "message_short": short,
        "seconds": round(seconds, 2),
        "traceback": "Traceback (most recent call last)" in output,
        "input_unchanged": all(after.get(k) == v for k, v in before.items()),
        "results_folder_left": bool(new),
        "new_paths": new[:10],
        "names_fix": bool(_FIX.search(output)),
        "expected": case.expect,
        "expected_found": case.expect in output,
        "output_lines": len(output.splitlines()),
        "output_head": output.splitlines()[:12],
    }
    row["clear"] = bool(code and not row["traceback"] and row["names_fix"] and row["input_unchanged"]
                        and not row["results_folder_left"])
    shutil.rmtree(work, ignore_errors=True)
    return row


def count_lines(text: str) -> int:
    """Lines as a log file or CI shows them: ``\\n``-separated (a ``\\r`` does not start one)."""
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def run_demo(tmp: Path, exe: str, sanitize: Sanitizer, *, verbose: bool) -> dict[str, Any]:
    """The default 2-round 3-site demo run from a fresh folder, all output on one pipe."""
    work = tmp / ("run-verbose" if verbose else "run")
    (work / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "demo.yaml", work / "configs" / "demo.yaml")
    argv = [*RUN_ARGS, *(["-v"] if verbose else [])]
    sanitize.case = [str(work.resolve()), str(work)]
    log.info("run%s: fedspatial %s", " -v" if verbose else "", " ".join(argv))
    code, raw, wall = _run_cli(exe, argv, work, tmp, RUN_TIMEOUT_S)
    text = sanitize(raw)
    lines = text.split("\n")
    result = {
        "command": "fedspatial " + " ".join(argv),
        "exit_code": code,
        "lines": count_lines(text),
        "nonblank_lines": sum(1 for line in lines if line.strip()),
        "warning_lines": sum(1 for line in lines if re.match(r"^\s*(?:\S+ )?warning\b", line, re.I)),
        "wall_s": round(wall, 1),
        "traceback": "Traceback (most recent call last)" in text,
        "control_characters": bool(re.search(r"\r|\x1b\[", raw)),
        "output": text if not verbose else "",
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


# ------------------------------------------------------------------ report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def problems_of(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        why = [w for w, bad in (("exit code 0", r["exit_code"] == 0), ("timed out", r["exit_code"] is None),
                                ("traceback", r["traceback"]), ("input files changed", not r["input_unchanged"]),
                                (f"left {', '.join(r['new_paths'])}", r["results_folder_left"]),
                                ("no fix named", not r["names_fix"]),
                                (f"message lacks {r['expected']!r}", not r["expected_found"])) if bad]
        if why:
            out.append(f"- **{r['kind']}**: {'; '.join(why)}. `{r['command']}`")
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = result["bad_inputs"]
    clear = sum(r["clear"] for r in rows)
    lines = [
        "# Newcomer: bad inputs and a first run (issue 19)",
        "",
        f"`{result['config']['command']}` at `{result['commit'][:12]}` on {result['machine']['cpus']} CPUs "
        f"({result['date']}), {result['wall_s']:.0f} s in all. Each row runs the real `fedspatial` command in a "
        "subprocess from a fresh temporary folder holding only that case's data: three synthetic sites of one "
        "30-40-cell section and 30 features, one of them broken the row's way. **Message**: the first error line "
        "(of a refusal block, its first problem), paths relative to the case's folder. **s**: seconds from start "
        "to exit (time to the message). **input unchanged**: SHA-256 of every input file before and after. "
        "**folder left**: anything new in the folder after the command (a results folder). **fix named**: the "
        "output says how to fix it (`Fix:`, `--allow`, `--set` ...).",
        "",
        f"{len(rows)} kinds; {clear} exit non-zero with a message naming a fix, no traceback, inputs unchanged "
        f"and nothing left behind; tracebacks: {sum(r['traceback'] for r in rows)}; inputs changed: "
        f"{sum(not r['input_unchanged'] for r in rows)}; folders left: {sum(r['results_folder_left'] for r in rows)}; "
        f"exit code 0: {sum(r['exit_code'] == 0 for r in rows)}.",
        "",
        "| kind | exit | message | s | traceback | input unchanged | folder left | fix named |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        code = "timeout" if r["exit_code"] is None else str(r["exit_code"])
        lines.append(f"| {_cell(r['kind'])} | {code} | {_cell(r['message_short'])} | {r['seconds']:.1f} | "
                     f"{_yes(r['traceback'])} | {_yes(r['input_unchanged'])} | {_yes(r['results_folder_left'])} | "
                     f"{_yes(r['names_fix'])} |")
    problems = problems_of(rows)
    lines += ["", "## Rows to look at", "", *(problems or ["None: every kind stops with a clear message."])]
    lines += ["", "The commands of every row are in `newcomer.json` (`bad_inputs[].command`, run from the case's "
              "folder)."]
    run, verbose = result.get("run"), result.get("run_verbose")
    if run:
        verdict = "**pass**" if run["lines"] <= TARGET_LINES else "**miss**"
        lines += [
            "",
            "## A first run",
            "",
            f"`{run['command']}` (the built-in three-hospital demo, its default modes: federated, local, "
            "centralized) from a fresh folder, stdout and stderr on one pipe (no terminal).",
            "",
            "| run | exit | lines printed | non-blank | warning lines | target | verdict | wall s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| default | {run['exit_code']} | {run['lines']} | {run['nonblank_lines']} | {run['warning_lines']} | "
            f"<= {TARGET_LINES} | {verdict} | {run['wall_s']:.0f} |",
        ]
        if verbose:
            lines.append(f"| `-v` | {verbose['exit_code']} | {verbose['lines']} | {verbose['nonblank_lines']} | "
                         f"{verbose['warning_lines']} | - | - | {verbose['wall_s']:.0f} |")
        notes = []
        if run["exit_code"] != 0:
            notes.append(f"the default run exited with {run['exit_code']}")
        if run["traceback"] or (verbose and verbose["traceback"]):
            notes.append("a traceback was printed")
        if run["control_characters"]:
            notes.append("carriage returns or ANSI codes reached the pipe (no terminal)")
        lines += ["", ("Note: " + "; ".join(notes) + ".") if notes else
                  f"The default run printed {run['lines']} lines against a target of at most {TARGET_LINES}.",
                  "", "What the default run printed:", "", "```text", run["output"].rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="KIND", help="run these kinds only (default: all)")
    parser.add_argument("--no-run", action="store_true", help="skip the demo runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("anndata").setLevel(logging.WARNING)  # "storing 'site' as categorical" per file written
    unknown = set(args.only or ()) - {c.kind for c in CASES}
    if unknown:
        parser.error(f"unknown kind(s): {', '.join(sorted(unknown))}; kinds: {', '.join(c.kind for c in CASES)}")
    cases = [c for c in CASES if not args.only or c.kind in args.only]

    from fedspatial.shared.data.synthetic import SyntheticSpec, make_synthetic_federation
    from fedspatial.shared.storage.atomic import write_json_atomic, write_text_atomic

    exe = _fedspatial()
    start = time.perf_counter()
    spec = SyntheticSpec(sections_per_site=(1, 1, 1), spots_per_section=(30, 40), n_features=30)
    sites = {site: sections[0] for site, sections in make_synthetic_federation(spec).items()}
    rows: list[dict[str, Any]] = []
    run: dict[str, Any] | None = None
    verbose: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="fedspatial-newcomer-") as name:
        tmp = Path(name)
        (tmp / "home").mkdir()
        sanitize = Sanitizer(tmp)
        for i, case in enumerate(cases, 1):
            if case.needs and not _importable(case.needs):
                log.warning("[%d/%d] %s: skipped (needs %s)", i, len(cases), case.kind, case.needs)
                continue
            row = run_case(case, tmp, sites, sanitize, exe)
            rows.append(row)
            log.info("[%d/%d] %s: exit %s in %.1f s%s: %s", i, len(cases), case.kind, row["exit_code"],
                     row["seconds"], "" if row["clear"] else " (NOT CLEAR)", row["message_short"][:120])
        if not args.no_run:
            run = run_demo(tmp, exe, sanitize, verbose=False)
            log.info("run: %d lines (target <= %d), %.0f s, exit %s", run["lines"], TARGET_LINES, run["wall_s"],
                     run["exit_code"])
            verbose = run_demo(tmp, exe, sanitize, verbose=True)
            log.info("run -v: %d lines, %.0f s, exit %s", verbose["lines"], verbose["wall_s"], verbose["exit_code"])
    wall = time.perf_counter() - start
    command = " ".join(["python", "benchmarks/newcomer.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {
        **provenance({"command": command, "run_command": "fedspatial " + " ".join(RUN_ARGS),
                      "kinds": [c.kind for c in cases], "synthetic": dataclasses.asdict(spec),
                      "case_config": CONFIG}),
        "bad_inputs": rows,
        "n_kinds": len(rows),
        "n_clear": sum(r["clear"] for r in rows),
        "run_lines": run["lines"] if run else None,
        "run_lines_verbose": verbose["lines"] if verbose else None,
        "run_wall_s": run["wall_s"] if run else None,
        "run_wall_s_verbose": verbose["wall_s"] if verbose else None,
        "run_exit_code": run["exit_code"] if run else None,
        "target_lines": TARGET_LINES,
        "run_lines_pass": (run["lines"] <= TARGET_LINES) if run else None,
        "run": run,
        "run_verbose": verbose,
        "wall_s": round(wall, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "newcomer.json", result)
    write_text_atomic(args.out / "newcomer.md", markdown(result))
    problems = problems_of(rows)
    log.info("%d kinds, %d clear; %d to look at%s", len(rows), result["n_clear"], len(problems),
             "".join("\n  " + p for p in problems))
    if run:
        log.info("default run: %d lines (target <= %d: %s), -v: %s lines; %.0f s in all; wrote %s",
                 run["lines"], TARGET_LINES, "pass" if result["run_lines_pass"] else "MISS",
                 verbose["lines"] if verbose else "-", wall, args.out / "newcomer.md")
    return 0 if not problems and (run is None or (run["exit_code"] == 0 and result["run_lines_pass"])) else 1


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
