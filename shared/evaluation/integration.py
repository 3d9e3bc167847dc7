"""Integration metrics for a joint embedding: batch mixing and biology kept.

Metrics (scores in [0, 1], higher is better, scaled as in scib):

* ``ilisi``: batch mixing, Korsunsky's Local Inverse Simpson Index of the batches
  (Gaussian kernel calibrated to a perplexity on each cell's kNN distances),
  median over cells scaled ``(median - 1) / (B - 1)``;
* ``clisi``: label separation, LISI of the labels scaled ``(L - median) / (L - 1)``;
* ``batch_asw``: per label, mean of ``1 - |silhouette|`` of the batches; averaged
  over labels;
* ``label_asw``: ``(silhouette of the labels + 1) / 2``;
* ``graph_connectivity``: per label, the fraction of its cells in the largest
  connected component of the kNN graph restricted to that label; averaged;
* ``ari`` / ``nmi``: agreement of a k-means clustering of the embedding (as many
  clusters as labels) with the labels.

Where they can be computed. Every metric above needs the *pooled* embedding: the
neighbours or pairwise distances of a cell span all sites. They are therefore
available in simulation (and centralized mode) only, or at one site on its own
cells, for its own batches (e.g. the sections it holds): :func:`site_report`,
whose per-site scores the server may average (:func:`combine_site_reports`);
that average does not see mixing *across* sites. From shared quantities:

* ARI and NMI are exact from the label x cluster contingency table, which is a
  sum of per-site tables of counts (:func:`contingency_table`,
  :func:`ari_nmi_from_contingency`);
* Harmony's cluster-level batch composition ``O_kb`` (an aggregate the
  federated Harmony server holds) measures mixing per cluster, not per cell;
* LISI, ASW and graph connectivity cannot be computed from aggregates without
  exchanging cell-level neighbourhoods.

Costs: kNN searches are O(n log n) to O(n^2) (scikit-learn), the silhouettes are
O(n^2) in time (memory is chunked by scikit-learn).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors

logger = logging.getLogger(__name__)

# Binary search of the kernel precision, as Korsunsky's LISI (and harmonypy).
_LISI_TOL = 1e-5
_LISI_MAX_STEPS = 50
# scanpy's default neighbourhood size, which scib's graph connectivity uses.
_GRAPH_NEIGHBORS = 15


# ----------------------------------------------------------------------- helpers
def _codes(values: np.ndarray | Sequence, name: str) -> tuple[np.ndarray, int]:
    """Integer codes 0..n-1 for any labels (sorted order), and n."""
    arr = np.asarray(values).reshape(-1)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} has missing values")
    uniques, codes = np.unique(arr, return_inverse=True)
    return codes.reshape(-1), len(uniques)


def _embedding(Z: np.ndarray, n: int | None = None) -> np.ndarray:
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2:
        raise ValueError(f"Z must be 2-D (cells x dims), got shape {Z.shape}")
    if n is not None and Z.shape[0] != n:
        raise ValueError(f"Z has {Z.shape[0]} cells, the annotations {n}")
    if not np.isfinite(Z).all():
        raise ValueError("Z must be finite")
    return Z


def knn(Z: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's nearest other cells (Euclidean), itself excluded.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    n_neighbors : int
        k; reduced to n - 1 when there are fewer cells.

    Returns
    -------
    distances : np.ndarray
        (n, k) increasing Euclidean distances.
    indices : np.ndarray
        (n, k) neighbour indices.
    """
    Z = _embedding(Z)
    k = min(int(n_neighbors), Z.shape[0] - 1)
    if k < 1:
        raise ValueError("need at least two cells")
    return NearestNeighbors(n_neighbors=k).fit(Z).kneighbors()


