"""Per-cell ``normalize_total`` and ``log1p``, as scanpy computes them (in float64).

:func:`normalize_log` is the public form; the float64 steps are shared with the
aggregates (:mod:`fedspatial.shared.features.feature_stats`) and with
:func:`fedspatial.shared.features.selection.transform`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

__all__ = [
    "as_matrix",
    "check_target_sum",
    "log1p_matrix",
    "normalize_log",
    "normalize_total_f64",
]


def check_target_sum(target_sum: Any) -> float:
    """``target_sum`` as a float; ValueError unless it is a positive finite number."""
    try:
        value = float(target_sum)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(target_sum, bool) or not np.isfinite(value) or value <= 0:
        msg = f"target_sum must be a positive finite number; got {target_sum!r}."
        raise ValueError(msg)
    return value


def as_matrix(x: Any) -> np.ndarray | sparse.csr_matrix:
    """A canonical CSR matrix (sparse input) or a 2-D ndarray (anything else)."""
    if sparse.issparse(x):
        csr = sparse.csr_matrix(x)
        csr.sum_duplicates()
        return csr
    arr = np.asarray(x)
    if arr.ndim != 2:
        msg = f"expected a 2-D (cells x features) matrix; got shape {arr.shape}."
        raise ValueError(msg)
    return arr


def normalize_total_f64(
    x: np.ndarray | sparse.csr_matrix, target_sum: float
) -> np.ndarray | sparse.csr_matrix:
    """``normalize_total`` in float64: each cell scaled to ``target_sum`` (zero cells stay 0)."""
    if isinstance(x, sparse.csr_matrix):
        data = np.asarray(x.data, dtype=np.float64)
        if data.size and data.min() < 0:
            msg = "normalization expects non-negative counts; found negative values."
            raise ValueError(msg)
        counts = np.bincount(
            np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)), weights=data, minlength=x.shape[0]
        )
        scale = counts / target_sum
        scale[scale == 0] = 1.0
        out = sparse.csr_matrix(
            (data / np.repeat(scale, np.diff(x.indptr)), x.indices.copy(), x.indptr.copy()),
            shape=x.shape,
        )
        return out
    dense = np.asarray(x, dtype=np.float64)
    if dense.size and dense.min() < 0:
        msg = "normalization expects non-negative counts; found negative values."
        raise ValueError(msg)
    scale = dense.sum(axis=1) / target_sum
    scale[scale == 0] = 1.0
    return dense / scale[:, None]


def log1p_matrix(x: np.ndarray | sparse.csr_matrix) -> np.ndarray | sparse.csr_matrix:
    """``log1p`` of every stored value (CSR stays CSR)."""
    if isinstance(x, sparse.csr_matrix):
        return sparse.csr_matrix((np.log1p(x.data), x.indices, x.indptr), shape=x.shape)
    return np.log1p(x)


def normalize_log(x: Any, *, target_sum: float) -> np.ndarray | sparse.csr_matrix:
    """Per-cell ``normalize_total`` to ``target_sum`` followed by ``log1p``.

    Equals ``sc.pp.normalize_total(adata, target_sum=target_sum)`` followed by
    ``sc.pp.log1p(adata)`` (computed in float64, then cast).

    Parameters
    ----------
    x
        Counts, cells x features: a SciPy sparse matrix or an array-like.
    target_sum
        Total of every cell after normalization (e.g. ``1e4``). Cells whose total is
        zero stay zero.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix
        Same kind as the input (sparse input gives CSR). ``float64`` for ``float64``
        input, ``float32`` otherwise (integers included, as in scanpy).
    """
    target = check_target_sum(target_sum)
    mat = as_matrix(x)
    dtype = np.float64 if mat.dtype == np.float64 else np.float32
    out = log1p_matrix(normalize_total_f64(mat, target))
    return out.astype(dtype)
