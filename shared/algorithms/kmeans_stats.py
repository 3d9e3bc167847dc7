"""Federated k-means, site side: nearest-centroid assignment and the per-cluster
sums and counts a site sends each iteration, merged and turned into centroids by
the server."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from fedspatial.shared.algorithms._kmeans_arrays import (
    as_2d_float,
    check_centroids,
    partial_distances,
    row_chunks,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ assignment
def assign_clusters(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Assign each cell to its nearest centroid.

    Parameters
    ----------
    X : np.ndarray
        Embeddings, shape (N, D); any float dtype (computed in float64).
    centroids : np.ndarray
        Centroids, shape (K, D).

    Returns
    -------
    labels : np.ndarray
        int64 (N,), index of the nearest centroid; ties go to the lowest index.
    sq_distances : np.ndarray
        float64 (N,), squared Euclidean distance to the assigned centroid.

    Notes
    -----
    Work is done in chunks of rows so that memory stays bounded for large N.
    """
    X = as_2d_float(X, "X")
    c = check_centroids(centroids, X.shape[1])
    n, k = X.shape[0], c.shape[0]
    c_sq = np.einsum("kd,kd->k", c, c)
    labels = np.empty(n, dtype=np.int64)
    sq_dist = np.empty(n, dtype=np.float64)
    for sl in row_chunks(n, 2 * X.shape[1] + k):
        Xc = np.asarray(X[sl], dtype=np.float64)
        lab = np.argmin(partial_distances(Xc, c, c_sq), axis=1)  # first minimum wins ties
        # exact distance to the winner, free of the expansion's cancellation
        diff = np.take(c, lab, axis=0)
        np.subtract(Xc, diff, out=diff)
        labels[sl] = lab
        sq_dist[sl] = np.einsum("nd,nd->n", diff, diff)
    return labels, sq_dist


