"""Federated PCA inputs, federated Harmony and a federated Gaussian mixture, end to end
through Flower (one small run covers the three phases)."""

from __future__ import annotations

import dataclasses
import json

import anndata as ad
import numpy as np
import pytest

from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation
from fedspatial.simulation import simulate

pytestmark = pytest.mark.flower


def test_pca_inputs_harmony_and_mixture_domains(tmp_path):
    spec = dataclasses.replace(SyntheticSpec(seed=5), spots_per_section=(150, 200), n_features=120)
    manifest = write_synthetic_federation(tmp_path / "data", spec)
    cfg = ExperimentConfig.from_dict(
        {
            "run-name": "pm",
            "results-dir": str(tmp_path / "results"),
            "data": {"manifest": str(manifest)},
            "features": {"n-top-features": 80, "n-pcs": 12},
            "model": {"hidden-dim": 32, "latent-dim": 8},
            "training": {"num-rounds": 2, "batch-size": 64},
            "clustering": {"mixture": "tied", "harmony": "site", "harmony-max-iter": 2, "n-init": 3},
            "simulation": {"modes": ["federated"]},
        }
    )
    simulate(cfg)
    run = tmp_path / "results" / "pm" / "federated"
    report = json.loads((run / "metrics.json").read_text())
    assert report["n-pcs"] == 12 and report["mixture"] == "tied"
    assert report["mixture-iterations"] >= 1
    # three EM starts side by side (k-means, then two more seedings); the most likely kept
    likelihoods = report["mixture-log-likelihoods"]
    assert len(likelihoods) == 3 and len(report["kmeans-inertias"]) == 1
    assert report["mixture-start-kept"] == int(np.argmax(likelihoods))
    # The model was built on the principal components, not on the 80 features.
    assert json.loads((run / "model" / "model.json").read_text())["model"]["in_dim"] == 12
    assert 1 <= report["harmony"]["iterations"] <= 2
    outputs = sorted((run / "sites").rglob("*.h5ad"))
    assert outputs
    for path in outputs:
        a = ad.read_h5ad(path)
        # Harmony corrected the embedding at the site and kept the one it started from.
        assert a.obsm["X_fedspatial"].shape == a.obsm["X_fedspatial_uncorrected"].shape
        assert not np.allclose(a.obsm["X_fedspatial"], a.obsm["X_fedspatial_uncorrected"])
        # Confidence is a mixture posterior: a probability, at least 1/K for the argmax
        # component (refinement may move a cell to a less likely domain, so only > 0).
        conf = a.obs["fedspatial_confidence"].to_numpy()
        assert np.all((conf > 0) & (conf <= 1))
    # The integration report (pooled metrics: simulation only) and its plot.
    integration = json.loads((run / "integration.json").read_text())
    assert "pooled (simulation only)" in json.dumps(integration)
    assert (run / "embedding_before_after.png").is_file()
    assert sum(report["domain-sizes"]) == sum(s["n_cells"] for s in report["sites"].values())
