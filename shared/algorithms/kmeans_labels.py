"""Labelling cells with the final centroids: domain confidence (posterior under an
isotropic mixture) and one pass of spatial majority smoothing."""

from __future__ import annotations

import numpy as np

from fedspatial.shared.algorithms._kmeans_arrays import (
    as_2d_float,
    check_centroids,
    partial_distances,
    row_chunks,
)
from fedspatial.shared.algorithms.kmeans_stats import ClusterStats, assign_clusters


# ------------------------------------------------------------------ confidence
def shared_variance(stats: ClusterStats, dim: int | None = None) -> float:
    """Maximum-likelihood shared isotropic variance: ``inertia / (n * D)``.

    Parameters
    ----------
    stats : ClusterStats
        Merged statistics (their inertia is for the centroids they were computed with).
    dim : int or None, default None
        Embedding dimension D; defaults to ``stats.sums.shape[1]``.

    Returns
    -------
    float
    """
    d = stats.sums.shape[1] if dim is None else int(dim)
    n = stats.n_cells
    if n <= 0 or d <= 0:
        raise ValueError("shared variance needs at least one cell and one feature")
    return float(stats.inertia / (n * d))


def isotropic_posterior(X: np.ndarray, centroids: np.ndarray, variance: float) -> np.ndarray:
    """Cluster posterior under an equal-weight isotropic Gaussian mixture.

    ``p(k | x) = softmax_k(-||x - c_k||^2 / (2 variance))``, computed with
    log-sum-exp. The max over k serves as the domain confidence.

    Parameters
    ----------
    X : np.ndarray
        Embeddings, shape (N, D).
    centroids : np.ndarray
        Centroids, shape (K, D).
    variance : float
        Shared variance (> 0; 0 gives the hard one-hot assignment).

    Returns
    -------
    np.ndarray
        float64 (N, K); rows sum to 1.
    """
    X = as_2d_float(X, "X")
    c = check_centroids(centroids, X.shape[1])
    if not np.isfinite(variance) or variance < 0:
        raise ValueError(f"variance must be finite and >= 0, got {variance}")
    n, k = X.shape[0], c.shape[0]
    out = np.empty((n, k), dtype=np.float64)
    if variance == 0:
        labels, _ = assign_clusters(X, c)
        out[:] = 0.0
        out[np.arange(n), labels] = 1.0
        return out
    c_sq = np.einsum("kd,kd->k", c, c)
    for sl in row_chunks(n, X.shape[1] + 2 * k):
        Xc = np.asarray(X[sl], dtype=np.float64)
        # ||x||^2 is constant per row and cancels in the softmax
        logits = partial_distances(Xc, c, c_sq)
        logits *= -0.5 / variance
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        out[sl] = logits
    return out


# ------------------------------------------------------------ spatial smoothing
def refine_labels(labels: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """Majority vote of each cell's label among itself and its spatial neighbours.

    One pass, GraphST-style. Ties keep the cell's own label when it is among the
    tied ones, else take the lowest tied label.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels, shape (N,).
    neighbors : np.ndarray
        int64 (N, m) neighbour indices, padded with -1.

    Returns
    -------
    np.ndarray
        Refined labels, shape (N,), same dtype as ``labels``.
    """
    labels = np.asarray(labels)
    nbrs = np.asarray(neighbors, dtype=np.int64)
    n = labels.shape[0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("labels must be a 1-D integer array")
    if nbrs.ndim != 2 or nbrs.shape[0] != n:
        raise ValueError(f"neighbors must have shape ({n}, m), got {nbrs.shape}")
    if nbrs.size and (nbrs.max() >= n or nbrs.min() < -1):
        raise ValueError("neighbour indices must be in [0, N) or -1 for padding")
    valid = np.concatenate([np.ones((n, 1), dtype=bool), nbrs >= 0], axis=1)
    votes = np.concatenate([labels[:, None], labels[np.where(nbrs >= 0, nbrs, 0)]], axis=1)
    # support of each candidate = how many valid voters share its label; O(N m^2)
    # with small m, and works for arbitrary (not necessarily contiguous) labels
    support = np.zeros(votes.shape, dtype=np.int64)
    for j in range(votes.shape[1]):
        support += (votes == votes[:, j : j + 1]) & valid[:, j : j + 1]
    support[~valid] = -1
    best = support.max(axis=1)
    own_wins = support[:, 0] == best
    tied = support == best[:, None]
    lowest = np.where(tied, votes, np.iinfo(labels.dtype).max).min(axis=1)
    return np.where(own_wins, labels, lowest).astype(labels.dtype, copy=False)
