"""Small feature panels mapped onto the federation's model inputs (shared/algorithms/panels.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from fedspatial.shared.algorithms.panels import (
    PanelMap,
    fit_panel_map,
    merge_panel_moments,
    panel_moments,
    plan_panels,
)
from fedspatial.shared.features.selection import (
    HarmonizationError,
    build_feature_space,
    compute_feature_stats,
)


def test_plan_maps_only_the_small_panel_and_intersects_the_rest():
    sections = {
        "a/s1": ["g1", "g2", "g3", "g4", "g5", "g6"],
        "b/s1": ["g2", "g1", "g3", "g4", "g5", "g7"],
        "c/s1": ["g3", "g1", "g2", "g4", "g6", "g5", "g8"],
        "d/s1": ["g5", "g1"],  # 2 features < 0.5 x median 6
    }
    plan = plan_panels(sections, min_fraction=0.5)
    assert plan.reference == ["a/s1", "b/s1", "c/s1"]
    # shared by the three reference sections only, in the first one's order
    assert plan.shared == ["g1", "g2", "g3", "g4", "g5"]
    (pid,) = plan.panels
    assert plan.panels[pid] == ["g1", "g5"]  # d's features inside the shared space
    assert plan.mapped == {"d/s1": pid}


def test_plan_without_mapping_is_the_plain_intersection():
    sections = {"a/s1": ["g1", "g2", "g3"], "b/s1": ["g2", "g3"]}
    plan = plan_panels(sections, min_fraction=0.0)
    assert plan.shared == ["g2", "g3"] and plan.mapped == {} and plan.reference == ["a/s1", "b/s1"]


def test_plan_groups_sections_with_the_same_panel():
    big = [f"g{i}" for i in range(20)]
    sections = {"a/s1": big, "a/s2": big, "a/s3": big, "e/s1": big, "b/s1": big[:4], "b/s2": big[:4], "c/s1": big[2:6]}
    plan = plan_panels(sections, min_fraction=0.5)
    assert len(plan.panels) == 2
    assert plan.mapped["b/s1"] == plan.mapped["b/s2"] != plan.mapped["c/s1"]


def test_plan_refuses_a_panel_sharing_nothing():
    with pytest.raises(HarmonizationError, match="c/s1"):
        plan_panels({"a/s1": ["g1", "g2", "g3", "g4"], "b/s1": ["g1", "g2", "g3", "g4"], "c/s1": ["x1"]})


def test_federated_fit_equals_pooled_ridge_and_r2():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6))
    Z = X @ rng.normal(size=(6, 3)) + 0.5 * rng.normal(size=(300, 3)) + np.array([1.0, -2.0, 0.5])
    sites = [(X[:100], Z[:100]), (X[100:220], Z[100:220]), (X[220:], Z[220:])]
    fitted = fit_panel_map(merge_panel_moments([panel_moments(x, z) for x, z in sites]), ridge=1e-3)
    # sklearn's Ridge penalizes sum of squares (not the mean): alpha = ridge * n * mean variance
    n = len(X)
    alpha = 1e-3 * n * float(np.mean(X.var(axis=0)))
    pooled = Ridge(alpha=alpha).fit(X, Z)
    np.testing.assert_allclose(fitted.coef, pooled.coef_.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fitted.intercept, pooled.intercept_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fitted.transform(X), pooled.predict(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fitted.r2, r2_score(Z, pooled.predict(X), multioutput="raw_values"), atol=1e-8)


def test_panel_map_round_trips_through_arrays():
    m = PanelMap(np.arange(6.0).reshape(3, 2), np.array([1.0, 2.0]), np.array([0.5, 0.25]))
    back = PanelMap.from_arrays(m.to_arrays())
    np.testing.assert_array_equal(back.coef, m.coef)
    np.testing.assert_array_equal(back.transform(np.ones((1, 3))), [[7.0, 11.0]])


def test_panel_space_keeps_every_panel_feature():
    import anndata as ad

    counts = np.array([[1, 0, 3], [2, 2, 0], [0, 5, 1], [4, 1, 1]], dtype=np.float32)
    adata = ad.AnnData(counts)
    adata.var_names = ["g1", "g2", "g3"]
    stats = compute_feature_stats(adata, ["g3", "g1"], target_sum=10.0)
    space = build_feature_space(stats, n_top_features=None, target_sum=10.0)
    assert space.selected == ["g3", "g1"]
    # library size over the panel only: cell 0 has g3=3, g1=1 -> log1p(7.5), log1p(2.5)
    logged = np.log1p(np.array([[7.5, 2.5], [0.0, 10.0], [10.0, 0.0], [2.0, 8.0]]))
    np.testing.assert_allclose(space.mean, logged.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(space.std, logged.std(axis=0, ddof=1), rtol=1e-6)
