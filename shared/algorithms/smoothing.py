"""Spatial smoothing of per-cell embeddings (local DP's replacement for a graph encoder).

Under ``privacy.local-dp`` the encoder embeds each cell alone, so that DP k-means can
bound what one cell changes. The final assignment of a cell to a domain may still use
its neighbourhood: each site smooths its embedding over its own spatial graph at home
(nothing smoothed is released), and matches the smoothed vectors to the federation's
unit-length DP centroids by nearest centroid (equivalently: largest cosine).
"""

from __future__ import annotations

import numpy as np

__all__ = ["smooth_embedding"]


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def smooth_embedding(z: np.ndarray, neighbors: np.ndarray, *, hops: int = 1) -> np.ndarray:
    """Neighbourhood mean of unit embeddings, renormalized: ``hops`` times.

    One hop: ``s_i = unit(unit(z_i) + sum_j unit(z_j))`` over the valid neighbours
    ``j`` of ``i`` (the mean and the sum have the same direction). A cell without
    neighbours keeps its own unit vector; an all-zero row (or a neighbourhood whose
    vectors cancel) stays zero.

    Parameters
    ----------
    z
        ``[N, d]`` per-cell embeddings (any float dtype).
    neighbors
        int64 ``[N, k]`` row ids within the site of each cell's spatial neighbours, ``-1``
        for padding (``GraphData.neighbors``); ``k`` may be 0.
    hops
        Repetitions (>= 0; 0 only normalizes): each widens the neighbourhood by one ring.

    Returns
    -------
    np.ndarray
        float64 ``[N, d]``, unit rows (zero where noted above).
    """
    x = np.asarray(z, dtype=np.float64)
    nbrs = np.asarray(neighbors)
    if x.ndim != 2:
        raise ValueError(f"z must be [N, d], got shape {x.shape}")
    if nbrs.ndim != 2 or nbrs.shape[0] != x.shape[0] or not np.issubdtype(nbrs.dtype, np.integer):
        raise ValueError(f"neighbors must be an integer array [{x.shape[0]}, k], got {nbrs.dtype} {nbrs.shape}")
    if nbrs.size and (nbrs.min() < -1 or nbrs.max() >= x.shape[0]):
        raise ValueError(f"neighbour ids must be in [0, {x.shape[0]}) or -1 for padding")
    if hops < 0:
        raise ValueError(f"hops must be >= 0, got {hops}")
    valid = nbrs >= 0
    safe = np.where(valid, nbrs, 0)
    out = _unit(x)
    for _ in range(hops):
        total = out.copy()
        for j in range(nbrs.shape[1]):  # one neighbour column at a time: O(N d) memory, not O(N k d)
            total += np.where(valid[:, j : j + 1], out[safe[:, j]], 0.0)
        out = _unit(total)
    return out
