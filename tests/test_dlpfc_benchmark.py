"""The DLPFC benchmark's plumbing; real data only where it exists (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDSPATIAL_DLPFC", ROOT.parent / "shared" / "data" / "dlpfc"))


def _bench():
    # As `python benchmarks/dlpfc.py` runs it: its folder first on sys.path (for provenance.py).
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("dlpfc_bench", ROOT / "benchmarks" / "dlpfc.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    bench = _bench()
    monkeypatch.setattr(sys, "argv", ["dlpfc.py", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert bench.main() == 2
    assert "FEDSPATIAL_DLPFC" in capsys.readouterr().err
    assert not (tmp_path / "dlpfc.json").exists()


def test_manifest_has_one_hospital_per_section(tmp_path):
    bench = _bench()
    path = bench.write_manifest(tmp_path, ("151673", "151674"), tmp_path / "m" / "federation.json")
    nodes = json.loads(path.read_text())["nodes"]
    assert [n["name"] for n in nodes] == ["151673", "151674"]
    assert nodes[0]["sites"][0]["data-path"].endswith("151673.h5ad")


@pytest.mark.skipif(not (DATA / "151510.h5ad").is_file(), reason="DLPFC data not present")
def test_mixed_panel_is_mapped_not_intersected():
    from fedspatial.shared.algorithms.panels import plan_panels
    from fedspatial.shared.data.io import load_site
    from fedspatial.shared.features.selection import feature_names

    names = {}
    for s in (*_bench().FOUR, _bench().OTHER_DONOR):
        (section,) = load_site(str(DATA / f"{s}.h5ad"))
        names[f"{s}/{s}"] = feature_names(section.adata, "gene_ids")
    plan = plan_panels(names, min_fraction=0.5)
    # 151510's 500-gene panel is mapped; the donor-3 sections keep the genes they share
    assert list(plan.mapped) == ["151510/151510"]
    assert len(plan.shared) > 3000 and all(g.startswith("ENSG") for g in plan.shared)
    (panel,) = plan.panels.values()
    assert 0 < len(panel) <= 500 and set(panel) <= set(plan.shared)


def _mode(ari: float, sections: tuple[str, ...], *, timed: bool = True) -> dict:
    entry = {
        "joint_ari": ari, "median_ari": ari, "median_ari_donor3": ari,
        "section_ari": dict.fromkeys(sections, ari), "section_nmi": dict.fromkeys(sections, ari),
    }
    if timed:
        entry.update({"wall_s": 100.0, "seconds_per_round": 2.0, "bytes_per_round": 1000.0})
    return entry


def test_report_only_renders_saved_runs(tmp_path, monkeypatch):
    bench = _bench()
    work, out = tmp_path / "work", tmp_path / "out"
    feds = {"four": bench.FOUR, "mixed": (*bench.FOUR, bench.OTHER_DONOR)}
    aris = {"federated": 0.56, "local": 0.30, "centralized": 0.55, "pca_kmeans": 0.2}
    for name, sections in feds.items():
        per_seed = [
            {"seed": seed, "local_reused": [], "modes": {m: _mode(a, sections, timed=m != "pca_kmeans") for m, a in aris.items()}}
            for seed in (0, 1)
        ]
        (work / name).mkdir(parents=True)
        (work / name / "per_seed.json").write_text(json.dumps(per_seed))
        meta = {"n-features-shared": 3851, "n-features-selected": 3000, "mapped-panels": {}}
        if name == "mixed":
            meta["mapped-panels"] = {"151510/151510": {"n-features": 500, "n-features-shared": 279, "r2-mean": 0.3, "r2": [0.98, 0.9]}}
        (work / f"{name}-seed0" / "federated").mkdir(parents=True)
        (work / f"{name}-seed0" / "federated" / "metrics.json").write_text(json.dumps(meta))
    saved = {
        "total_s": 1800.0, "command": "--seeds 0,1", "memory": {"151673": {"cells": 3639, "peak_rss_mb": 800.0}},
        "federations": {n: {"sections": list(s), "seeds": [0, 1], "local_from": "four" if n == "mixed" else None} for n, s in feds.items()},
    }
    (work / "benchmark.json").write_text(json.dumps(saved))
    monkeypatch.setattr(bench, "plot_domains", lambda fed, data, path: path.write_bytes(b"png"))
    data = DATA
    if not (DATA / "151510.h5ad").is_file():  # the data check runs first: empty stand-ins
        data = tmp_path / "data"
        data.mkdir()
        for s in feds["mixed"]:
            (data / f"{s}.h5ad").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["dlpfc.py", "--report-only", "--data", str(data), "--work", str(work), "--out", str(out)])
    assert bench.main() == 0
    result = json.loads((out / "dlpfc.json").read_text())
    # exactly the keys the issue names
    assert set(result) == {"median_ari", "joint_ari", "wall_s", "mixed_panel", "commit", "config", "machine", "date"}
    assert result["commit"] == "unknown"  # the saved runs predate provenance records: not claimed
    assert set(result["median_ari"]) == {"federated", "local", "centralized", "pca_kmeans"}
    assert set(result["wall_s"]) == {"federated", "local", "centralized"}
    assert set(result["mixed_panel"]) == {"median_ari", "joint_ari", "wall_s"}
    md = (out / "dlpfc.md").read_text()
    assert "federated median ARI >= 0.55: 0.560 (met)" in md
    assert "279 of them among the shared genes" in md and "Whole benchmark 30.0 min" in md
