"""Federated PCA by subspace iteration: principal components of the pooled cells from
products the sites compute on their own cells.

With thousands of genes the model's first layer dominates training time; spatial-domain
methods (SpaGCN, SEDR, CCST) therefore train on principal components. Pooled PCA would
need every cell at one place, and exchanging ``D x D`` Gram matrices costs
``8 D^2`` bytes a site (72 MB for 3,000 genes). Subspace iteration needs only ``D x r``
products: the server holds an orthonormal basis ``Q``; each site returns
``Xc^T (Xc Q)`` for its centred cells ``Xc``; the server sums, re-orthonormalizes and
repeats. A final Rayleigh-Ritz step (sites return ``(Xc Q)^T (Xc Q)``, ``r x r``) yields
the components and their variances. With ``oversample`` extra directions and enough
iterations this converges to the top eigenvectors of the pooled covariance (Halko,
Martinsson & Tropp 2011); a test compares with scikit-learn's exact PCA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedspatial.shared.algorithms.arrays import float64_arrays


@dataclass
class PCABasis:
    """Result of federated PCA.

    Attributes
    ----------
    mean
        ``(D,)`` pooled feature mean.
    components
        ``(r, D)`` orthonormal principal axes, by decreasing variance; each axis is
        signed so that its largest-magnitude loading is positive.
    explained_variance
        ``(r,)`` variance along each axis (``ddof=1``).
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, X: np.ndarray, *, whiten_first: bool = True) -> np.ndarray:
        """Project rows of ``X``; with ``whiten_first`` every axis is divided by the
        standard deviation of the first one, so inputs are O(1) and relative variances
        (what the reconstruction loss weighs) are kept."""
        X = np.asarray(X)
        scale = np.sqrt(self.explained_variance[0]) if whiten_first and self.explained_variance[0] > 0 else 1.0
        out = np.empty((len(X), self.n_components), dtype=np.float32)
        step = 65_536  # rows: the float64 copy of a 500,000-cell input would be GiBs
        for start in range(0, len(X), step):
            block = (X[start : start + step].astype(np.float64) - self.mean) @ self.components.T
            out[start : start + step] = block / scale
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "components": self.components, "explained_variance": self.explained_variance}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PCABasis:
        return cls(*float64_arrays(arrays, ("mean", "components", "explained_variance")))


# ---------------------------------------------------------------- site side
def site_column_sums(X: np.ndarray) -> tuple[np.ndarray, float]:
    """Site: feature sums and cell count (for the pooled mean)."""
    X = np.asarray(X, dtype=np.float64)
    return X.sum(axis=0), float(len(X))


def site_power_product(X: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Site: ``Xc^T (Xc Q)``, ``(D, q)``, with ``Xc = X - mean``."""
    xc = np.asarray(X, dtype=np.float64) - mean
    return xc.T @ (xc @ basis)


def site_rayleigh(X: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Site: ``(Xc Q)^T (Xc Q)``, ``(q, q)``."""
    y = (np.asarray(X, dtype=np.float64) - mean) @ basis
    return y.T @ y


# ---------------------------------------------------------------- server side
class FederatedPCA:
    """Server state of federated subspace iteration.

    Parameters
    ----------
    n_features
        ``D``.
    n_components
        ``r``, number of axes wanted.
    oversample
        Extra directions iterated alongside, which speeds convergence (default: 10).
    n_iter
        Power iterations (one message round each; default: 8).
    seed
        Seeds the random start basis (default: 0).
    """

    def __init__(self, n_features: int, n_components: int, *, oversample: int = 10, n_iter: int = 8, seed: int = 0) -> None:
        if not 1 <= n_components <= n_features:
            raise ValueError(f"n_components must be in [1, {n_features}], got {n_components}")
        if oversample < 0 or n_iter < 1:
            raise ValueError("need oversample >= 0 and n_iter >= 1")
        self.n_components = n_components
        self.n_iter = n_iter
        q = min(n_features, n_components + oversample)
        rng = np.random.default_rng(seed)
        self.basis, _ = np.linalg.qr(rng.standard_normal((n_features, q)))
        self.mean = np.zeros(n_features)
        self.n_cells = 0.0
        self.iteration = 0

    def set_mean(self, sums: Sequence[np.ndarray], counts: Sequence[float]) -> np.ndarray:
        self.n_cells = float(sum(counts))
        if self.n_cells < 2:
            raise ValueError("federated PCA needs at least 2 cells in the federation")
        self.mean = np.sum(sums, axis=0) / self.n_cells
        return self.mean

    @property
    def iterating(self) -> bool:
        return self.iteration < self.n_iter

    def step(self, products: Sequence[np.ndarray]) -> np.ndarray:
        """Sum the sites' ``Xc^T Xc Q`` and re-orthonormalize; returns the new basis."""
        self.basis, _ = np.linalg.qr(np.sum(products, axis=0))
        self.iteration += 1
        return self.basis

    def finish(self, rayleigh: Sequence[np.ndarray]) -> PCABasis:
        """Rayleigh-Ritz on the summed ``(Xc Q)^T (Xc Q)``: the principal axes."""
        evals, evecs = np.linalg.eigh(np.sum(rayleigh, axis=0))
        order = np.argsort(evals)[::-1][: self.n_components]
        components = (self.basis @ evecs[:, order]).T
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
        components *= signs[:, None]
        variance = np.clip(evals[order], 0, None) / (self.n_cells - 1)
        return PCABasis(self.mean.copy(), components, variance)


def federated_pca(site_X: Sequence[np.ndarray], n_components: int, *, oversample: int = 10, n_iter: int = 8, seed: int = 0) -> PCABasis:
    """In-process federated PCA (what the Flower rounds do), for tests and local runs."""
    pca = FederatedPCA(site_X[0].shape[1], n_components, oversample=oversample, n_iter=n_iter, seed=seed)
    sums, counts = zip(*(site_column_sums(x) for x in site_X), strict=True)
    mean = pca.set_mean(sums, counts)
    while pca.iterating:
        pca.step([site_power_product(x, mean, pca.basis) for x in site_X])
    return pca.finish([site_rayleigh(x, mean, pca.basis) for x in site_X])
