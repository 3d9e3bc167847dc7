"""What the integration metrics read: a checked embedding, integer codes of its
annotations, and each cell's nearest other cells."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.neighbors import NearestNeighbors

__all__ = ["category_codes", "check_embedding", "knn"]


def category_codes(values: np.ndarray | Sequence, name: str) -> tuple[np.ndarray, int]:
    """Integer codes 0..n-1 for any labels (sorted order), and n."""
    arr = np.asarray(values).reshape(-1)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} has missing values")
    uniques, codes = np.unique(arr, return_inverse=True)
    return codes.reshape(-1), len(uniques)


def check_embedding(Z: np.ndarray, n: int | None = None) -> np.ndarray:
    """``Z`` as a finite float64 (cells x dims) array, with ``n`` cells when given."""
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2:
        raise ValueError(f"Z must be 2-D (cells x dims), got shape {Z.shape}")
    if n is not None and Z.shape[0] != n:
        raise ValueError(f"Z has {Z.shape[0]} cells, the annotations {n}")
    if not np.isfinite(Z).all():
        raise ValueError("Z must be finite")
    return Z


def knn(Z: np.ndarray, n_neighbors: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's nearest other cells (Euclidean), itself excluded.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    n_neighbors : int
        k; reduced to n - 1 when there are fewer cells.
    rows : np.ndarray or None, default None
        Only these cells' neighbours (searched among all n cells); None: every cell.

    Returns
    -------
    distances : np.ndarray
        (len(rows) or n, k) increasing Euclidean distances.
    indices : np.ndarray
        (len(rows) or n, k) neighbour indices (into all n cells).

    Notes
    -----
    scikit-learn picks the search (brute force for embeddings of tens of dimensions,
    where trees are slower): O(queries x n) time, distances computed in blocks of
    scikit-learn's ``working_memory``. Self is removed as scikit-learn does for
    ``kneighbors()``: the query's own row, or the farthest candidate where duplicates
    hide it.
    """
    Z = check_embedding(Z)
    k = min(int(n_neighbors), Z.shape[0] - 1)
    if k < 1:
        raise ValueError("need at least two cells")
    search = NearestNeighbors(n_neighbors=k).fit(Z)
    if rows is None:
        return search.kneighbors()
    rows = np.asarray(rows, dtype=np.int64)
    distances, indices = search.kneighbors(Z[rows], n_neighbors=k + 1)
    is_self = indices == rows[:, None]
    # drop the query itself, or the last column where a duplicate point pushed it out
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.arange(k + 1)[None, :] != drop[:, None]
    return distances[keep].reshape(-1, k), indices[keep].reshape(-1, k)
