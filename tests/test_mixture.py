"""Federated Gaussian mixture: equal to scikit-learn's pooled EM from the same start."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from fedspatial.shared.algorithms.mixture import (
    MixtureParams,
    MixtureStats,
    federated_gaussian_mixture,
    merge_mixture_stats,
    site_mixture_stats,
)


def _sites(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Elongated, correlated clusters (what tied covariances are for), offset per site.
    cov = np.array([[3.0, 1.2, 0.0], [1.2, 1.0, 0.3], [0.0, 0.3, 0.5]])
    centres = np.array([[0, 0, 0], [4, 1, 0], [0, 5, 1], [5, 5, -2]], dtype=float)
    sites = []
    for n, shift in ((300, 0.0), (200, 0.2), (150, -0.1)):
        lab = rng.integers(0, 4, n)
        sites.append(centres[lab] + rng.multivariate_normal(np.zeros(3), cov, n) + shift)
    return sites


@pytest.mark.parametrize("covariance_type", ["tied", "full"])
def test_federated_em_equals_pooled_sklearn(covariance_type: str) -> None:
    sites = _sites()
    pooled = np.vstack(sites)
    labels = KMeans(4, n_init=10, random_state=0).fit(pooled).labels_
    splits = np.cumsum([len(s) for s in sites])[:-1]
    params, em = federated_gaussian_mixture(
        sites, np.split(labels, splits), 4, covariance_type=covariance_type, tol=1e-6
    )
    # Same start for scikit-learn: the M-step of the hard k-means assignment.
    init = merge_mixture_stats(
        [site_mixture_stats(s, labels=lab, n_components=4, covariance_type=covariance_type)
         for s, lab in zip(sites, np.split(labels, splits), strict=True)]
    )
    from fedspatial.shared.algorithms.mixture import m_step

    start = m_step(init, covariance_type=covariance_type)
    gm = GaussianMixture(
        4,
        covariance_type=covariance_type,
        tol=1e-6,
        weights_init=start.weights,
        means_init=start.means,
        precisions_init=np.linalg.inv(start.covariances),
    ).fit(pooled)
    assert em.converged and em.n_iter == gm.n_iter_
    np.testing.assert_allclose(params.means, gm.means_, atol=1e-8)
    np.testing.assert_allclose(params.covariances, gm.covariances_, atol=1e-8)
    np.testing.assert_allclose(params.weights, gm.weights_, atol=1e-10)
    np.testing.assert_allclose(em.lower_bound, gm.lower_bound_, atol=1e-10)
    np.testing.assert_array_equal(params.predict_proba(pooled).argmax(1), gm.predict(pooled))
    np.testing.assert_allclose(params.predict_proba(pooled), gm.predict_proba(pooled), atol=1e-8)


def test_tied_mixture_hand_checkable() -> None:
    # Two points per component, unit responsibilities: means are the midpoints and the
    # tied covariance the pooled within-component scatter / n.
    X = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 1.0], [10.0, 3.0]])
    stats = site_mixture_stats(X, labels=np.array([0, 0, 1, 1]), n_components=2)
    from fedspatial.shared.algorithms.mixture import m_step

    p = m_step(stats, reg_covar=0.0)
    np.testing.assert_allclose(p.means, [[1.0, 0.0], [10.0, 2.0]], atol=1e-12)
    np.testing.assert_allclose(p.covariances, [[0.5, 0.0], [0.0, 0.5]], atol=1e-12)
    np.testing.assert_allclose(p.weights, [0.5, 0.5])


def test_stats_round_trip_and_shape_checks() -> None:
    stats = site_mixture_stats(_sites()[0], labels=np.zeros(300, dtype=int), n_components=2)
    again = MixtureStats.from_arrays(stats.to_arrays())
    np.testing.assert_array_equal(again.weighted_sum, stats.weighted_sum)
    assert again.n_cells == 300
    with pytest.raises(ValueError, match="inconsistent"):
        MixtureParams(np.ones(2) / 2, np.zeros((2, 3)), np.eye(2))
    with pytest.raises(ValueError, match="covariance_type"):
        MixtureParams(np.ones(2) / 2, np.zeros((2, 3)), np.eye(3), "spherical")


def test_singular_covariance_says_what_to_fix() -> None:
    p = MixtureParams(np.ones(1), np.zeros((1, 2)), np.zeros((2, 2)))
    with pytest.raises(FloatingPointError, match="reg-covar"):
        p.predict_proba(np.zeros((3, 2)))
