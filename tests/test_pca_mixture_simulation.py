"""Federated PCA inputs, federated Harmony, a federated Gaussian mixture, marker genes and
the confidence's calibration, end to end through Flower (one small run covers them all)."""

from __future__ import annotations

import dataclasses
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation
from fedspatial.simulation import simulate

pytestmark = pytest.mark.flower


# 67 s on 2 cores: in `make test-slow`; the default run checks the same phases' messages
# (test_messages.py) and each phase against its pooled reference (unit tests).
@pytest.mark.slow
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
    # Marker genes over all 120 shared genes (not only the 12 components' inputs): the
    # server's table and dot plot, and scanpy's layout in every annotated section.
    markers = pd.read_csv(run / "markers.csv", dtype={"domain": str})
    assert report["markers"]["n-genes"] == 120 and report["markers"]["method"] == "t-test"
    assert set(markers["domain"]) == set(report["markers"]["domains"]) and len(markers) == 120 * markers["domain"].nunique()
    assert (run / "markers_dotplot.png").is_file()
    for path in outputs:
        uns = ad.read_h5ad(path).uns["rank_genes_groups"]
        assert uns["params"]["groupby"] == "fedspatial_domain" and list(uns["names"].dtype.names) == report["markers"]["domains"]
        group = report["markers"]["domains"][0]
        assert list(uns["names"][group]) == markers.loc[markers["domain"] == group, "gene"].tolist()
    # ... equal to scanpy on the pooled annotated sections (float64): the sites' domains
    # were summed in the right order
    sc = pytest.importorskip("scanpy")
    pooled = ad.concat([ad.read_h5ad(p) for p in outputs])
    pooled.X = pooled.X.astype(np.float64)
    sc.pp.normalize_total(pooled, target_sum=1e4)
    sc.pp.log1p(pooled)
    sc.tl.rank_genes_groups(pooled, "fedspatial_domain", groups=report["markers"]["domains"], method="t-test")
    for group in report["markers"]["domains"]:
        ours = markers[markers["domain"] == group]
        assert ours["gene"].tolist() == list(pooled.uns["rank_genes_groups"]["names"][group])
        np.testing.assert_allclose(ours["pval_adj"], pooled.uns["rank_genes_groups"]["pvals_adj"][group], rtol=0, atol=1e-6)
    # Calibration of the confidence against the synthetic labels (federated ECE), before and
    # after the label-free temperature, and its diagram; the recalibrated confidence at the sites.
    calibration = report["calibration"]
    assert calibration["temperature"] > 0 and (run / "reliability.png").is_file()
    for key in ("before", "after"):
        assert 0 <= calibration[key]["ece"] <= 1 and calibration[key]["n_cells"] == sum(report["domain-sizes"])
        assert len(calibration[key]["bins"]) == 10
    for path in outputs:
        a = ad.read_h5ad(path)
        conf = a.obs["fedspatial_confidence_calibrated"].to_numpy()
        assert np.all((conf > 0) & (conf <= 1)) and a.uns["fedspatial"]["confidence_temperature"] == calibration["temperature"]
