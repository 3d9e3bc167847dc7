"""Novae-style niches: each cell's multi-hop subgraph and the cells one "view" away.

A niche (Novae, Blampey et al. 2025) is the subgraph of every cell within
``n_hops_local`` hops of a centre cell, its edges weighted by distance. Self-supervised
training pairs a niche with the niche of a cell exactly ``n_hops_view`` hops away (a
nearby, overlapping but different view of the same tissue). Both are read off one
symmetric spatial graph per section, so niches never cross sections (or sites).

Distances are divided by the section's median edge length: an edge attribute near 1
means "a typical neighbour", whatever the coordinate unit (pixels, microns) and the
technology (55 um Visium spots, 10 um cells). Novae divides microns by 20 um instead,
which needs the unit of every site's coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from torch import Tensor


def symmetric_adjacency(neighbors: np.ndarray, coords: np.ndarray, sections: list[tuple[str, int, int]]) -> sparse.csr_matrix:
    """``[N, N]`` symmetric graph of the kNN lists ``neighbors [N, k]`` (``-1`` padding).

    An edge ``i - j`` exists when either lists the other; its weight is the distance
    ``|coords_i - coords_j|`` over the median edge length of its section (a zero
    distance, duplicate coordinates, is stored as a tiny positive weight so that the
    edge is not dropped).
    """
    n = len(neighbors)
    rows = np.repeat(np.arange(n), neighbors.shape[1])
    cols = neighbors.reshape(-1)
    keep = cols >= 0
    rows, cols = rows[keep], cols[keep]
    dist = np.linalg.norm(coords[rows] - coords[cols], axis=1)
    scale = np.ones(n)
    for _, start, stop in sections:
        inside = (rows >= start) & (rows < stop)
        median = float(np.median(dist[inside])) if inside.any() else 0.0
        scale[start:stop] = median if median > 0 else 1.0
    weight = np.maximum(dist / scale[rows], 1e-6)
    adj = sparse.coo_matrix((weight, (rows, cols)), shape=(n, n)).tocsr()
    return adj.maximum(adj.T).tocsr()


def hops_within(adjacency: sparse.csr_matrix, hops: int) -> sparse.csr_matrix:
    """Boolean ``[N, N]``: ``j`` is at most ``hops`` edges from ``i`` (``i`` itself included)."""
    if hops < 1:
        raise ValueError(f"hops must be >= 1, got {hops}")
    step = (adjacency != 0).astype(np.int32) + sparse.identity(adjacency.shape[0], dtype=np.int32, format="csr")
    reach = step.copy()
    for _ in range(hops - 1):
        reach = ((reach @ step) > 0).astype(np.int32)
    return (reach > 0).tocsr()


def hops_exactly(adjacency: sparse.csr_matrix, hops: int) -> sparse.csr_matrix:
    """Boolean ``[N, N]``: the shortest path from ``i`` to ``j`` has exactly ``hops`` edges."""
    closer = hops_within(adjacency, hops - 1) if hops > 1 else None
    return _beyond(hops_within(adjacency, hops), closer)


def _beyond(within: sparse.csr_matrix, closer: sparse.csr_matrix | None) -> sparse.csr_matrix:
    """Pairs in ``within`` and not in ``closer`` (``None``: not the cell itself)."""
    inner = sparse.identity(within.shape[0], dtype=np.int8, format="csr") if closer is None else closer.astype(np.int8)
    exact = within.astype(np.int8) - inner
    exact.eliminate_zeros()
    return (exact > 0).tocsr()


@dataclass
class NicheBatch:
    """``B`` niches as one disjoint graph, in the layout Novae's modules read.

    Attributes
    ----------
    x
        ``[M, F]`` features of the ``M`` cells of all niches (a cell in two niches twice).
    edge_index
        ``[2, E]`` edges within each niche, numbered in ``x``'s rows.
    edge_attr
        ``[E, 1]`` normalized edge lengths.
    batch
        ``[M]`` niche of each row; ``ptr [B + 1]`` the row where each niche starts.
    """

    x: Tensor
    edge_index: Tensor
    edge_attr: Tensor
    batch: Tensor
    ptr: Tensor

    @property
    def num_graphs(self) -> int:
        return int(self.ptr.numel() - 1)


@dataclass
class Niches:
    """Every niche of one site's cells, and the candidates for its paired view.

    Built once per site (:func:`build_niches`); :meth:`gather` cuts a batch of niches.
    """

    x: Tensor
    adjacency: sparse.csr_matrix
    local: sparse.csr_matrix
    view: sparse.csr_matrix

    @property
    def n_cells(self) -> int:
        return int(self.x.shape[0])

    def has_view(self) -> np.ndarray:
        """``[N]`` bool: the cell has at least one cell exactly ``n_hops_view`` hops away
        (Novae trains only on such cells; an isolated cell is still embedded)."""
        return np.diff(self.view.indptr) > 0

    def draw_views(self, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly drawn view cell per centre (each centre must have one)."""
        starts, counts = self.view.indptr[centres], np.diff(self.view.indptr)[centres]
        if (counts == 0).any():
            raise ValueError("a centre without any cell n_hops_view away has no view")
        return np.asarray(self.view.indices[starts + rng.integers(0, counts)])

    def gather(self, centres: np.ndarray) -> NicheBatch:
        """The niches of ``centres [B]`` as one :class:`NicheBatch`."""
        sub = self.local[centres]
        sizes = np.diff(sub.indptr)
        nodes = sub.indices  # every niche's cells, sorted within each niche (csr rows)
        owner = np.repeat(np.arange(len(centres)), sizes)
        block = self.adjacency[nodes][:, nodes].tocoo()
        same = owner[block.row] == owner[block.col]  # drop edges between two different niches
        ptr = np.concatenate([[0], np.cumsum(sizes)])
        return NicheBatch(
            x=self.x[torch.from_numpy(nodes.astype(np.int64))],
            edge_index=torch.from_numpy(np.stack([block.row[same], block.col[same]]).astype(np.int64)),
            edge_attr=torch.from_numpy(block.data[same].astype(np.float32)).unsqueeze(1),
            batch=torch.from_numpy(owner.astype(np.int64)),
            ptr=torch.from_numpy(ptr.astype(np.int64)),
        )