# ----------------------------------------------------------- per-cluster stats
@dataclass
class ClusterStats:
    """What a site sends per k-means iteration (and what the server merges).

    Attributes
    ----------
    sums : np.ndarray
        float64 (K, D), sum of the cells assigned to each cluster.
    counts : np.ndarray
        float64 (K,), number of cells assigned to each cluster.
    inertia : float
        Sum of squared distances of the cells to their assigned centroid.
    n_changed : int or None, default None
        Number of cells whose cluster differs from the previous iteration's; None
        when unknown (then only the centroid-shift stopping rule can apply).
    """

    sums: np.ndarray
    counts: np.ndarray
    inertia: float
    n_changed: int | None = None

    @property
    def n_clusters(self) -> int:
        return int(self.sums.shape[0])

    @property
    def n_cells(self) -> float:
        return float(self.counts.sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for a Flower ``ArrayRecord`` (``n_changed`` None is encoded as -1)."""
        return {
            "sums": np.asarray(self.sums, dtype=np.float64),
            "counts": np.asarray(self.counts, dtype=np.float64),
            "inertia": np.array([self.inertia], dtype=np.float64),
            "n_changed": np.array(
                [-1 if self.n_changed is None else self.n_changed], dtype=np.int64
            ),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ClusterStats:
        """Inverse of :meth:`to_arrays`; ``n_changed`` is optional."""
        sums = np.asarray(arrays["sums"], dtype=np.float64)
        counts = np.asarray(arrays["counts"], dtype=np.float64).reshape(-1)
        if sums.ndim != 2 or sums.shape[0] != counts.shape[0]:
            raise ValueError(f"inconsistent shapes: sums {sums.shape}, counts {counts.shape}")
        n_changed = None
        if "n_changed" in arrays:
            value = int(np.asarray(arrays["n_changed"]).reshape(-1)[0])
            n_changed = None if value < 0 else value
        inertia = float(np.asarray(arrays["inertia"]).reshape(-1)[0])
        return cls(sums=sums, counts=counts, inertia=inertia, n_changed=n_changed)


def _stats_from_labels(
    X: np.ndarray, labels: np.ndarray, sq_dist: np.ndarray, k: int
) -> ClusterStats:
    n, d = X.shape
    sums = np.zeros((k, d), dtype=np.float64)
    for sl in row_chunks(n, 2 * d):
        lab = labels[sl]
        # sparse one-hot (K, n) @ X sums rows per cluster without a Python loop
        onehot = sparse.csr_matrix(
            (np.ones(lab.size), (lab, np.arange(lab.size))), shape=(k, lab.size)
        )
        sums += onehot @ np.asarray(X[sl], dtype=np.float64)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return ClusterStats(sums=sums, counts=counts, inertia=float(sq_dist.sum()))


def cluster_stats(
    X: np.ndarray,
    centroids: np.ndarray,
    *,
    previous_centroids: np.ndarray | None = None,
    previous_labels: np.ndarray | None = None,
) -> ClusterStats:
    """Per-cluster sums and counts of a site's cells (one k-means iteration).

    Parameters
    ----------
    X : np.ndarray
        The site's embeddings, shape (N, D).
    centroids : np.ndarray
        Current global centroids, shape (K, D).
    previous_centroids : np.ndarray or None, default None
        Centroids of the previous iteration. Lets a stateless site report how many
        of its cells changed cluster (needed for scikit-learn's strict convergence).
    previous_labels : np.ndarray or None, default None
        Alternative to ``previous_centroids`` for a site that kept its labels.

    Returns
    -------
    ClusterStats
        ``n_changed`` is N when no previous iteration is given (every cell is new).
    """
    X = as_2d_float(X, "X")
    c = check_centroids(centroids, X.shape[1])
    labels, sq_dist = assign_clusters(X, c)
    stats = _stats_from_labels(X, labels, sq_dist, c.shape[0])
    if previous_labels is None and previous_centroids is not None:
        previous_labels, _ = assign_clusters(X, previous_centroids)
    if previous_labels is None:
        stats.n_changed = int(X.shape[0])
    else:
        previous_labels = np.asarray(previous_labels)
        if previous_labels.shape != labels.shape:
            raise ValueError("previous_labels must have one entry per cell")
        stats.n_changed = int(np.count_nonzero(previous_labels != labels))
    return stats


def merge_cluster_stats(stats: Sequence[ClusterStats]) -> ClusterStats:
    """Sum site statistics (server side); ``n_changed`` is None if any site's is."""
    if len(stats) == 0:
        raise ValueError("no cluster statistics to merge")
    shapes = {s.sums.shape for s in stats}
    if len(shapes) != 1:
        raise ValueError(f"sites disagree on (K, D): {sorted(shapes)}")
    changed = [s.n_changed for s in stats]
    return ClusterStats(
        sums=np.sum([np.asarray(s.sums, dtype=np.float64) for s in stats], axis=0),
        counts=np.sum([np.asarray(s.counts, dtype=np.float64) for s in stats], axis=0),
        inertia=float(sum(s.inertia for s in stats)),
        n_changed=None if None in changed else sum(v for v in changed if v is not None),
    )


def update_centroids(stats: ClusterStats, previous: np.ndarray) -> np.ndarray:
    """Mean of each cluster; an empty cluster keeps its previous centroid.

    Parameters
    ----------
    stats : ClusterStats
        Merged statistics, computed with ``previous`` as centroids.
    previous : np.ndarray
        Centroids used for the assignment, shape (K, D).

    Returns
    -------
    np.ndarray
        New centroids, float64 (K, D).
    """
    new = np.array(previous, dtype=np.float64, copy=True)
    if new.shape != stats.sums.shape:
        raise ValueError(f"previous centroids {new.shape} do not match stats {stats.sums.shape}")
    filled = stats.counts > 0
    new[filled] = stats.sums[filled] / stats.counts[filled, None]
    if not filled.all():
        logger.debug("%d empty cluster(s) keep their centroid", int((~filled).sum()))
    return new
