"""A site measured with a small panel joins a federation through Flower: it is mapped
onto the others' principal components instead of shrinking everybody's features."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation
from fedspatial.simulation import simulate

pytestmark = pytest.mark.flower


def test_small_panel_site_is_mapped_in_federated_and_centralized_runs(tmp_path):
    spec = dataclasses.replace(SyntheticSpec(seed=3), spots_per_section=(150, 200), n_features=120)
    manifest = write_synthetic_federation(tmp_path / "data", spec)
    # hospital_c measured a 30-gene targeted panel (every 4th gene)
    small = sorted((tmp_path / "data" / "hospital_c").glob("*.h5ad"))
    for path in small:
        a = ad.read_h5ad(path)
        a[:, a.var_names[::4]].copy().write_h5ad(path)
    cfg = ExperimentConfig.from_dict(
        {
            "run-name": "panel",
            "results-dir": str(tmp_path / "results"),
            "data": {"manifest": str(manifest)},
            "features": {"n-top-features": 80, "n-pcs": 10},
            "model": {"hidden-dim": 32, "latent-dim": 8},
            "training": {"num-rounds": 2, "batch-size": 64},
            "simulation": {"modes": ["federated", "centralized"]},
        }
    )
    simulate(cfg)
    for mode in ("federated", "centralized"):
        run = tmp_path / "results" / "panel" / mode
        report = json.loads((run / "metrics.json").read_text())
        # The space is built from the full-panel sections (80 of 120 features), not 30.
        assert report["n-features-shared"] == 120 and report["n-features-selected"] == 80
        mapped = report["mapped-panels"]
        assert sorted(mapped) == [f"hospital_c/{p.stem}" for p in small]
        assert all(m["n-features"] == 30 and m["n-features-shared"] == 30 for m in mapped.values())
        # 30 of 120 genes of the same programmes explain the leading components far above
        # chance (about 30 / 943 cells = 0.03 for unrelated features)
        assert all(0.15 < m["r2"][0] <= 1 for m in mapped.values())
        assert json.loads((run / "model" / "model.json").read_text())["model"]["in_dim"] == 10
        # every section, mapped ones included, is embedded, clustered and scored
        for key in mapped:
            section = report["sections"][key]
            assert np.isfinite(section["ari"])
            # the site names its output relative to its own output folder, never absolutely
            assert not Path(section["output"]).is_absolute()
            (written,) = run.glob(f"sites/*/{section['output']}")
            assert ad.read_h5ad(written).obsm["X_fedspatial"].shape[1] == 8
