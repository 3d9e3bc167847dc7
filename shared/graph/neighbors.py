"""Spatial neighbour graphs, built per tissue section.

Every graph in fedspatial is built *within* one section: cells of different
sections (and, a fortiori, of different sites) are never connected. The
builders of :mod:`~fedspatial.shared.graph.section_graph` work on the coordinates of a
single section; :func:`spatial_neighbors` applies them to an :class:`~anndata.AnnData`,
optionally split by a section column. They and the degree bound of
:mod:`~fedspatial.shared.graph.degree_bound` are re-exported here.

Neighbour lists are dense ``int64`` arrays of shape ``(N, m)`` padded with ``-1``,
nearest neighbour first, ties (equal distances) broken by the lower point index.
They convert to a PyTorch Geometric ``edge_index`` with
:func:`neighbors_to_edge_index`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from fedspatial.shared.graph.degree_bound import bound_in_degree, in_degree
from fedspatial.shared.graph.parameter_checks import check_coords
from fedspatial.shared.graph.section_graph import (
    GraphMethod,
    knn_neighbors,
    pair_distances,
    radius_neighbors,
    section_neighbors,
)

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
    coords = check_coords(np.asarray(adata.obsm[spatial_key]))
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
    dist = pair_distances(coords, row, col)

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
