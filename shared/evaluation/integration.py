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
  sum of per-site tables of counts (:mod:`fedspatial.shared.evaluation.metrics`,
  which the federation's reports use);
* Harmony's cluster-level batch composition ``O_kb`` (an aggregate the
  federated Harmony server holds) measures mixing per cluster, not per cell;
* LISI, ASW and graph connectivity cannot be computed from aggregates without
  exchanging cell-level neighbourhoods.

The metrics live in :mod:`~fedspatial.shared.evaluation.lisi`,
:mod:`~fedspatial.shared.evaluation.silhouette`,
:mod:`~fedspatial.shared.evaluation.connectivity` and
:mod:`~fedspatial.shared.evaluation.cluster_agreement`, and are re-exported here; this
module combines them into reports.

Costs: kNN searches are O(n log n) to O(n^2) (scikit-learn), the silhouettes are
O(n^2) in time (memory is chunked by scikit-learn).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from fedspatial.shared.evaluation.cluster_agreement import (
    ari_nmi,
    cluster_embedding,
)
from fedspatial.shared.evaluation.connectivity import graph_connectivity, knn_graph
from fedspatial.shared.evaluation.embedding_inputs import category_codes, check_embedding, knn
from fedspatial.shared.evaluation.lisi import clisi, ilisi, lisi
from fedspatial.shared.evaluation.silhouette import batch_asw, label_asw

__all__ = [
    "ari_nmi",
    "batch_asw",
    "clisi",
    "cluster_embedding",
    "combine_site_reports",
    "graph_connectivity",
    "ilisi",
    "integration_report",
    "knn",
    "knn_graph",
    "label_asw",
    "lisi",
    "site_report",
]

logger = logging.getLogger(__name__)


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
    batch_codes, _ = category_codes(batches, "batches")
    Z = check_embedding(Z, batch_codes.size)
    report = {
        "ilisi": ilisi(Z, batch_codes, n_neighbors=n_neighbors),
        "batch_asw": batch_asw(Z, batch_codes, labels),
    }
    if labels is not None:
        label_codes, n_labels = category_codes(labels, "labels")
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
    batch_codes, n_batches = category_codes(batches, "batches")
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
