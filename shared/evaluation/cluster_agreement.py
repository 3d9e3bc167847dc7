"""Agreement of a clustering of the embedding with the labels: ARI and NMI, pooled or
from the sum of the sites' label x cluster tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from fedspatial.shared.evaluation.embedding_inputs import check_embedding

__all__ = ["ari_nmi", "ari_nmi_from_contingency", "cluster_embedding", "contingency_table"]


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
    Z = check_embedding(Z)
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

    The federation's scores come from :mod:`fedspatial.shared.evaluation.metrics`
    (tables of named labels), whose arithmetic is scikit-learn's; this float formula
    can differ from it by rounding (a few 1e-15), and raises ZeroDivisionError on a
    table with fewer than two cells where metrics.py gives NaN or 1.0.

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

