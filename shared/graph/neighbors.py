"""Spatial neighbour graphs, built per tissue section.

Every graph in fedspatial is built *within* one section: cells of different
sections (and, a fortiori, of different sites) are never connected. The
functions below work on the coordinates of a single section; :func:`spatial_neighbors`
applies them to an :class:`~anndata.AnnData`, optionally split by a section column.

Neighbour lists are dense ``int64`` arrays of shape ``(N, m)`` padded with ``-1``,
nearest neighbour first, ties (equal distances) broken by the lower point index.
They convert to a PyTorch Geometric ``edge_index`` with
:func:`neighbors_to_edge_index`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "bound_in_degree",
    "in_degree",
    "knn_neighbors",
    "neighbors_to_edge_index",
    "radius_neighbors",
    "section_neighbors",
    "spatial_neighbors",
]

logger = logging.getLogger(__name__)

GraphMethod = Literal["knn", "radius"]

# Relative slack used when asking the KD-tree for candidates, so that points whose
# distance equals a boundary distance up to floating-point rounding are never missed.
# Candidates are then ranked on distances recomputed here, identically for all points.
_REL_SLACK = 1e-9


# --------------------------------------------------------------------------- helpers
def _check_coords(coords: Any) -> np.ndarray:
    """Return ``coords`` as a finite float64 array of shape ``(N, d)``."""
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2:
        msg = f"coords must be a 2-D array of shape (n_points, n_dims); got shape {arr.shape}."
        raise ValueError(msg)
    if arr.shape[1] < 1:
        msg = "coords must have at least one spatial dimension."
        raise ValueError(msg)
    if not np.all(np.isfinite(arr)):
        n_bad = int((~np.isfinite(arr)).any(axis=1).sum())
        msg = f"coords contain non-finite values (NaN or inf) in {n_bad} point(s)."
        raise ValueError(msg)
    return arr


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"{name} must be a positive integer; got {value!r}."
        raise ValueError(msg)
    return int(value)


def _check_radius(radius: Any) -> float:
    if isinstance(radius, bool):
        msg = f"radius must be a positive finite number; got {radius!r}."
        raise ValueError(msg)
    try:
        r = float(radius)
    except (TypeError, ValueError):
        msg = f"radius must be a positive finite number; got {radius!r}."
        raise ValueError(msg) from None
    if not np.isfinite(r) or r <= 0:
        msg = f"radius must be a positive finite number; got {radius!r}."
        raise ValueError(msg)
    return r


def _abs_slack(coords: np.ndarray) -> float:
    """Absolute slack proportional to the coordinate magnitude (handles zero distances)."""
    scale = float(np.abs(coords).max()) if coords.size else 0.0
    return 1e-12 * (scale + 1.0)


def _distances(coords: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
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
    d = _distances(coords, owner, cand)
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
    coords = _check_coords(coords)
    k = _check_positive_int(n_neighbors, "n_neighbors")
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
    dist = _distances(coords, src, dst)
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
    coords = _check_coords(coords)
    r = _check_radius(radius)
    cap = None if max_neighbors is None else _check_positive_int(max_neighbors, "max_neighbors")
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


# --------------------------------------------------------------------------- degree bound
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
    cap = _check_positive_int(max_in_degree, "max_in_degree")
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
        Coordinates of one section, shape ``(N, d)``.
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
        max_neighbors = _check_positive_int(max_neighbors, "max_neighbors")
    if method == "knn":
        k = _check_positive_int(n_neighbors, "n_neighbors")
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
        return radius_neighbors(coords, _check_radius(radius), max_neighbors=max_neighbors)
    msg = f"Unknown graph method {method!r}; expected 'knn' or 'radius'."
    raise ValueError(msg)


# --------------------------------------------------------------------------- PyG
def neighbors_to_edge_index(neighbors: np.ndarray) -> np.ndarray:
    """Convert padded neighbour lists to a PyTorch Geometric ``edge_index``.

    Parameters
    ----------
    neighbors
        Integer array ``(N, m)`` as returned by :func:`section_neighbors`; ``-1``
        marks padding.

    Returns
    -------
    numpy.ndarray
        ``int64`` array ``(2, E)`` in PyG's ``source_to_target`` flow: row 0 holds
        the neighbour ``j`` (message source), row 1 the node ``i`` whose neighbour
        list contains it (message target). Edges are ordered by ``i``, then by the
        column of ``j`` in ``neighbors[i]`` (nearest first).
    """
    nb = np.asarray(neighbors)
    if nb.ndim != 2:
        msg = f"neighbors must be a 2-D array (n_nodes, max_degree); got shape {nb.shape}."
        raise ValueError(msg)
    if nb.size and not np.issubdtype(nb.dtype, np.integer):
        msg = f"neighbors must hold integers; got dtype {nb.dtype}."
        raise ValueError(msg)
    nb = nb.astype(np.int64, copy=False)
    n = nb.shape[0]
    if nb.size and (nb.min() < -1 or nb.max() >= n):
        msg = f"neighbor indices must lie in [0, {n}) or be -1 (padding)."
        raise ValueError(msg)
    target, col = np.nonzero(nb >= 0)
    source = nb[target, col]
    return np.stack([source, target.astype(np.int64)]).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- AnnData
def spatial_neighbors(
    adata: AnnData,
    *,
    spatial_key: str = "spatial",
    library_key: str | None = None,
    method: GraphMethod = "knn",
    n_neighbors: int = 6,
    radius: float | None = None,
    max_neighbors: int | None = None,
    key_added: str = "spatial",
    copy: bool = False,
) -> AnnData | None:
    """Build the spatial neighbour graph of an AnnData, section by section.

    Parameters
    ----------
    adata
        Annotated data with coordinates in ``adata.obsm[spatial_key]``.
    spatial_key
        Key of the coordinates in ``adata.obsm``. Default ``"spatial"``.
    library_key
        Column of ``adata.obs`` naming the section of each observation. The graph is
        built within each section and never connects two sections. Default ``None``:
        the whole ``adata`` is one section.
    method, n_neighbors, radius, max_neighbors
        See :func:`section_neighbors`. Defaults ``"knn"``, 6, ``None``, ``None``.
    key_added
        Prefix of the keys written. Default ``"spatial"``.
    copy
        Return a modified copy instead of writing into ``adata``. Default ``False``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy=True``, otherwise ``None``. Writes the fields

        ``adata.obsp[f"{key_added}_connectivities"]``
            :class:`scipy.sparse.csr_matrix` ``float32`` ``(n_obs, n_obs)``: entry
            ``(i, j)`` is 1.0 when ``j`` is a neighbour of ``i`` (row ``i`` is the
            neighbour list of ``i``; kNN graphs are not symmetrised).
        ``adata.obsp[f"{key_added}_distances"]``
            :class:`scipy.sparse.csr_matrix` ``float64`` with the euclidean distance
            at the same positions (coincident points are stored as explicit zeros).
        ``adata.uns[f"{key_added}_neighbors"]``
            ``dict`` with ``"connectivities_key"``, ``"distances_key"`` and
            ``"params"`` (``method``, ``spatial_key``, and those of ``n_neighbors``,
            ``radius``, ``max_neighbors``, ``library_key`` that apply / are set).
    """
    if spatial_key not in adata.obsm:
        msg = (
            f"adata.obsm[{spatial_key!r}] not found; available obsm keys: "
            f"{sorted(adata.obsm.keys())}."
        )
        raise KeyError(msg)
    coords = _check_coords(np.asarray(adata.obsm[spatial_key]))
    n = adata.n_obs
    # validate the graph parameters once, even when there is nothing to connect
    section_neighbors(
        coords[:0],
        method=method,
        n_neighbors=n_neighbors,
        radius=radius,
        max_neighbors=max_neighbors,
    )

    if library_key is None:
        groups = [np.arange(n, dtype=np.int64)]
    else:
        if library_key not in adata.obs.columns:
            msg = f"adata.obs[{library_key!r}] not found; cannot split the data into sections."
            raise KeyError(msg)
        codes, _ = _factorize(adata.obs[library_key])
        groups = [np.flatnonzero(codes == c) for c in range(int(codes.max()) + 1)] if n else []

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for idx in groups:
        nb = section_neighbors(
            coords[idx],
            method=method,
            n_neighbors=n_neighbors,
            radius=radius,
            max_neighbors=max_neighbors,
        )
        ei = neighbors_to_edge_index(nb)
        rows.append(idx[ei[1]])
        cols.append(idx[ei[0]])
    row = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
    col = np.concatenate(cols) if cols else np.empty(0, dtype=np.int64)
    dist = _distances(coords, row, col)

    conn = sparse.csr_matrix((np.ones(row.size, dtype=np.float32), (row, col)), shape=(n, n))
    dmat = sparse.csr_matrix((dist.astype(np.float64), (row, col)), shape=(n, n))
    conn.sort_indices()
    dmat.sort_indices()

    params: dict[str, Any] = {"method": method, "spatial_key": spatial_key}
    if method == "knn":
        params["n_neighbors"] = int(n_neighbors)
    else:
        params["radius"] = float(radius)  # type: ignore[arg-type]
    if max_neighbors is not None:
        params["max_neighbors"] = int(max_neighbors)
    if library_key is not None:
        params["library_key"] = library_key

    out = adata.copy() if copy else adata
    conns_key = f"{key_added}_connectivities"
    dists_key = f"{key_added}_distances"
    out.obsp[conns_key] = conn
    out.obsp[dists_key] = dmat
    out.uns[f"{key_added}_neighbors"] = {
        "connectivities_key": conns_key,
        "distances_key": dists_key,
        "params": params,
    }
    logger.info(
        "spatial_neighbors: %d edges over %d section(s) (method=%s) -> obsp[%r], obsp[%r]",
        row.size,
        len(groups),
        method,
        conns_key,
        dists_key,
    )
    return out if copy else None


def _factorize(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of a categorical/object column (missing values rejected)."""
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(values), sort=False)
    if (codes < 0).any():
        msg = "the section column contains missing values; every observation needs a section."
        raise ValueError(msg)
    return np.asarray(codes, dtype=np.int64), np.asarray(uniques)
