"""Harmony's initial centroids without pooling cells: harmonypy's default number
of clusters and federated k-means on cosine-normalized embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedspatial.shared.algorithms.harmony_kernels import cosine_normalize
from fedspatial.shared.algorithms.kmeans_init import init_from_site_centroids, local_kmeans
from fedspatial.shared.algorithms.kmeans_lloyd import federated_kmeans


def default_n_clusters(n_cells: int) -> int:
    """harmonypy's default number of clusters, ``min(round(N / 30), 100)``."""
    return max(1, int(min(round(n_cells / 30.0), 100)))


def federated_init_centroids(
    site_Z: Sequence[np.ndarray], n_clusters: int, *, seed: int = 0, max_iter: int = 10
) -> np.ndarray:
    """Initial centroids by federated k-means on cosine-normalized embeddings.

    Sites propose local k-means centroids, the server seeds K global centroids
    from them and refines them with federated Lloyd iterations
    (:mod:`fedspatial.shared.algorithms.kmeans`); harmonypy refines its seeds with 10
    Lloyd iterations on the same normalized data.

    Parameters
    ----------
    site_Z : Sequence[np.ndarray]
        Embeddings of each site (n_s x d).
    n_clusters : int
        K.
    seed : int, default 0
        Seed of the k-means runs.
    max_iter : int, default 10
        Federated Lloyd iterations.

    Returns
    -------
    np.ndarray
        float64 (K, d).
    """
    normalized = [cosine_normalize(Z) for Z in site_Z if len(Z)]
    proposals = [local_kmeans(X, n_clusters, seed=seed) for X in normalized]
    seeds = init_from_site_centroids(
        [c for c, _ in proposals], [w for _, w in proposals], n_clusters, seed=seed
    )
    centroids, _ = federated_kmeans(normalized, seeds, max_iter=max_iter)
    return centroids
