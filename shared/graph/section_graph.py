"""Neighbour lists within one section: the ``k`` nearest points, or all within a radius.

Lists are dense ``int64`` arrays ``(N, m)`` padded with ``-1``, nearest neighbour first,
ties (equal distances) broken by the lower point index. Candidates come from a KD-tree
and are ranked on distances recomputed here, identically for all points.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from scipy.spatial import cKDTree

from fedspatial.shared.graph.parameter_checks import (
    check_coords,
    check_positive_int,
    check_radius,
)

__all__ = [
    "GraphMethod",
    "knn_neighbors",
    "pair_distances",
    "radius_neighbors",
    "section_neighbors",
]

logger = logging.getLogger(__name__)

GraphMethod = Literal["knn", "radius"]

# Relative slack used when asking the KD-tree for candidates, so that points whose
# distance equals a boundary distance up to floating-point rounding are never missed.
# Candidates are then ranked on distances recomputed here, identically for all points.
_REL_SLACK = 1e-9


def _abs_slack(coords: np.ndarray) -> float:
    """Absolute slack proportional to the coordinate magnitude (handles zero distances)."""
    scale = float(np.abs(coords).max()) if coords.size else 0.0
    return 1e-12 * (scale + 1.0)


def pair_distances(coords: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Euclidean distances between ``coords[i]`` and ``coords[j]`` (broadcasting)."""
    diff = coords[j] - coords[i]
    return np.sqrt(np.sum(diff * diff, axis=-1))


