"""scib's graph connectivity: whether each label's cells form one piece of the kNN graph."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from fedspatial.shared.evaluation.embedding_inputs import category_codes, check_embedding, knn

__all__ = ["graph_connectivity", "knn_graph"]

# scanpy's default neighbourhood size, which scib's graph connectivity uses.
_GRAPH_NEIGHBORS = 15


def knn_graph(Z: np.ndarray, n_neighbors: int = _GRAPH_NEIGHBORS) -> sparse.csr_matrix:
    """Symmetric kNN adjacency (an edge where either cell is among the other's k).

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d) whose neighbours make the graph.
    n_neighbors : int, default 15
        k (scanpy's default).

    Returns
    -------
    scipy.sparse.csr_matrix
        (n, n) 0/1 adjacency.
    """
    _, indices = knn(Z, n_neighbors)
    n, k = indices.shape
    rows = np.repeat(np.arange(n), k)
    graph = sparse.csr_matrix((np.ones(n * k), (rows, indices.ravel())), shape=(n, n))
    return ((graph + graph.T) > 0).astype(np.float64).tocsr()


def graph_connectivity(
    Z: np.ndarray,
    labels: np.ndarray | Sequence,
    *,
    n_neighbors: int = _GRAPH_NEIGHBORS,
    cells: np.ndarray | None = None,
) -> float:
    """Mean over labels of the share of its cells in its largest kNN component.

    The kNN graph of all cells is restricted to each label's cells (scib's graph
    connectivity). Sparse throughout: the graph has at most 2 n k edges.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d), from which the kNN graph is built.
    labels : array-like
        Label of each cell (n,).
    n_neighbors : int, default 15
        k of the kNN graph (scanpy's default, as scib).
    cells : np.ndarray or None, default None
        Row indices of a subsample: the score of the kNN graph of those cells (an
        estimate of the full graph's; O(m^2) brute-force search instead of O(n^2)).

    Returns
    -------
    float
        1 when every label forms one connected piece.
    """
    codes, _ = category_codes(labels, "labels")
    Z = check_embedding(Z, codes.size)
    if cells is not None:
        Z, codes = Z[cells], codes[cells]
    graph = knn_graph(Z, n_neighbors)
    shares = []
    for label in np.unique(codes):
        cells = np.flatnonzero(codes == label)
        _, component = connected_components(graph[cells][:, cells], directed=False)
        shares.append(np.bincount(component).max() / cells.size)
    return float(np.mean(shares))

