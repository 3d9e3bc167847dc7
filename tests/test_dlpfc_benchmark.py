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
def test_mixed_panel_shares_genes_by_ensembl_id():
    from fedspatial.shared.features import feature_names, shared_features
    from fedspatial.shared.io import load_site

    names = {}
    for s in (*_bench().FOUR, _bench().OTHER_DONOR):
        (section,) = load_site(str(DATA / f"{s}.h5ad"))
        names[s] = feature_names(section.adata, "gene_ids")
    shared = shared_features(names)
    # 151510 has a 500-gene panel: the federation can keep at most those.
    assert 0 < len(shared) <= 500
    assert all(g.startswith("ENSG") for g in shared)