# --------------------------------------------------------------------------- LISI
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

    Returns
    -------
    np.ndarray
        LISI per cell; NaN where the kernel vanishes (all neighbours too far).
    """
    codes, n_categories = _codes(categories, "categories")
    Z = _embedding(Z, codes.size)
    k = int(3 * perplexity) if n_neighbors is None else int(n_neighbors)
    distances, indices = knn(Z, k)
    weights, entropy = _calibrated_weights(distances, perplexity)
    n = codes.size
    # Weight of each category per cell in one bincount over (cell, category) pairs.
    pairs = (np.arange(n)[:, None] * n_categories + codes[indices]).ravel()
    per_category = np.bincount(pairs, weights=weights.ravel(), minlength=n * n_categories)
    simpson = (per_category.reshape(n, n_categories) ** 2).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.where((entropy != 0) & (simpson > 0), 1.0 / simpson, np.nan)


def ilisi(Z: np.ndarray, batches: np.ndarray | Sequence, *, n_neighbors: int = 90) -> float:
    """Batch mixing: median LISI of the batches scaled ``(median - 1) / (B - 1)``.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    batches : array-like
        Batch of each cell (n,).
    n_neighbors : int, default 90
        Neighbours per cell; the perplexity is a third of it (30).

    Returns
    -------
    float
        1 for perfect mixing, 0 for separated batches; NaN with one batch.
    """
    _, n_batches = _codes(batches, "batches")
    if n_batches < 2:
        return float("nan")
    scores = lisi(Z, batches, perplexity=n_neighbors / 3, n_neighbors=n_neighbors)
    return float((np.nanmedian(scores) - 1) / (n_batches - 1))


def clisi(Z: np.ndarray, labels: np.ndarray | Sequence, *, n_neighbors: int = 90) -> float:
    """Label separation: median LISI of the labels scaled ``(L - median) / (L - 1)``.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    labels : array-like
        Label (cell type, domain) of each cell (n,).
    n_neighbors : int, default 90
        Neighbours per cell; the perplexity is a third of it (30).

    Returns
    -------
    float
        1 when each cell's neighbourhood holds one label; NaN with one label.
    """
    _, n_labels = _codes(labels, "labels")
    if n_labels < 2:
        return float("nan")
    scores = lisi(Z, labels, perplexity=n_neighbors / 3, n_neighbors=n_neighbors)
    return float((n_labels - np.nanmedian(scores)) / (n_labels - 1))


# ---------------------------------------------------------------------------- ASW
def batch_asw(
    Z: np.ndarray,
    batches: np.ndarray | Sequence,
    labels: np.ndarray | Sequence | None = None,
) -> float:
    """scib's batch ASW: per label, the mean of ``1 - |silhouette(batches)|``.

    Labels with one batch, or with as many batches as cells, are skipped (the
    silhouette is undefined there); the score is the mean over the other labels.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    batches : array-like
        Batch of each cell (n,).
    labels : array-like or None, default None
        Label of each cell; None treats all cells as one label.

    Returns
    -------
    float
        Near 1 when batches overlap within labels; NaN if no label qualifies.
    """
    batch_codes, _ = _codes(batches, "batches")
    Z = _embedding(Z, batch_codes.size)
    label_codes = np.zeros(batch_codes.size, dtype=np.int64)
    if labels is not None:
        label_codes, _ = _codes(labels, "labels")
    per_label = []
    for label in np.unique(label_codes):
        cells = label_codes == label
        n_batches = np.unique(batch_codes[cells]).size
        if n_batches == 1 or n_batches == cells.sum():
            continue
        scores = silhouette_samples(Z[cells], batch_codes[cells])
        per_label.append(float(np.mean(1 - np.abs(scores))))
    return float(np.mean(per_label)) if per_label else float("nan")


def label_asw(Z: np.ndarray, labels: np.ndarray | Sequence) -> float:
    """Label ASW: ``(silhouette + 1) / 2`` of the labels (scib's scaling).

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    labels : array-like
        Label of each cell (n,).

    Returns
    -------
    float
        Near 1 for compact, well-separated labels; NaN with fewer than 2 labels
        or one cell per label.
    """
    codes, n_labels = _codes(labels, "labels")
    Z = _embedding(Z, codes.size)
    if not 2 <= n_labels <= codes.size - 1:
        return float("nan")
    return float((silhouette_score(Z, codes) + 1) / 2)


# ------------------------------------------------------------- graph connectivity
def knn_graph(Z: np.ndarray, n_neighbors: int = _GRAPH_NEIGHBORS) -> sparse.csr_matrix:
    """Symmetric kNN adjacency (an edge where either cell is among the other's k).

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
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
    Z: np.ndarray, labels: np.ndarray | Sequence, *, n_neighbors: int = _GRAPH_NEIGHBORS
) -> float:
    """Mean over labels of the share of its cells in its largest kNN component.

    The kNN graph of all cells is restricted to each label's cells (scib's graph
    connectivity).

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    labels : array-like
        Label of each cell (n,).
    n_neighbors : int, default 15
        k of the kNN graph (scanpy's default, as scib).

    Returns
    -------
    float
        1 when every label forms one connected piece.
    """
    codes, _ = _codes(labels, "labels")
    graph = knn_graph(_embedding(Z, codes.size), n_neighbors)
    shares = []
    for label in np.unique(codes):
        cells = np.flatnonzero(codes == label)
        _, component = connected_components(graph[cells][:, cells], directed=False)
        shares.append(np.bincount(component).max() / cells.size)
    return float(np.mean(shares))


# ------------------------------------------------------------------------ ARI/NMI
def cluster_embedding(Z: np.ndarray, n_clusters: int, *, seed: int = 0) -> np.ndarray:
    """k-means clusters of the embedding (``n_init=10``), for ARI and NMI.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    n_clusters : int
        Number of clusters.
    seed : int, default 0
        Random state.

    Returns
    -------
    np.ndarray
        Cluster of each cell (n,).
    """
    Z = _embedding(Z)
    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(Z)


def ari_nmi(labels: np.ndarray | Sequence, clusters: np.ndarray | Sequence) -> tuple[float, float]:
    """Adjusted Rand index and NMI (arithmetic normalization) of two labellings."""
    return (
        float(adjusted_rand_score(labels, clusters)),
        float(normalized_mutual_info_score(labels, clusters)),
    )


def contingency_table(
    labels: np.ndarray, clusters: np.ndarray, n_labels: int, n_clusters: int
) -> np.ndarray:
    """A site's label x cluster counts (integer codes); sites' tables add up.

    Parameters
    ----------
    labels : np.ndarray
        Global label codes ``0..n_labels-1`` (n,).
    clusters : np.ndarray
        Global cluster ids ``0..n_clusters-1`` (n,).
    n_labels, n_clusters : int
        Table shape.

    Returns
    -------
    np.ndarray
        int64 (n_labels, n_clusters).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    clusters = np.asarray(clusters, dtype=np.int64).reshape(-1)
    if labels.size != clusters.size:
        raise ValueError("labels and clusters must have one entry per cell")
    for codes, n, name in ((labels, n_labels, "labels"), (clusters, n_clusters, "clusters")):
        if codes.size and (codes.min() < 0 or codes.max() >= n):
            raise ValueError(f"{name} must be codes in 0..{n - 1}")
    flat = labels * n_clusters + clusters
    return np.bincount(flat, minlength=n_labels * n_clusters).reshape(n_labels, n_clusters)


def _pairs(counts: np.ndarray) -> float:
    """Number of unordered pairs within each count, summed."""
    return float((counts * (counts - 1) / 2).sum())


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def ari_nmi_from_contingency(table: np.ndarray) -> tuple[float, float]:
    """ARI and NMI from a pooled contingency table (equal to scikit-learn's).

    Parameters
    ----------
    table : np.ndarray
        Label x cluster counts summed over sites.

    Returns
    -------
    ari : float
        Adjusted Rand index.
    nmi : float
        Normalized mutual information, arithmetic mean of the entropies.
    """
    table = np.asarray(table, dtype=np.float64)
    n = table.sum()
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    index, row_pairs, col_pairs = _pairs(table), _pairs(rows), _pairs(cols)
    expected = row_pairs * col_pairs / _pairs(np.array([n]))
    maximum = (row_pairs + col_pairs) / 2
    ari = 1.0 if maximum == expected else (index - expected) / (maximum - expected)

    h_rows, h_cols = _entropy(rows), _entropy(cols)
    if h_rows == 0 and h_cols == 0:
        return ari, 1.0  # one class and one cluster: identical partitions
    nz = table > 0
    outer = np.outer(rows, cols)[nz]
    mi = float((table[nz] / n * np.log(table[nz] * n / outer)).sum())
    return ari, max(mi, 0.0) / ((h_rows + h_cols) / 2)


# ------------------------------------------------------------------------ reports
def integration_report(
    Z: np.ndarray,
    batches: np.ndarray | Sequence,
    labels: np.ndarray | Sequence | None = None,
    *,
    n_neighbors: int = 90,
    seed: int = 0,
) -> dict[str, float]:
    """All integration metrics of a joint embedding (pooled cells: simulation only).

    Parameters
    ----------
    Z : np.ndarray
        Embedding of all cells (n x d).
    batches : array-like
        Batch of each cell (n,).
    labels : array-like or None, default None
        Label of each cell; None reports the batch-mixing metrics only.
    n_neighbors : int, default 90
        LISI neighbourhood (perplexity ``n_neighbors / 3``); graph connectivity
        uses scanpy's 15 neighbours.
    seed : int, default 0
        Random state of the k-means clustering behind ARI/NMI.

    Returns
    -------
    dict[str, float]
        ``ilisi``, ``batch_asw`` and, with labels, ``clisi``, ``label_asw``,
        ``graph_connectivity``, ``ari``, ``nmi``. Undefined scores are NaN.
    """
    batch_codes, _ = _codes(batches, "batches")
    Z = _embedding(Z, batch_codes.size)
    report = {
        "ilisi": ilisi(Z, batch_codes, n_neighbors=n_neighbors),
        "batch_asw": batch_asw(Z, batch_codes, labels),
    }
    if labels is not None:
        label_codes, n_labels = _codes(labels, "labels")
        report["clisi"] = clisi(Z, label_codes, n_neighbors=n_neighbors)
        report["label_asw"] = label_asw(Z, label_codes)
        report["graph_connectivity"] = graph_connectivity(Z, label_codes)
        clusters = cluster_embedding(Z, min(n_labels, Z.shape[0]), seed=seed)
        report["ari"], report["nmi"] = ari_nmi(label_codes, clusters)
    logger.info("integration: %s", ", ".join(f"{k}={v:.3f}" for k, v in report.items()))
    return report


def site_report(
    Z: np.ndarray,
    batches: np.ndarray | Sequence,
    labels: np.ndarray | Sequence | None = None,
    *,
    n_neighbors: int = 90,
    seed: int = 0,
) -> dict[str, float]:
    """Integration metrics a site computes on its own cells, for its own batches.

    Runs where the data live (no cell leaves the site); the batches are the
    site's own (sections, slides). Mixing with other sites' cells is not seen.

    Parameters
    ----------
    Z : np.ndarray
        The site's embedding (n x d).
    batches : array-like
        Within-site batch of each cell (n,).
    labels : array-like or None, default None
        Label of each cell, if the site has annotations.
    n_neighbors : int, default 90
        LISI neighbourhood, as :func:`integration_report`.
    seed : int, default 0
        Random state of the clustering behind ARI/NMI.

    Returns
    -------
    dict[str, float]
        :func:`integration_report`'s scores (batch scores NaN with a single
        batch) plus ``n_cells`` and ``n_batches``, for :func:`combine_site_reports`.
    """
    batch_codes, n_batches = _codes(batches, "batches")
    report = integration_report(Z, batch_codes, labels, n_neighbors=n_neighbors, seed=seed)
    report["n_cells"] = float(batch_codes.size)
    report["n_batches"] = float(n_batches)
    return report


def combine_site_reports(reports: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Server: cell-weighted mean of the sites' :func:`site_report` scores.

    A site's NaN (undefined score, e.g. one batch) is left out of that metric's
    mean. This summarizes within-site integration; it is not the pooled metric.

    Parameters
    ----------
    reports : Sequence[Mapping[str, float]]
        One report per site, each with ``n_cells``.

    Returns
    -------
    dict[str, float]
        Mean of each metric (NaN where no site defines it) and the total ``n_cells``.
    """
    if not reports:
        raise ValueError("no site reports")
    weights = np.array([r["n_cells"] for r in reports], dtype=np.float64)
    keys = sorted({k for r in reports for k in r} - {"n_cells", "n_batches"})
    combined: dict[str, float] = {}
    for key in keys:
        values = np.array([r.get(key, np.nan) for r in reports], dtype=np.float64)
        ok = np.isfinite(values)
        combined[key] = (
            float(np.average(values[ok], weights=weights[ok]))
            if ok.any() and weights[ok].sum() > 0
            else float("nan")
        )
    combined["n_cells"] = float(weights.sum())
    return combined
