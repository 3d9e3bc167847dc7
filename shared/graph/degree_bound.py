"""Bounding how many neighbour lists a point appears in (node-level differential privacy)."""

from __future__ import annotations

import logging

import numpy as np

from fedspatial.shared.graph.parameter_checks import check_positive_int

__all__ = ["bound_in_degree", "in_degree"]

logger = logging.getLogger(__name__)


def in_degree(neighbors: np.ndarray) -> np.ndarray:
    """How many neighbour lists each point appears in (``-1`` padding ignored)."""
    nb = np.asarray(neighbors, dtype=np.int64)
    return np.bincount(nb[nb >= 0], minlength=nb.shape[0])


def bound_in_degree(neighbors: np.ndarray, max_in_degree: int) -> np.ndarray:
    """Drop edges so that every point appears in at most ``max_in_degree`` neighbour lists.

    Node-level differential privacy needs a bound on how many training samples (ego
    neighbourhoods) one cell can influence: its own plus every list it appears in. kNN
    bounds the out-degree only; a cell in a dense spot can be the neighbour of many.

    Each point ``v`` stays in the lists where it ranks nearest (lowest column), ties
    broken by the lower row index, up to ``max_in_degree`` of them; it is removed from
    the others. Kept neighbours move forward so that each row stays nearest first,
    padded with ``-1`` at the end. The rule is local to ``v``'s incoming edges, so the
    result does not depend on the order of the points.

    Parameters
    ----------
    neighbors
        ``int64 (N, m)`` neighbour lists padded with ``-1`` (:func:`section_neighbors`).
    max_in_degree
        Largest number of lists a point may appear in (``>= 1``).

    Returns
    -------
    numpy.ndarray
        ``int64 (N, m)``: a subset of each row, same order, padded with ``-1``.
    """
    cap = check_positive_int(max_in_degree, "max_in_degree")
    nb = np.asarray(neighbors, dtype=np.int64)
    if nb.ndim != 2:
        msg = f"neighbors must be a 2-D array (n_nodes, max_degree); got shape {nb.shape}."
        raise ValueError(msg)
    rows, cols = np.nonzero(nb >= 0)
    targets = nb[rows, cols]
    # incoming edges of each target, nearest rank first, then lower row index
    order = np.lexsort((rows, cols, targets))
    rows, cols, targets = rows[order], cols[order], targets[order]
    first = np.searchsorted(targets, targets, side="left")
    rank = np.arange(targets.size) - first
    drop = rank >= cap
    out = nb.copy()
    out[rows[drop], cols[drop]] = -1
    # compact each row: kept entries first, in their original (nearest-first) order
    keep = out >= 0
    position = np.argsort(~keep, axis=1, kind="stable")
    out = np.take_along_axis(out, position, axis=1)
    if drop.any():
        logger.debug("bound_in_degree: removed %d of %d edges (cap %d)", int(drop.sum()), targets.size, cap)
    return out

