"""Block-by-block processing of a section's rows gives what the whole-section computation
gives (issue 17: memory bounded by the block, not the section)."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from fedspatial.shared.algorithms.markers import domain_gene_sums
from fedspatial.shared.data.sections import _standardize
from fedspatial.shared.features import harmonization
from fedspatial.shared.features.feature_stats import compute_feature_stats
from fedspatial.shared.features.harmonization import count_blocks, restrict_counts, row_block_size
from fedspatial.shared.features.selection import build_feature_space, transform


def _section(dense: bool, n: int = 257, g: int = 12, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(1.0, 2.0, size=(n, g))).astype(np.float32)
    x[5] = 0  # an empty cell
    a = ad.AnnData(X=x if dense else sparse.csr_matrix(x))
    a.var_names = [f"g{i}" for i in range(g)]
    return a


def test_row_block_size_bounds_the_block() -> None:
    assert row_block_size(400, block_entries=4000) == 10
    assert row_block_size(10**6, block_entries=10) == 1
    assert row_block_size(0, block_entries=7) == 7


@pytest.mark.parametrize("dense", [True, False])
def test_count_blocks_tile_restrict_counts(dense: bool) -> None:
    a = _section(dense)
    feats = ["g3", "g0", "g7"]
    whole = restrict_counts(a, feats, None, None)
    blocks = list(count_blocks(a, feats, None, None, block_rows=50))
    assert [(r.start, r.stop) for r, _ in blocks] == [(0, 50), (50, 100), (100, 150), (150, 200), (200, 250), (250, 257)]
    def dense_of(m: Any) -> np.ndarray:
        return np.asarray(m.toarray() if sparse.issparse(m) else m)

    stacked = np.vstack([dense_of(b) for _, b in blocks])
    np.testing.assert_array_equal(stacked, dense_of(whole))


@pytest.mark.parametrize("dense", [True, False])
def test_blockwise_stats_transform_and_markers_equal_whole(dense: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _section(dense, seed=1), _section(dense, n=90, seed=2)
    feats = [f"g{i}" for i in range(12)]
    whole = compute_feature_stats([a, b], feats)
    space = build_feature_space(whole, n_top_features=6, target_sum=1e4)
    z_whole = transform(a, space)
    dom = [np.arange(a.n_obs) % 3, np.arange(b.n_obs) % 3]
    m_whole = domain_gene_sums([a, b], dom, genes=feats, n_domains=3)
    monkeypatch.setattr(harmonization, "BLOCK_ENTRIES", 12 * 40)  # 40-row blocks
    blocked = compute_feature_stats([a, b], feats)
    for name in ("sum_norm", "sumsq_norm", "sum_log", "sumsq_log", "n_detected"):
        np.testing.assert_allclose(getattr(blocked, name), getattr(whole, name), rtol=1e-12)
    np.testing.assert_allclose(transform(a, space), z_whole, rtol=1e-6, atol=1e-6)
    m_blocked = domain_gene_sums([a, b], dom, genes=feats, n_domains=3)
    for name in ("n_cells", "sums", "sums_sq", "n_expressed"):
        np.testing.assert_allclose(getattr(m_blocked, name), getattr(m_whole, name), rtol=1e-12)


def test_standardize_in_blocks_equals_numpy() -> None:
    rng = np.random.default_rng(3)
    x = (rng.normal(5.0, 2.0, size=(1001, 4)) * [1, 10, 0.1, 0]).astype(np.float32)
    expected = np.clip((x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)) / np.where(
        x.std(axis=0, ddof=1, dtype=np.float64) == 0, 1.0, x.std(axis=0, ddof=1, dtype=np.float64)), -3, 3)
    got = _standardize(x.copy(), 3.0, block_rows=97)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.all(got[:, 3] == 0)  # a constant column: centred, not divided by zero
