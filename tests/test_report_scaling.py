"""The integration report at scale (issue 17 item 1): subsampled metrics equal the exact
ones where nothing is subsampled and stay close where something is, no n x n array is
ever allocated, and no metric is computed twice."""

from __future__ import annotations

import logging
import tracemalloc

import numpy as np
import pytest

from fedspatial.shared.evaluation import integration as integ
from fedspatial.shared.evaluation.embedding_inputs import knn
from fedspatial.shared.evaluation.integration import EXACT, ReportSampling, integration_report, lisi
from fedspatial.shared.evaluation.sampling import strata_of, stratified_subsample


def _embedding(n: int, seed: int = 0, d: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four labelled clouds, partly overlapping, three batches with a small batch shift."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, n, p=[0.4, 0.3, 0.2, 0.1])
    batches = rng.integers(0, 3, n)
    centres = rng.normal(scale=3.0, size=(4, d))
    shifts = rng.normal(scale=0.7, size=(3, d))
    Z = centres[labels] + shifts[batches] + rng.normal(size=(n, d))
    return Z, batches, np.array(["a", "b", "c", "d"])[labels]


def test_stratified_subsample_keeps_shares_and_is_seeded() -> None:
    strata = np.repeat([0, 1, 2], [7000, 2900, 100])
    rows = stratified_subsample(strata, 1000, seed=3)
    assert rows is not None and rows.size == 1000 and np.all(np.diff(rows) > 0)
    assert np.bincount(strata[rows]).tolist() == [700, 290, 10]
    assert np.array_equal(rows, stratified_subsample(strata, 1000, seed=3))
    assert not np.array_equal(rows, stratified_subsample(strata, 1000, seed=4))
    assert stratified_subsample(strata, 10_000) is None  # n <= max_cells: every cell
    tiny = stratified_subsample(np.repeat([0, 1], [999, 1]), 10)
    assert tiny is not None and 1 in np.repeat([0, 1], [999, 1])[tiny]  # a small stratum keeps a cell


def test_knn_of_some_rows_equals_the_full_search() -> None:
    Z, _, _ = _embedding(600)
    Z[5] = Z[6]  # a duplicate: self must still be left out
    rows = np.array([0, 5, 6, 17, 599])
    d_all, i_all = knn(Z, 20)
    d, i = knn(Z, 20, rows)
    np.testing.assert_allclose(d, d_all[rows], atol=1e-12)
    assert all(r not in row for r, row in zip(rows, i, strict=True))
    assert np.array_equal(i[[0, 3, 4]], i_all[rows][[0, 3, 4]])


def test_report_below_the_sample_size_is_the_exact_report() -> None:
    Z, batches, labels = _embedding(1500)
    exact = integration_report(Z, batches, labels, sampling=EXACT)
    default = integration_report(Z, batches, labels)  # 1,500 < 5,000 and 10,000: no subsample
    big = integration_report(Z, batches, labels, sampling=ReportSampling(max_cells=1500, lisi_cells=1500))
    for key, value in exact.items():
        assert default[key] == pytest.approx(value, abs=1e-12), key
        assert big[key] == pytest.approx(value, abs=1e-12), key


def test_subsampled_report_is_close_to_the_exact_one() -> None:
    # 12,000 cells, subsampled to 3,000 (ASW, connectivity, k-means) and 1,500 (LISI)
    Z, batches, labels = _embedding(12_000, seed=1)
    exact = integration_report(Z, batches, labels, sampling=EXACT)
    sub = integration_report(Z, batches, labels, sampling=ReportSampling(max_cells=3000, lisi_cells=1500))
    tolerance = {"ilisi": 0.02, "clisi": 0.02, "batch_asw": 0.01, "label_asw": 0.01,
                 "graph_connectivity": 0.02, "ari": 0.02, "nmi": 0.02}
    for key, tol in tolerance.items():
        assert abs(sub[key] - exact[key]) <= tol, (key, sub[key], exact[key])


def test_lisi_of_some_cells_is_their_exact_lisi() -> None:
    Z, batches, _ = _embedding(800, seed=2)
    rows = np.sort(np.random.default_rng(0).choice(800, 100, replace=False))
    np.testing.assert_allclose(lisi(Z, batches, cells=rows), lisi(Z, batches)[rows], atol=1e-12)


def test_report_never_allocates_an_n_by_n_array() -> None:
    # 30,000 cells: one n x n float64 matrix is 7.2 GB, scikit-learn's default distance
    # blocks (1 GiB working memory) over 1 GB; the report stays far below both.
    Z, batches, labels = _embedding(30_000, seed=4, d=16)
    tracemalloc.start()
    try:
        integration_report(Z, batches, labels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 300 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_label_scores_are_reused_not_computed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    Z, batches, labels = _embedding(900, seed=5)
    pooled = integration_report(Z, batches, labels)
    calls: list[str] = []
    for name in ("label_asw", "graph_connectivity", "cluster_embedding", "clisi"):
        monkeypatch.setattr(integ, name, lambda *a, _n=name, **k: calls.append(_n))
    again = integration_report(Z, batches, labels, label_scores=pooled)
    assert calls == [] and again == pooled


def test_single_site_report_computes_each_metric_once(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    # One site with one section (the 50,000-cell run): the within-site label
    # scores are the pooled ones, reused; one integration report per view, not two.
    import anndata as ad
    import pandas as pd

    from fedspatial.server.integration_report import (
        POOLED,
        SITE_COMPUTABLE,
        write_integration_report,
    )

    Z, _, labels = _embedding(2000, seed=6)
    site_dir = tmp_path / "federated" / "sites" / "hospital_a"
    site_dir.mkdir(parents=True)
    obs = pd.DataFrame({"domain": labels, "fedspatial_domain": pd.Categorical(np.unique(labels, return_inverse=True)[1].astype(str))}, index=[str(i) for i in range(2000)])
    adata = ad.AnnData(X=np.zeros((2000, 3), dtype=np.float32), obs=obs, obsm={"X_fedspatial": Z.astype(np.float32)})
    adata.write_h5ad(site_dir / "hospital_a__s1.h5ad")
    with caplog.at_level(logging.INFO, logger="fedspatial.shared.evaluation.integration"):
        summary = write_integration_report(tmp_path / "federated", layout="pca")
    computed = [r for r in caplog.records if r.getMessage().startswith("integration (") and "reused" not in r.getMessage()]
    assert len(computed) == 1
    within, pooled = summary[SITE_COMPUTABLE]["within_site"]["after"], summary[POOLED]["after"]
    assert all(within[k] == pooled[k] for k in integ.LABEL_METRICS)
    assert summary["seconds"] > 0 and set(summary["seconds_by_part"]) == {"read", "metrics", "plot"}
    assert summary["sampling"]["subsampled"] is False


def test_strata_combine_columns() -> None:
    a, b = np.array([0, 0, 1, 1]), np.array([0, 2, 0, 2])
    assert len(set(strata_of(a, b).tolist())) == 4
