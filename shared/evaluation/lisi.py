"""Local Inverse Simpson Index (Korsunsky et al. 2019): batch mixing and label separation
around each cell (:func:`lisi`), summarized as scib's :func:`ilisi` and :func:`clisi`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from fedspatial.shared.evaluation.embedding_inputs import category_codes, check_embedding, knn

__all__ = ["clisi", "ilisi", "lisi"]

# Binary search of the kernel precision, as Korsunsky's LISI (and harmonypy).
_LISI_TOL = 1e-5
_LISI_MAX_STEPS = 50


def _calibrated_weights(distances: np.ndarray, perplexity: float) -> tuple[np.ndarray, np.ndarray]:
    """Kernel weights ``exp(-beta d)`` per cell with entropy ``log(perplexity)``.

    The same bisection on beta as Korsunsky's LISI, run for all cells at once;
    a cell stops at the first step within tolerance, like the per-cell loop.
    Returns the normalized weights and the entropies.
    """
    n, k = distances.shape
    log_u = math.log(perplexity)
    beta = np.ones(n)
    beta_min = np.full(n, -np.inf)
    beta_max = np.full(n, np.inf)
    weights = np.zeros((n, k))
    entropy = np.zeros(n)
    active = np.arange(n)
    for _ in range(_LISI_MAX_STEPS):
        if active.size == 0:
            break
        d, b = distances[active], beta[active]
        p = np.exp(-d * b[:, None])
        total = p.sum(axis=1)
        ok = total > 0
        safe = np.where(ok, total, 1.0)
        h = np.where(ok, np.log(safe) + b * (d * p).sum(axis=1) / safe, 0.0)
        weights[active] = np.where(ok[:, None], p / safe[:, None], 0.0)
        entropy[active] = h
        diff = h - log_u
        going = np.abs(diff) >= _LISI_TOL
        up = going & (diff > 0)  # too flat: sharpen the kernel
        down = going & ~(diff > 0)
        iu, idn = active[up], active[down]
        beta_min[iu] = b[up]
        beta[iu] = np.where(np.isfinite(beta_max[iu]), (b[up] + beta_max[iu]) / 2, b[up] * 2)
        beta_max[idn] = b[down]
        beta[idn] = np.where(np.isfinite(beta_min[idn]), (b[down] + beta_min[idn]) / 2, b[down] / 2)
        active = active[going]
    return weights, entropy


def lisi(
    Z: np.ndarray,
    categories: np.ndarray | Sequence,
    *,
    perplexity: float = 30.0,
    n_neighbors: int | None = None,
    cells: np.ndarray | None = None,
    neighbors: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Local Inverse Simpson Index of ``categories`` around each cell.

    Korsunsky et al. (2019): the cell's ``n_neighbors`` nearest other cells are
    weighted by a Gaussian-type kernel ``exp(-beta * distance)`` whose precision is
    calibrated to the given perplexity; LISI is ``1 / sum_c p_c^2`` with ``p_c``
    the weight of category ``c``. Ranges from 1 (one category) to the number of
    categories. Equals ``harmonypy.compute_lisi`` (up to ties among neighbours).

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    categories : array-like
        Category of each cell (n,), any labels.
    perplexity : float, default 30.0
        Effective number of neighbours.
    n_neighbors : int or None, default None
        Neighbours searched; None is ``3 * perplexity`` as in Korsunsky's code.
    cells : np.ndarray or None, default None
        Score only these cells (row indices); their neighbours are still searched
        among all cells, so each score is the exact LISI of that cell.
    neighbors : (distances, indices) or None, default None
        ``knn(Z, n_neighbors, cells)`` when already computed (shared by iLISI and cLISI).

    Returns
    -------
    np.ndarray
        LISI per cell (of ``cells``, in their order); NaN where the kernel vanishes
        (all neighbours too far).
    """
    codes, n_categories = category_codes(categories, "categories")
    Z = check_embedding(Z, codes.size)
    k = int(3 * perplexity) if n_neighbors is None else int(n_neighbors)
    distances, indices = neighbors if neighbors is not None else knn(Z, k, cells)
    weights, entropy = _calibrated_weights(distances, perplexity)
    n = indices.shape[0]
    # Weight of each category per cell in one bincount over (cell, category) pairs.
    pairs = (np.arange(n)[:, None] * n_categories + codes[indices]).ravel()
    per_category = np.bincount(pairs, weights=weights.ravel(), minlength=n * n_categories)
    simpson = (per_category.reshape(n, n_categories) ** 2).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.where((entropy != 0) & (simpson > 0), 1.0 / simpson, np.nan)


def _scaled_median_lisi(
    Z: np.ndarray,
    categories: np.ndarray | Sequence,
    name: str,
    n_neighbors: int,
    scale: Callable[[np.floating, int], np.floating],
    cells: np.ndarray | None,
    neighbors: tuple[np.ndarray, np.ndarray] | None,
) -> float:
    """``scale(median LISI, number of categories)``; NaN with fewer than two categories.

    The LISI uses ``n_neighbors`` neighbours per cell and a third of it as perplexity;
    the median is over ``cells`` (all cells when None).
    """
    _, n_categories = category_codes(categories, name)
    if n_categories < 2:
        return float("nan")
    scores = lisi(
        Z, categories, perplexity=n_neighbors / 3, n_neighbors=n_neighbors, cells=cells, neighbors=neighbors
    )
    return float(scale(np.nanmedian(scores), n_categories))


def ilisi(
    Z: np.ndarray,
    batches: np.ndarray | Sequence,
    *,
    n_neighbors: int = 90,
    cells: np.ndarray | None = None,
    neighbors: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Batch mixing: median LISI of the batches scaled ``(median - 1) / (B - 1)``.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d) whose batch mixing is scored.
    batches : array-like
        Batch of each cell (n,).
    n_neighbors : int, default 90
        Neighbours per cell; the perplexity is a third of it (30).
    cells, neighbors : optional
        Median over these cells only, and their precomputed kNN (see :func:`lisi`).

    Returns
    -------
    float
        1 for perfect mixing, 0 for separated batches; NaN with one batch.
    """
    return _scaled_median_lisi(
        Z, batches, "batches", n_neighbors, lambda median, n: (median - 1) / (n - 1), cells, neighbors
    )


def clisi(
    Z: np.ndarray,
    labels: np.ndarray | Sequence,
    *,
    n_neighbors: int = 90,
    cells: np.ndarray | None = None,
    neighbors: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Label separation: median LISI of the labels scaled ``(L - median) / (L - 1)``.

    ``labels`` are the label (cell type, domain) of each cell (n,); ``Z`` and
    ``n_neighbors``, ``cells`` and ``neighbors`` as for :func:`ilisi`. Returns 1 when each cell's neighbourhood
    holds one label, NaN with one label.
    """
    return _scaled_median_lisi(
        Z, labels, "labels", n_neighbors, lambda median, n: (n - median) / (n - 1), cells, neighbors
    )