def build_niches(
    x: Tensor,
    neighbors: np.ndarray,
    coords: np.ndarray,
    sections: list[tuple[str, int, int]],
    *,
    n_hops_local: int = 2,
    n_hops_view: int = 2,
) -> Niches:
    """Niches of every cell from its section's kNN lists and coordinates.

    Parameters
    ----------
    x
        ``[N, F]`` model inputs (standardized features), sections concatenated.
    neighbors
        ``[N, k]`` neighbour rows, ``-1`` padding; never across ``sections``.
    coords
        ``[N, 2]`` spatial coordinates.
    sections
        ``(name, start, stop)`` row range of each section.
    n_hops_local, n_hops_view
        Niche radius and the distance of the paired view, in hops (Novae: 2 and 2).
    """
    if len(x) != len(neighbors) or len(x) != len(coords):
        raise ValueError(f"x, neighbors and coords must have the same rows, got {len(x)}, {len(neighbors)}, {len(coords)}")
    adjacency = symmetric_adjacency(neighbors, np.asarray(coords, dtype=np.float64)[:, :2], sections)
    # one reach matrix per hop count (niche radius and view distance are both 2 by default)
    within = {h: hops_within(adjacency, h) for h in {n_hops_local, n_hops_view, n_hops_view - 1} if h >= 1}
    view = _beyond(within[n_hops_view], within.get(n_hops_view - 1))
    return Niches(x, adjacency, within[n_hops_local], view)
