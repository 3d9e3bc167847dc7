"""Array checks and row chunking shared by the k-means modules (private to them)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Working memory per chunk of cells; keeps N ~ 1e6 cells cheap in RAM.
CHUNK_BYTES = 64 * 2**20


def as_2d_float(X: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    return arr


def check_centroids(centroids: np.ndarray, dim: int) -> np.ndarray:
    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"centroids must have shape (K>0, D), got {c.shape}")
    if c.shape[1] != dim:
        raise ValueError(f"centroids have {c.shape[1]} features, data has {dim}")
    return c


def row_chunks(n_rows: int, floats_per_row: int) -> Iterator[slice]:
    """Slices of rows such that each chunk uses about ``CHUNK_BYTES`` of float64."""
    step = max(1, CHUNK_BYTES // (8 * max(floats_per_row, 1)))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def partial_distances(Xc: np.ndarray, centroids: np.ndarray, c_sq: np.ndarray) -> np.ndarray:
    """``||c||^2 - 2 x.c`` (squared distance minus ``||x||^2``), as scikit-learn's Lloyd.

    Using the same expansion as scikit-learn keeps argmin decisions identical to it.
    """
    d = Xc @ centroids.T
    d *= -2.0
    d += c_sq
    return d
