"""Tests for fedspatial.shared.features.selection.

The key property: the feature space built from per-site aggregates equals what
scanpy computes on the pooled cells (which no party ever holds).
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

from fedspatial.shared.features.selection import (
    FeatureSpace,
    FeatureStats,
    HarmonizationError,
    _seurat_dispersions,
    build_feature_space,
    compute_feature_stats,
    feature_names,
    highly_variable_mask,
    merge_feature_stats,
    normalize_log,
    shared_features,
    transform,
)

TARGET_SUM = 1e4

# the synthetic data has an empty cell on purpose; scanpy warns about it
pytestmark = pytest.mark.filterwarnings("ignore:Some cells have zero counts:UserWarning")


# --------------------------------------------------------------------------- names
def test_shared_features_intersection_in_first_site_order():
    sites = {"a": ["g3", "g1", "g2", "x"], "b": ["g1", "g2", "g3", "y"], "c": ["g2", "g3", "g1"]}
    assert shared_features(sites) == ["g3", "g1", "g2"]
    assert shared_features({"only": ["b", "a"]}) == ["b", "a"]


def test_shared_features_empty_intersection_names_every_site():
    sites = {"hospital_a": ["g1", "g2"], "hospital_b": ["g3"], "hospital_c": ["g1", "g3", "g4"]}
    with pytest.raises(HarmonizationError, match="no features shared with the federation") as err:
        shared_features(sites)
    text = str(err.value)
    for part in (
        "'hospital_a' (2 features)",
        "'hospital_b' (1 features)",
        "'hospital_c' (3 features)",
    ):
        assert part in text
    assert isinstance(err.value, ValueError)


def test_shared_features_duplicates_and_no_sites():
    with pytest.raises(HarmonizationError, match=r"site 'b' has duplicate.*'g1'"):
        shared_features({"a": ["g1"], "b": ["g1", "g1", "g2"]})
    with pytest.raises(HarmonizationError, match="no sites"):
        shared_features({})


def test_feature_names_var_names_or_column():
    adata = ad.AnnData(np.zeros((2, 3), dtype=np.float32))
    adata.var_names = ["A", "B", "C"]
    adata.var["gene_ids"] = ["ENSG1", "ENSG2", "ENSG3"]
    assert feature_names(adata) == ["A", "B", "C"]
    assert feature_names(adata, "gene_ids") == ["ENSG1", "ENSG2", "ENSG3"]
    with pytest.raises(KeyError, match=r"'ensembl'.*gene_ids"):
        feature_names(adata, "ensembl")


# --------------------------------------------------------------------------- normalize_log
def test_normalize_log_hand_checked():
    x = np.array([[1, 3], [0, 0], [5, 5]])
    out = normalize_log(x, target_sum=4.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.log1p([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]]), rtol=1e-6)


@pytest.mark.parametrize("kind", ["int", "float32", "float64", "csr_float32", "csr_int"])
def test_normalize_log_equals_scanpy(kind):
    rng = np.random.default_rng(1)
    counts = rng.poisson(rng.uniform(0.1, 5, size=(1, 12)), size=(30, 12))
    counts[4] = 0  # a cell with zero total stays zero
    x = {
        "int": counts,
        "float32": counts.astype(np.float32),
        "float64": counts.astype(np.float64),
        "csr_float32": sparse.csr_matrix(counts.astype(np.float32)),
        "csr_int": sparse.csr_matrix(counts),
    }[kind]
    # scanpy's dense code path (its sparse path is the same arithmetic, JIT-compiled)
    ref = ad.AnnData(x.toarray() if sparse.issparse(x) else x.copy())
    sc.pp.normalize_total(ref, target_sum=TARGET_SUM)
    sc.pp.log1p(ref)
    out = normalize_log(x, target_sum=TARGET_SUM)
    assert sparse.issparse(out) == sparse.issparse(x)
    assert out.dtype == ref.X.dtype
    dense = out.toarray() if sparse.issparse(out) else out
    np.testing.assert_allclose(dense, ref.X, rtol=1e-6)
    assert (dense[4] == 0).all()


def test_normalize_log_rejects_bad_target_sum():
    with pytest.raises(ValueError, match="target_sum"):
        normalize_log(np.ones((2, 2)), target_sum=0)


# --------------------------------------------------------------------------- synthetic sites
def _nb_counts(rng, n_cells, means, size_factor, dispersion):
    """Negative-binomial counts: cells x features."""
    lib = rng.lognormal(0.0, 0.5, size=(n_cells, 1)) * size_factor
    mu = lib * means[None, :]
    r = dispersion[None, :]
    return rng.negative_binomial(r, r / (r + mu))


def _make_sites(seed: int):
    """Three sites (5 sections) with different library sizes and site-only features.

    Returns ``(sites, shared)`` where ``sites`` maps site -> list of AnnData.
    """
    rng = np.random.default_rng(seed)
    n_shared = 60
    shared = [f"gene{i:02d}" for i in range(n_shared)]
    means = rng.lognormal(-0.5, 1.3, size=n_shared)
    means[0] = 0.0  # never detected anywhere: undefined dispersion
    means[1] = 400.0  # far above the rest: alone in its mean bin
    dispersion = rng.uniform(0.3, 20.0, size=n_shared)

    def section(n_cells, size_factor, extra, order, fmt):
        counts = _nb_counts(rng, n_cells, means, size_factor, dispersion)
        extra_counts = rng.poisson(3.0, size=(n_cells, len(extra)))
        x = np.hstack([counts, extra_counts])[:, order]
        names = np.array(shared + extra)[order]
        x = {
            "int": x,
            "float32": x.astype(np.float32),
            "csr": sparse.csr_matrix(x.astype(np.float32)),
        }[fmt]
        adata = ad.AnnData(x)
        adata.var_names = names
        return adata

    extra_a, extra_b, extra_c = (
        ["siteA_1", "siteA_2"],
        ["siteB_1"],
        ["siteC_1", "siteC_2", "siteC_3"],
    )
    ident = lambda k: np.arange(n_shared + k)  # noqa: E731
    perm_b = rng.permutation(n_shared + len(extra_b))
    sites = {
        "a": [
            section(70, 1.0, extra_a, ident(2), "float32"),
            section(50, 1.0, extra_a, ident(2), "csr"),
        ],
        "b": [section(90, 4.0, extra_b, perm_b, "csr")],
        "c": [
            section(40, 0.25, extra_c, ident(3)[::-1], "int"),
            section(30, 0.25, extra_c, ident(3)[::-1], "float32"),
        ],
    }
    sites["c"][0].X[0] = 0  # an empty cell
    return sites, shared


def _pooled(sites, features):
    """The pooled AnnData no one holds: all cells, restricted to ``features``."""
    blocks = []
    for sections in sites.values():
        for adata in sections:
            x = adata[:, features].X
            blocks.append(x.toarray() if sparse.issparse(x) else np.asarray(x))
    return ad.AnnData(np.vstack(blocks).astype(np.float32), var=pd.DataFrame(index=features))


def _scanpy_hvg(pooled, n_top, n_bins=20):
    ref = pooled.copy()
    sc.pp.normalize_total(ref, target_sum=TARGET_SUM)
    sc.pp.log1p(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=n_top, n_bins=n_bins)
    return ref


def _federated_stats(sites):
    features = shared_features({name: list(secs[0].var_names) for name, secs in sites.items()})
    per_site = [
        compute_feature_stats(secs, features, target_sum=TARGET_SUM) for secs in sites.values()
    ]
    return features, merge_feature_stats(per_site)


def test_synthetic_sites_cover_the_edge_cases():
    sites, shared = _make_sites(0)
    features, stats = _federated_stats(sites)
    assert features == shared  # site-only features dropped, first site's order
    assert stats.n_cells == 70 + 50 + 90 + 40 + 30
    df = _seurat_dispersions(stats, 20)
    assert np.isnan(df.loc["gene00", "dispersions_norm"])  # undefined dispersion
    assert (df["mean_bin"].value_counts() == 1).any()  # scanpy's single-feature-bin rule
    assert df.loc["gene01", "dispersions_norm"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_bins", [20, 7])
def test_highly_variable_mask_equals_scanpy_on_pooled_data(seed, n_bins):
    sites, _ = _make_sites(seed)
    features, stats = _federated_stats(sites)
    pooled = _pooled(sites, features)
    for n_top in (1, 5, 17, 40, 59):  # 59 > 58 features with a defined dispersion
        ref = _scanpy_hvg(pooled, n_top, n_bins)
        mask = highly_variable_mask(stats, n_top_features=n_top, n_bins=n_bins)
        assert mask.dtype == bool and mask.shape == (len(features),)
        np.testing.assert_array_equal(
            mask, ref.var["highly_variable"].to_numpy(), err_msg=f"n_top={n_top}"
        )
    # the intermediate quantities agree too
    df = _seurat_dispersions(stats, n_bins)
    np.testing.assert_allclose(df["means"], ref.var["means"], rtol=1e-5)
    np.testing.assert_allclose(
        df["dispersions_norm"], ref.var["dispersions_norm"], rtol=1e-4, atol=1e-5
    )


def test_highly_variable_mask_ties_at_the_cutoff_are_all_kept():
    # features 0 and 1 identical, 2 and 3 identical: two bins, two pairs of ties
    stats = FeatureStats(
        features=["a", "b", "c", "d", "e"],
        n_cells=10,
        sum_norm=np.array([10.0, 10.0, 10.0, 10.0, 10.0]),
        sumsq_norm=np.array([40.0, 40.0, 20.0, 20.0, 30.0]),
        sum_log=np.zeros(5),
        sumsq_log=np.zeros(5),
        n_detected=np.full(5, 10.0),
    )
    mask = highly_variable_mask(stats, n_top_features=1, n_bins=1)
    np.testing.assert_array_equal(mask, [True, True, False, False, False])


def test_highly_variable_mask_selects_all_when_n_top_covers_every_feature():
    _, stats = _federated_stats(_make_sites(0)[0])
    assert highly_variable_mask(stats, n_top_features=60).all()
    assert highly_variable_mask(stats, n_top_features=1000).all()
    with pytest.raises(ValueError, match="n_top_features"):
        highly_variable_mask(stats, n_top_features=0)


def test_stats_merge_equals_single_pass_and_round_trips():
    sites, _ = _make_sites(5)
    features, merged = _federated_stats(sites)
    all_sections = [a for secs in sites.values() for a in secs]
    direct = compute_feature_stats(all_sections, features, target_sum=TARGET_SUM)
    for name, arr in direct.to_arrays().items():
        np.testing.assert_allclose(getattr(merged, name), arr, rtol=1e-12, err_msg=name)
    # n_detected is an exact count
    pooled = _pooled(sites, features)
    np.testing.assert_array_equal(merged.n_detected, (pooled.X > 0).sum(axis=0))
    again = FeatureStats.from_arrays(merged.features, merged.n_cells, merged.to_arrays())
    assert again.features == merged.features and again.n_cells == merged.n_cells
    np.testing.assert_array_equal(again.sumsq_log, merged.sumsq_log)
    with pytest.raises(ValueError, match="different features"):
        merge_feature_stats([merged, compute_feature_stats(all_sections[:1], features[::-1])])


def test_compute_feature_stats_library_size_over_given_features_only():
    adata = ad.AnnData(np.array([[1.0, 3.0, 100.0], [2.0, 2.0, 0.0]], dtype=np.float32))
    adata.var_names = ["a", "b", "extra"]
    stats = compute_feature_stats([adata], ["b", "a"], target_sum=4.0)
    # restricted to (b, a): cell 0 -> (3, 1), cell 1 -> (2, 2); both total 4
    np.testing.assert_allclose(stats.sum_norm, [5.0, 3.0])
    np.testing.assert_allclose(stats.sumsq_norm, [13.0, 5.0])
    np.testing.assert_allclose(stats.sum_log, np.log1p([3.0, 1.0]) + np.log1p([2.0, 2.0]))
    np.testing.assert_array_equal(stats.n_detected, [2.0, 2.0])
    assert stats.n_cells == 2
    with pytest.raises(HarmonizationError, match=r"missing.*'zzz'"):
        compute_feature_stats([adata], ["a", "zzz"])


def test_compute_feature_stats_with_feature_key():
    adata = ad.AnnData(np.array([[1.0, 3.0]], dtype=np.float32))
    adata.var_names = ["SYM1", "SYM2"]
    adata.var["gene_ids"] = ["ENSG2", "ENSG1"]
    stats = compute_feature_stats([adata], ["ENSG1"], target_sum=1.0, feature_key="gene_ids")
    np.testing.assert_allclose(stats.sum_norm, [1.0])  # SYM2 alone: 3 / 3
    with pytest.raises(KeyError, match="gene_id"):
        compute_feature_stats([adata], ["ENSG1"], feature_key="gene_id")


# --------------------------------------------------------------------------- feature space
@pytest.mark.parametrize(
    ("seed", "n_top", "max_value"), [(0, 20, 10.0), (1, 35, 2.0), (2, 1000, 10.0)]
)
def test_feature_space_and_transform_equal_the_pooled_pipeline(seed, n_top, max_value):
    sites, _ = _make_sites(seed)
    features, stats = _federated_stats(sites)
    space = build_feature_space(
        stats, n_top_features=n_top, target_sum=TARGET_SUM, max_value=max_value
    )
    assert space.shared == features

    ref = _scanpy_hvg(_pooled(sites, features), min(n_top, len(features)))
    expected_selected = (
        features if n_top >= len(features) else list(ref.var_names[ref.var["highly_variable"]])
    )
    assert space.selected == expected_selected
    ref = ref[:, space.selected].copy()
    sc.pp.scale(ref, zero_center=True)
    # sc.pp.scale(..., max_value=m) clips to [-m, m]; done here to skip a numba compile
    ref.X = np.clip(ref.X, -max_value, max_value)
    assert space.mean.dtype == np.float32 and space.std.dtype == np.float32
    np.testing.assert_allclose(space.mean, ref.var["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(space.std, ref.var["std"], rtol=1e-5, atol=1e-6)

    out = np.vstack([transform(a, space) for secs in sites.values() for a in secs])
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref.X, atol=1e-4)
    assert np.abs(out).max() <= max_value
    if max_value < 10:
        assert (np.abs(out) == max_value).any()  # clipping was exercised


def test_transform_hand_checked_and_missing_features():
    space = FeatureSpace(
        shared=["a", "b", "c"],
        selected=["a", "c"],
        mean=np.array([1.0, 0.0]),
        std=np.array([2.0, 1.0]),
        target_sum=3.0,
        feature_key=None,
        max_value=0.5,
    )
    adata = ad.AnnData(np.array([[3.0, 0.0, 0.0, 7.0], [0.0, 3.0, 0.0, 1.0]], dtype=np.float32))
    adata.var_names = ["c", "b", "a", "other"]
    # cell 0: (a, b, c) = (0, 0, 3) -> log1p norm (0, 0, log 4); cell 1: (0, 3, 0)
    out = transform(adata, space)
    expected = np.array([[(0 - 1) / 2, np.log(4.0)], [(0 - 1) / 2, 0.0]])
    np.testing.assert_allclose(out, np.clip(expected, -0.5, 0.5), rtol=1e-6)
    with pytest.raises(HarmonizationError, match=r"missing.*'b'"):
        transform(adata[:, ["c", "a"]].copy(), space)


def test_feature_space_round_trip_and_fingerprint():
    _, stats = _federated_stats(_make_sites(3)[0])
    space = build_feature_space(
        stats, n_top_features=10, target_sum=TARGET_SUM, feature_key="gene_ids"
    )
    arrays, config = space.to_arrays(), space.to_config()
    assert set(arrays) == {"mean", "std"}
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    assert all(isinstance(v, str | float | list) for v in config.values())
    back = FeatureSpace.from_parts(arrays, config)
    assert back.shared == space.shared and back.selected == space.selected
    assert (
        back.feature_key == "gene_ids" and back.target_sum == TARGET_SUM and back.max_value == 10.0
    )
    np.testing.assert_array_equal(back.mean, space.mean)
    np.testing.assert_array_equal(back.std, space.std)
    assert back.fingerprint() == space.fingerprint()
    assert len(space.fingerprint()) == 16

    no_key = FeatureSpace.from_parts(arrays, {**config, "feature_key": ""})
    assert no_key.feature_key is None
    assert no_key.to_config()["feature_key"] == ""
    assert no_key.fingerprint() != space.fingerprint()
    shifted = FeatureSpace.from_parts({"mean": arrays["mean"] + 1, "std": arrays["std"]}, config)
    assert shifted.fingerprint() != space.fingerprint()

    class FlowerArrayLike:  # anything with .numpy(), like flwr's Array
        def __init__(self, a):
            self._a = a

        def numpy(self):
            return self._a

    wrapped = FeatureSpace.from_parts({k: FlowerArrayLike(v) for k, v in arrays.items()}, config)
    assert wrapped.fingerprint() == space.fingerprint()


def test_feature_space_validation():
    kwargs = dict(
        shared=["a", "b"], mean=np.zeros(1), std=np.ones(1), target_sum=1e4, feature_key=None
    )
    with pytest.raises(ValueError, match="not in shared"):
        FeatureSpace(selected=["z"], **kwargs)
    with pytest.raises(ValueError, match="entries"):
        FeatureSpace(selected=["a", "b"], **kwargs)
    with pytest.raises(ValueError, match="missing"):
        FeatureSpace.from_parts({"mean": np.zeros(1)}, {"shared": ["a"], "selected": ["a"]})
