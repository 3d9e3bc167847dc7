"""Federated Lloyd k-means, server side: scikit-learn's stopping rule, the
round-by-round server state, and the in-memory reference of the protocol."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fedspatial.shared.algorithms.kmeans_stats import (
    ClusterStats,
    cluster_stats,
    merge_cluster_stats,
    update_centroids,
)
from fedspatial.shared.algorithms.kmeans_variance import (
    feature_moments,
    pooled_feature_variance_from_sites,
)

logger = logging.getLogger(__name__)


def kmeans_tolerance(tol: float, feature_variance: np.ndarray | None) -> float:
    """Absolute shift tolerance as scikit-learn: ``tol * mean(per-feature variance)``."""
    if tol < 0:
        raise ValueError("tol must be >= 0")
    if tol == 0:
        return 0.0
    if feature_variance is None:
        raise ValueError("tol > 0 needs the pooled per-feature variance")
    return float(tol * np.mean(feature_variance))


def kmeans_converged(
    n_changed: int | None, center_shift: float, tol_abs: float, *, first_iteration: bool
) -> bool:
    """scikit-learn's Lloyd stopping rule for one iteration.

    Parameters
    ----------
    n_changed : int or None
        Cells (over all sites) whose label differs from the previous iteration's.
    center_shift : float
        Squared centroid shift of this iteration, summed over clusters.
    tol_abs : float
        Absolute tolerance, see :func:`kmeans_tolerance`.
    first_iteration : bool
        On the first iteration there are no previous labels to compare with.

    Returns
    -------
    bool
        True on strict convergence (no label changed) or when the shift is <= tol_abs.
    """
    if not first_iteration and n_changed == 0:
        return True
    return center_shift <= tol_abs


class FederatedKMeans:
    """Server-side state of federated Lloyd k-means, one :meth:`step` per round.

    Parameters
    ----------
    max_iter : int, default 100
        Maximum number of iterations.
    tol : float, default 0.0
        Relative tolerance on the squared centroid shift (scaled by the mean pooled
        per-feature variance, as scikit-learn's ``tol``).
    """

    def __init__(self, *, max_iter: int = 100, tol: float = 0.0) -> None:
        if max_iter < 1:
            raise ValueError("max_iter must be >= 1")
        if tol < 0:
            raise ValueError("tol must be >= 0")
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.tol_abs = 0.0
        self._centroids: np.ndarray | None = None
        self._previous: np.ndarray | None = None
        self._n_iter = 0
        self._done = False
        self.stop_reason: str | None = None  # "strict", "tol" or "max_iter"
        self.center_shift = float("nan")
        self.inertia = float("nan")  # of the assignment in the last step

    def init(self, centroids: np.ndarray, *, feature_variance: np.ndarray | None = None) -> None:
        """Start (or restart) from initial centroids.

        Parameters
        ----------
        centroids : np.ndarray
            Initial centroids, shape (K, D).
        feature_variance : np.ndarray or None, default None
            Pooled per-feature variance (:func:`pooled_feature_variance_from_sites`);
            required when ``tol > 0``.
        """
        c = np.array(centroids, dtype=np.float64, copy=True)
        if c.ndim != 2 or c.shape[0] == 0:
            raise ValueError(f"centroids must have shape (K>0, D), got {c.shape}")
        self.tol_abs = kmeans_tolerance(self.tol, feature_variance)
        self._centroids, self._previous = c, None
        self._n_iter, self._done, self.stop_reason = 0, False, None
        self.center_shift = self.inertia = float("nan")

    @property
    def centroids(self) -> np.ndarray:
        """Centroids to send next (after the loop: the final centroids)."""
        if self._centroids is None:
            raise RuntimeError("call init() first")
        return self._centroids

    @property
    def previous_centroids(self) -> np.ndarray | None:
        """Centroids of the previous iteration (None before the first step)."""
        return self._previous

    @property
    def n_iter(self) -> int:
        return self._n_iter

    @property
    def done(self) -> bool:
        return self._done

    def step(self, merged: ClusterStats) -> bool:
        """Update the centroids from merged site statistics.

        Parameters
        ----------
        merged : ClusterStats
            Sum of the sites' :func:`cluster_stats` for :attr:`centroids`.

        Returns
        -------
        bool
            True when k-means has finished (converged or reached ``max_iter``).
        """
        if self._done:
            raise RuntimeError("k-means has already finished")
        current = self.centroids
        new = update_centroids(merged, current)
        self._n_iter += 1
        self.center_shift = float(((new - current) ** 2).sum())
        self.inertia = merged.inertia
        converged = kmeans_converged(
            merged.n_changed, self.center_shift, self.tol_abs, first_iteration=self._n_iter == 1
        )
        self._previous, self._centroids = current, new
        if converged:
            self.stop_reason = "strict" if merged.n_changed == 0 and self._n_iter > 1 else "tol"
        elif self._n_iter >= self.max_iter:
            self.stop_reason = "max_iter"
        self._done = self.stop_reason is not None
        if self._done:
            logger.info(
                "federated k-means stopped after %d iteration(s) (%s), inertia %.6g",
                self._n_iter,
                self.stop_reason,
                self.inertia,
            )
        return self._done


def federated_kmeans(
    site_X: Sequence[np.ndarray], init: np.ndarray, *, max_iter: int = 100, tol: float = 0.0
) -> tuple[np.ndarray, int]:
    """In-memory reference of the federated k-means protocol.

    Sites compute :func:`cluster_stats`; the server merges them and steps a
    :class:`FederatedKMeans`, exactly as the Flower server loop does.

    Parameters
    ----------
    site_X : Sequence[np.ndarray]
        Embeddings of each site, shapes (N_s, D).
    init : np.ndarray
        Initial centroids, shape (K, D).
    max_iter : int, default 100
        Maximum number of iterations.
    tol : float, default 0.0
        Relative tolerance, as scikit-learn's ``KMeans(tol=...)``.

    Returns
    -------
    centroids : np.ndarray
        Final centroids, float64 (K, D).
    n_iter : int
        Number of iterations run (as scikit-learn's ``n_iter_``).
    """
    km = FederatedKMeans(max_iter=max_iter, tol=tol)
    variance = (
        pooled_feature_variance_from_sites([feature_moments(X) for X in site_X])
        if tol > 0
        else None
    )
    km.init(init, feature_variance=variance)
    while not km.done:
        stats = [
            cluster_stats(X, km.centroids, previous_centroids=km.previous_centroids) for X in site_X
        ]
        km.step(merge_cluster_stats(stats))
    return km.centroids, km.n_iter