def _sorted_candidates(
    tree: cKDTree, coords: np.ndarray, rows: np.ndarray, n_query: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_query`` KD-tree candidates of each point in ``rows``, self removed.

    Candidates are ranked by recomputed distance, then index; the point itself is
    moved to the end with distance ``inf``. Returns ``(candidates, distances)``.
    """
    n = coords.shape[0]
    _, cand = tree.query(coords[rows], k=list(range(1, n_query + 1)))
    cand = np.asarray(cand, dtype=np.int64)
    owner = np.broadcast_to(rows[:, None], cand.shape)
    d = pair_distances(coords, owner, cand)
    is_self = cand == owner
    d = np.where(is_self, np.inf, d)
    order = np.lexsort((np.where(is_self, n, cand), d), axis=1)
    return np.take_along_axis(cand, order, axis=1), np.take_along_axis(d, order, axis=1)


# --------------------------------------------------------------------------- kNN
def knn_neighbors(coords: np.ndarray, n_neighbors: int) -> np.ndarray:
    """The ``n_neighbors`` nearest other points of every point.

    Parameters
    ----------
    coords
        Coordinates of one section, shape ``(N, d)``.
    n_neighbors
        Number of neighbours ``k`` per point (``>= 1``).

    Returns
    -------
    numpy.ndarray
        ``int64`` array of shape ``(N, k)``: row ``i`` lists the indices of the ``k``
        points nearest to point ``i``, the point itself excluded, nearest first;
        equal distances are ordered by the lower index. When the section has fewer
        than ``k + 1`` points (``N - 1 < k``) the missing slots are ``-1``.
        Coincident points (distance 0) count as neighbours of each other.
    """
    coords = check_coords(coords)
    k = check_positive_int(n_neighbors, "n_neighbors")
    n = coords.shape[0]
    out = np.full((n, k), -1, dtype=np.int64)
    if n <= 1:
        return out
    k_eff = min(k, n - 1)
    tree = cKDTree(coords)
    slack = _abs_slack(coords)
    rows = np.arange(n, dtype=np.int64)
    # self + k neighbours + one extra candidate to detect ties at the k-th distance
    n_query = min(n, k_eff + 2)
    while rows.size:
        cand, d = _sorted_candidates(tree, coords, rows, n_query)
        out[rows, :k_eff] = cand[:, :k_eff]
        if n_query == n:
            break
        # When the farthest candidate ties with the k-th neighbour, other points at
        # that distance (possibly with a lower index) may have been left out: ask
        # again for those rows with twice as many candidates.
        d_k = d[:, k_eff - 1]
        d_far = np.where(np.isfinite(d), d, -np.inf).max(axis=1)
        tied = d_far <= d_k * (1 + _REL_SLACK) + slack
        rows = rows[tied]
        n_query = min(n, 2 * n_query)
        if rows.size:
            logger.debug(
                "knn_neighbors: %d point(s) tie at the k-th distance; re-querying with %d",
                rows.size,
                n_query,
            )
    return out


# --------------------------------------------------------------------------- radius
def _radius_edges(coords: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs ``(i, j)``, ``i != j``, with distance ``<= radius``.

    Returns ``(i, j, dist)`` sorted by ``i``, then distance, then ``j``.
    """
    n = coords.shape[0]
    empty = np.empty(0, dtype=np.int64)
    if n <= 1:
        return empty, empty, np.empty(0, dtype=np.float64)
    tree = cKDTree(coords)
    pairs = tree.query_pairs(radius * (1 + _REL_SLACK) + _abs_slack(coords), output_type="ndarray")
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    dist = pair_distances(coords, src, dst)
    keep = dist <= radius
    src, dst, dist = src[keep], dst[keep], dist[keep]
    order = np.lexsort((dst, dist, src))
    return src[order], dst[order], dist[order]


def radius_neighbors(
    coords: np.ndarray, radius: float, *, max_neighbors: int | None = None
) -> np.ndarray:
    """All other points within ``radius`` of every point.

    Parameters
    ----------
    coords
        Coordinates of one section, shape ``(N, d)``.
    radius
        Neighbourhood radius (``> 0``); a point at distance exactly ``radius`` is a
        neighbour.
    max_neighbors
        Upper bound on the degree. When given, only the ``max_neighbors`` nearest
        points within ``radius`` are kept (ties by the lower index) and the output
        has exactly ``max_neighbors`` columns. A bounded degree is what node-level
        differential privacy needs. Default ``None`` (unbounded).

    Returns
    -------
    numpy.ndarray
        ``int64`` array of shape ``(N, m)``, nearest first, padded with ``-1``;
        ``m`` is the largest degree found, or ``max_neighbors`` when given.
    """
    coords = check_coords(coords)
    r = check_radius(radius)
    cap = None if max_neighbors is None else check_positive_int(max_neighbors, "max_neighbors")
    n = coords.shape[0]
    src, dst, _ = _radius_edges(coords, r)
    degree = np.bincount(src, minlength=n)
    # position of each edge within its source row (edges are grouped by src)
    starts = np.concatenate([[0], np.cumsum(degree)[:-1]]) if n else np.empty(0, np.int64)
    pos = np.arange(src.size, dtype=np.int64) - np.repeat(starts, degree)
    width = int(degree.max()) if (cap is None and n) else (cap or 0)
    if cap is not None:
        keep = pos < cap
        src, dst, pos = src[keep], dst[keep], pos[keep]
    out = np.full((n, width), -1, dtype=np.int64)
    out[src, pos] = dst
    return out


# --------------------------------------------------------------------------- dispatcher
def section_neighbors(
    coords: np.ndarray,
    *,
    method: GraphMethod = "knn",
    n_neighbors: int = 6,
    radius: float | None = None,
    max_neighbors: int | None = None,
) -> np.ndarray:
    """Neighbour lists of one section, by kNN or by radius.

    Parameters
    ----------
    coords
        The section's coordinates ``(N, d)``, as for :func:`knn_neighbors`.
    method
        ``"knn"`` (default): the ``n_neighbors`` nearest points
        (:func:`knn_neighbors`). ``"radius"``: all points within ``radius``
        (:func:`radius_neighbors`).
    n_neighbors
        Number of neighbours for ``method="knn"``; ignored for ``"radius"``. Default 6.
    radius
        Radius for ``method="radius"`` (required there); must be ``None`` for
        ``"knn"``. Default ``None``.
    max_neighbors
        Degree bound. For ``"radius"`` the nearest ``max_neighbors`` are kept; for
        ``"knn"`` the degree already is ``n_neighbors``, so ``max_neighbors`` must be
        ``None`` or ``>= n_neighbors``. Default ``None``.

    Returns
    -------
    numpy.ndarray
        ``int64`` array ``(N, m)`` padded with ``-1``, nearest first.

    Raises
    ------
    ValueError
        On an unknown method or inconsistent / invalid parameters.
    """
    if max_neighbors is not None:
        max_neighbors = check_positive_int(max_neighbors, "max_neighbors")
    if method == "knn":
        k = check_positive_int(n_neighbors, "n_neighbors")
        if radius is not None:
            msg = (
                "radius is only used with method='radius'; pass radius=None with "
                f"method='knn' (got radius={radius!r})."
            )
            raise ValueError(msg)
        if max_neighbors is not None and max_neighbors < k:
            msg = (
                f"with method='knn' every node has n_neighbors={k} neighbours, which "
                f"exceeds max_neighbors={max_neighbors}; lower n_neighbors instead."
            )
            raise ValueError(msg)
        return knn_neighbors(coords, k)
    if method == "radius":
        if radius is None:
            msg = "method='radius' requires a radius (a positive number)."
            raise ValueError(msg)
        return radius_neighbors(coords, check_radius(radius), max_neighbors=max_neighbors)
    msg = f"Unknown graph method {method!r}; expected 'knn' or 'radius'."
    raise ValueError(msg)

