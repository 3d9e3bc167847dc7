"""Agreement of a clustering of the embedding with the labels (ARI and NMI), for the
integration report. The federation's own scores come from the sum of the sites'
label x domain tables: :mod:`fedspatial.shared.evaluation.metrics`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from fedspatial.shared.evaluation.embedding_inputs import check_embedding

__all__ = ["ari_nmi", "cluster_embedding"]


def cluster_embedding(
    Z: np.ndarray, n_clusters: int, *, seed: int = 0, fit_cells: np.ndarray | None = None
) -> np.ndarray:
    """k-means clusters of the embedding (``n_init=10``), for ARI and NMI.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d).
    n_clusters : int
        Number of clusters.
    seed : int, default 0
        Random state.
    fit_cells : np.ndarray or None, default None
        Fit the centres on these rows only; every cell is then assigned to its nearest
        centre (O(n K d)). None: fit on all cells.

    Returns
    -------
    np.ndarray
        Cluster of each cell (n,).
    """
    Z = check_embedding(Z)
    kmeans = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    if fit_cells is None:
        return np.asarray(kmeans.fit_predict(Z))
    return np.asarray(kmeans.fit(Z[fit_cells]).predict(Z))


def ari_nmi(labels: np.ndarray | Sequence, clusters: np.ndarray | Sequence) -> tuple[float, float]:
    """Adjusted Rand index and NMI (arithmetic normalization) of two labellings."""
    return (
        float(adjusted_rand_score(labels, clusters)),
        float(normalized_mutual_info_score(labels, clusters)),
    )
