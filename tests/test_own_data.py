"""A user's own data (issue 19): SpatialData stores read in memory, and
`fedspatial simulate --data` on three folders, one of them holding a SpatialData store."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from fedspatial.cli import main
from fedspatial.shared.data.io import load_site
from fedspatial.shared.data.synthetic import SyntheticSpec, make_synthetic_federation


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_spatialdata(adata: ad.AnnData, path: Path) -> None:
    """A SpatialData store as spatialdata-io writes Visium: circles, and a table without obsm."""
    sd = pytest.importorskip("spatialdata")
    from spatialdata.models import ShapesModel, TableModel

    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    table = adata.copy()
    del table.obsm["spatial"]
    table.obs["region"] = pd.Categorical(["spots"] * table.n_obs)
    table.obs["spot_id"] = np.arange(table.n_obs)
    shapes = ShapesModel.parse(coords, geometry=0, radius=np.full(len(coords), 27.5))
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    sd.SpatialData(shapes={"spots": shapes}, tables={"table": table}).write(path)


@pytest.fixture(scope="module")
def sections() -> dict[str, list[ad.AnnData]]:
    spec = SyntheticSpec(seed=5, sections_per_site=(1, 1, 1), spots_per_section=(120, 160), n_features=60)
    return make_synthetic_federation(spec)


def test_spatialdata_store_is_read_in_memory_with_its_coordinates(sections, tmp_path):
    original = sections["hospital_a"][0]
    store = tmp_path / "site" / "section1.zarr"
    store.parent.mkdir()
    write_spatialdata(original, store)
    before = _digest(tmp_path)
    (loaded,) = load_site(tmp_path / "site")
    assert loaded.name == "section1" and loaded.adata.shape == original.shape
    np.testing.assert_allclose(loaded.adata.obsm["spatial"], original.obsm["spatial"])
    assert (loaded.adata.obs["domain"].astype(str).to_numpy() == original.obs["domain"].astype(str).to_numpy()).all()
    assert _digest(tmp_path) == before  # never modified


def test_spatialdata_problems_are_one_clear_line(sections, tmp_path, capsys, monkeypatch):
    sd = pytest.importorskip("spatialdata")
    empty = tmp_path / "empty.zarr"
    sd.SpatialData().write(empty)
    assert main(["inspect", str(empty)]) == 1
    out = capsys.readouterr().out
    assert "has no table" in out and "Traceback" not in out
    store = tmp_path / "ok.zarr"
    write_spatialdata(sections["hospital_b"][0], store)
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # the extra is not installed
    assert main(["inspect", str(store)]) == 1
    out = capsys.readouterr().out
    assert "pip install 'fedspatial[io]'" in out and "Traceback" not in out


@pytest.mark.flower
def test_simulate_data_on_three_folders_one_a_spatialdata_store(sections, tmp_path, capsys):
    data = tmp_path / "data"
    for site in ("hospital_a", "hospital_b"):
        (data / site).mkdir(parents=True)
        sections[site][0].write_h5ad(data / site / f"{site}_s1.h5ad")
    (data / "hospital_c").mkdir()
    write_spatialdata(sections["hospital_c"][0], data / "hospital_c" / "hospital_c_s1.zarr")
    before = _digest(data)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({
        "run-name": "own", "results-dir": str(tmp_path / "results"),
        "features": {"n-top-features": 40}, "model": {"hidden-dim": 16, "latent-dim": 4},
        "training": {"num-rounds": 1, "local-epochs": 1, "batch-size": 64},
        "clustering": {"n-domains": 3}, "markers": {"marker-genes": False},
        "simulation": {"modes": ["federated"]},
    }))
    rc = main(["simulate", str(cfg), "--data", *(str(data / s) for s in ("hospital_a", "hospital_b", "hospital_c"))])
    assert rc == 0, capsys.readouterr().err
    run = tmp_path / "results" / "own"
    manifest = json.loads((run / "federation.json").read_text())
    assert [s["name"] for s in manifest["sites"]] == ["hospital_a", "hospital_b", "hospital_c"]
    report = json.loads((run / "federated" / "metrics.json").read_text())
    assert set(report["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert [r["round"] for r in report["rounds"]] == [1]
    assert _digest(data) == before  # inputs unchanged, no manifest written next to them
