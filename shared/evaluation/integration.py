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

Costs (:mod:`~fedspatial.shared.evaluation.sampling`): above ``max_cells`` (10,000) cells
the silhouettes and graph connectivity are computed on a stratified (label x batch),
seeded subsample of that size and the k-means is fitted on it; the LISI median is over
``lisi_cells`` (5,000) such cells, each with its exact neighbours among all cells. The
report then costs O(max_cells^2 + lisi_cells x n) time, never builds an n x n array
(distances in blocks of ``WORKING_MEMORY_MIB``), and one kNN search serves iLISI and
cLISI. ``sampling=EXACT`` computes every metric on all cells (O(n^2) time).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn import config_context

from fedspatial.shared.evaluation.cluster_agreement import (
    ari_nmi,
    cluster_embedding,
)
from fedspatial.shared.evaluation.connectivity import graph_connectivity, knn_graph
from fedspatial.shared.evaluation.embedding_inputs import category_codes, check_embedding, knn
from fedspatial.shared.evaluation.lisi import clisi, ilisi, lisi
from fedspatial.shared.evaluation.sampling import (
    EXACT,
    WORKING_MEMORY_MIB,
    ReportSampling,
    strata_of,
    stratified_subsample,
)
from fedspatial.shared.evaluation.silhouette import batch_asw, label_asw

__all__ = [
    "EXACT",
    "LABEL_METRICS",
    "ReportSampling",
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

# The scores that depend on the embedding and the labels only, not on the batches.
LABEL_METRICS = ("clisi", "label_asw", "graph_connectivity", "ari", "nmi")


def integration_report(
    Z: np.ndarray,
    batches: np.ndarray | Sequence,
    labels: np.ndarray | Sequence | None = None,
    *,
    n_neighbors: int = 90,
    seed: int = 0,
    sampling: ReportSampling | None = None,
    label_scores: Mapping[str, float] | None = None,
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
        Random state of the subsamples and of the k-means clustering behind ARI/NMI.
    sampling : ReportSampling or None, default None
        Subsample sizes (None: :class:`ReportSampling`'s defaults; ``EXACT``: none).
        Below them every metric is exact.
    label_scores : Mapping[str, float] or None, default None
        :data:`LABEL_METRICS` already computed for these very cells, embedding and
        labels (they do not depend on the batches): reused, not computed again.

    Returns
    -------
    dict[str, float]
        ``ilisi``, ``batch_asw`` and, with labels, ``clisi``, ``label_asw``,
        ``graph_connectivity``, ``ari``, ``nmi``. Undefined scores are NaN.
    """
    sampling = sampling or ReportSampling()
    batch_codes, n_batches = category_codes(batches, "batches")
    Z = check_embedding(Z, batch_codes.size)
    label_codes, n_labels = (
        category_codes(labels, "labels") if labels is not None else (np.zeros(batch_codes.size, np.int64), 1)
    )
    strata = strata_of(label_codes, batch_codes)
    rows = stratified_subsample(strata, sampling.max_cells, seed)
    lisi_rows = stratified_subsample(strata, sampling.lisi_cells, seed)
    fresh_labels = labels is not None and label_scores is None
    with config_context(working_memory=WORKING_MEMORY_MIB):
        # one kNN search for iLISI and cLISI, only when one of them is defined
        neighbors = (
            knn(Z, n_neighbors, lisi_rows) if n_batches > 1 or (fresh_labels and n_labels > 1) else None
        )
        report = {
            "ilisi": ilisi(Z, batch_codes, n_neighbors=n_neighbors, cells=lisi_rows, neighbors=neighbors),
            "batch_asw": batch_asw(Z, batch_codes, label_codes, cells=rows),
        }
        if labels is not None and label_scores is not None:
            report.update({k: float(label_scores[k]) for k in LABEL_METRICS})
        elif labels is not None:
            report["clisi"] = clisi(Z, label_codes, n_neighbors=n_neighbors, cells=lisi_rows, neighbors=neighbors)
            report["label_asw"] = label_asw(Z, label_codes, cells=rows)
            report["graph_connectivity"] = graph_connectivity(Z, label_codes, cells=rows)
            clusters = cluster_embedding(Z, min(n_labels, Z.shape[0]), seed=seed, fit_cells=rows)
            report["ari"], report["nmi"] = ari_nmi(label_codes, clusters)
    logger.info(
        "integration (%d cells%s%s): %s", batch_codes.size, "; label scores reused" if label_scores else "",
        "" if rows is None else f", subsampled to {rows.size}" + ("" if lisi_rows is None else f" / {lisi_rows.size} for LISI"),
        ", ".join(f"{k}={v:.3f}" for k, v in report.items()),
    )
    return report


def site_report(
    Z: np.ndarray,
    batches: np.ndarray | Sequence,
    labels: np.ndarray | Sequence | None = None,
    *,
    n_neighbors: int = 90,
    seed: int = 0,
    sampling: ReportSampling | None = None,
    label_scores: Mapping[str, float] | None = None,
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
        Random state of the subsamples and the clustering behind ARI/NMI.
    sampling, label_scores : optional
        As :func:`integration_report`.

    Returns
    -------
    dict[str, float]
        :func:`integration_report`'s scores (batch scores NaN with a single
        batch) plus ``n_cells`` and ``n_batches``, for :func:`combine_site_reports`.
    """
    batch_codes, n_batches = category_codes(batches, "batches")
    report = integration_report(
        Z, batch_codes, labels, n_neighbors=n_neighbors, seed=seed, sampling=sampling, label_scores=label_scores
    )
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
