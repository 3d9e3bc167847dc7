"""Federated PCA equals pooled (scikit-learn) PCA."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from fedspatial.shared.algorithms.pca import FederatedPCA, PCABasis, federated_pca


def _sites(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # A decaying spectrum, as in expression data, plus a site offset.
    loadings = rng.standard_normal((40, 60)) * (0.8 ** np.arange(40))[:, None]
    return [rng.standard_normal((n, 40)) @ loadings + shift for n, shift in ((300, 0.5), (250, -0.2), (120, 0.0))]


def test_matches_pooled_pca() -> None:
    sites = _sites()
    pooled = np.vstack(sites)
    basis = federated_pca(sites, 10, n_iter=12)
    ref = PCA(10, svd_solver="full").fit(pooled)
    signs = np.sign(np.sum(basis.components * ref.components_, axis=1))
    np.testing.assert_allclose(basis.components, ref.components_ * signs[:, None], atol=1e-6)
    np.testing.assert_allclose(basis.explained_variance, ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(basis.mean, pooled.mean(0), atol=1e-12)
    z = basis.transform(pooled, whiten_first=False)
    np.testing.assert_allclose(np.abs(z), np.abs(ref.transform(pooled)), atol=1e-4)


def test_one_site_equals_many_sites() -> None:
    # The centralized mode (one site with every cell) runs the same protocol.
    sites = _sites(1)
    a = federated_pca(sites, 5)
    b = federated_pca([np.vstack(sites)], 5)
    np.testing.assert_allclose(a.components, b.components, atol=1e-10)


def test_whitening_and_round_trip() -> None:
    basis = federated_pca(_sites(), 3)
    z = basis.transform(np.vstack(_sites()))
    assert z.dtype == np.float32
    assert abs(z[:, 0].std(ddof=1) - 1.0) < 1e-5
    again = PCABasis.from_arrays(basis.to_arrays())
    np.testing.assert_array_equal(again.components, basis.components)


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="n_components"):
        FederatedPCA(5, 6)
    with pytest.raises(ValueError, match="at least 2 cells"):
        FederatedPCA(5, 2).set_mean([np.zeros(5)], [1.0])


def test_server_settings_on_a_slowly_decaying_spectrum() -> None:
    """What the README states, at the iterations the server runs (FederatedPCA's default,
    8): 50 components of a 0.98^k spectrum, where subspace iteration converges slowest."""
    rng = np.random.default_rng(0)
    n_features, k = 200, 50
    loadings = rng.standard_normal((n_features, n_features)) * (0.98 ** np.arange(n_features))[:, None]
    sites = [rng.standard_normal((n, n_features)) @ loadings for n in (900, 700, 500)]
    pooled = np.vstack(sites)
    basis = federated_pca(sites, k)  # the server's defaults
    ref = PCA(k, svd_solver="full").fit(pooled)
    signs = np.sign(np.sum(basis.components * ref.components_, axis=1))
    error = np.abs(basis.components - ref.components_ * signs[:, None]).max(axis=1)
    assert error[:10].max() < 1e-8  # the leading components: equal
    assert error.max() < 1e-2  # the trailing ones: close
    np.testing.assert_allclose(basis.explained_variance, ref.explained_variance_, rtol=1e-3)
    cosines = np.linalg.svd(basis.components @ ref.components_.T, compute_uv=False)
    assert cosines.min() > 0.998  # the same subspace
