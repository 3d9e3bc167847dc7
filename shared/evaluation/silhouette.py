"""Average silhouette widths of a joint embedding, scaled as in scib."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import config_context
from sklearn.metrics import silhouette_samples

from fedspatial.shared.evaluation.embedding_inputs import category_codes, check_embedding
from fedspatial.shared.evaluation.sampling import WORKING_MEMORY_MIB


def _silhouettes(Z: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """scikit-learn's silhouette of each cell, distances in blocks of ``WORKING_MEMORY_MIB``
    (scikit-learn's default block, 1 GiB, would hold all pairs of 10,000 cells at once)."""
    with config_context(working_memory=WORKING_MEMORY_MIB):
        return np.asarray(silhouette_samples(Z, codes))

__all__ = ["batch_asw", "label_asw"]


def batch_asw(
    Z: np.ndarray,
    batches: np.ndarray | Sequence,
    labels: np.ndarray | Sequence | None = None,
    *,
    cells: np.ndarray | None = None,
) -> float:
    """scib's batch ASW: per label, the mean of ``1 - |silhouette(batches)|``.

    Labels with one batch, or with as many batches as cells, are skipped (the
    silhouette is undefined there); the score is the mean over the other labels.

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d) whose batch overlap within labels is scored.
    batches : array-like
        Batch of each cell (n,).
    labels : array-like or None, default None
        Label of each cell; None treats all cells as one label.
    cells : np.ndarray or None, default None
        Row indices of a subsample to score (the silhouette of that subsample, O(m^2));
        None: all cells (O(n^2) time).

    Returns
    -------
    float
        Near 1 when batches overlap within labels; NaN if no label qualifies.
    """
    batch_codes, _ = category_codes(batches, "batches")
    Z = check_embedding(Z, batch_codes.size)
    label_codes = np.zeros(batch_codes.size, dtype=np.int64)
    if labels is not None:
        label_codes, _ = category_codes(labels, "labels")
    if cells is not None:
        Z, batch_codes, label_codes = Z[cells], batch_codes[cells], label_codes[cells]
    per_label = []
    for label in np.unique(label_codes):
        in_label = label_codes == label
        n_batches = np.unique(batch_codes[in_label]).size
        if n_batches == 1 or n_batches == in_label.sum():
            continue
        scores = _silhouettes(Z[in_label], batch_codes[in_label])
        per_label.append(float(np.mean(1 - np.abs(scores))))
    return float(np.mean(per_label)) if per_label else float("nan")


def label_asw(Z: np.ndarray, labels: np.ndarray | Sequence, *, cells: np.ndarray | None = None) -> float:
    """Label ASW: ``(silhouette + 1) / 2`` of the labels (scib's scaling).

    Parameters
    ----------
    Z : np.ndarray
        Embedding (n x d) whose labels should form compact, separate clusters.
    labels : array-like
        Label of each cell (n,).
    cells : np.ndarray or None, default None
        Row indices of a subsample to score, as :func:`batch_asw`.

    Returns
    -------
    float
        Near 1 for compact, well-separated labels; NaN with fewer than 2 labels
        or one cell per label.
    """
    codes, _ = category_codes(labels, "labels")
    Z = check_embedding(Z, codes.size)
    if cells is not None:
        Z, codes = Z[cells], codes[cells]
    if not 2 <= np.unique(codes).size <= codes.size - 1:
        return float("nan")
    return float((np.mean(_silhouettes(Z, codes)) + 1) / 2)

