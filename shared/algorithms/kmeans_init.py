"""Federated k-means starts: each site's local k-means proposal, and the server's
weighted k-means of the proposals into initial global centroids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedspatial.shared.algorithms._kmeans_arrays import as_2d_float


def _fit_sklearn_kmeans(
    points: np.ndarray,
    n_clusters: int,
    *,
    seed: int,
    n_init: int,
    sample_weight: np.ndarray | None = None,
) -> Any:
    """scikit-learn's ``KMeans`` (k-means++ starts) fit to ``points``; the fitted model."""
    from sklearn.cluster import KMeans  # lazy: ~1 s of every ClientApp start otherwise

    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    return km.fit(points, sample_weight=sample_weight)


def local_kmeans(X: np.ndarray, n_clusters: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A site's proposal for initialization: k-means on its own cells.

    Parameters
    ----------
    X : np.ndarray
        The site's embeddings, shape (N, D).
    n_clusters : int
        Requested number of clusters; ``k = min(n_clusters, N)`` are fit.
    seed : int, default 0
        Random state of scikit-learn's ``KMeans``, which keeps the best of 10
        k-means++ starts (a fixed number: there is no ``n_init`` argument here).

    Returns
    -------
    centroids : np.ndarray
        float64 (k, D).
    counts : np.ndarray
        float64 (k,), cells per local cluster (weights for the server).
    """
    X = as_2d_float(X, "X")
    if n_clusters < 1:
        raise ValueError("n_clusters must be >= 1")
    k = min(int(n_clusters), X.shape[0])
    if k == 0:
        return np.zeros((0, X.shape[1])), np.zeros(0)
    km = _fit_sklearn_kmeans(np.asarray(X, dtype=np.float64), k, seed=seed, n_init=10)
    counts = np.bincount(km.labels_, minlength=k).astype(np.float64)
    return np.asarray(km.cluster_centers_, dtype=np.float64), counts


def init_from_site_centroids(
    site_centroids: Sequence[np.ndarray],
    site_counts: Sequence[np.ndarray],
    n_clusters: int,
    *,
    seed: int = 0,
    n_init: int = 10,
) -> np.ndarray:
    """Server: initial global centroids from the sites' local k-means proposals.

    Weighted k-means (weights = local cluster sizes) on the union of the sites'
    centroids. Pass sites in a fixed order (e.g. sorted by node id) so that the
    result is reproducible.

    Parameters
    ----------
    site_centroids : Sequence[np.ndarray]
        Per site, local centroids (k_s, D).
    site_counts : Sequence[np.ndarray]
        Per site, local cluster sizes (k_s,).
    n_clusters : int
        Number of global clusters K.
    seed : int, default 0
        Random state of scikit-learn's ``KMeans``.
    n_init : int, default 10
        k-means++ starts of that ``KMeans`` (1 gives a different start for each seed).

    Returns
    -------
    np.ndarray
        float64 (K, D).
    """
    if len(site_centroids) != len(site_counts) or len(site_centroids) == 0:
        raise ValueError("need one (centroids, counts) pair per site, at least one site")
    points = np.vstack([np.asarray(c, dtype=np.float64) for c in site_centroids])
    weights = np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1) for w in site_counts])
    if points.shape[0] != weights.shape[0]:
        raise ValueError("each site must send one count per centroid")
    keep = weights > 0  # a zero weight would still be drawable by k-means++
    points, weights = points[keep], weights[keep]
    if points.shape[0] < n_clusters:
        raise ValueError(
            f"{points.shape[0]} non-empty site centroids cannot seed {n_clusters} clusters"
        )
    km = _fit_sklearn_kmeans(points, n_clusters, seed=seed, n_init=n_init, sample_weight=weights)
    return np.asarray(km.cluster_centers_, dtype=np.float64)
