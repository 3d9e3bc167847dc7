"""Clustering scores that can be computed from per-site contingency tables.

A site never sends its cells' labels, only a contingency table (counts of true
label x predicted domain). Tables from several sites are merged by label name and
domain id, and ARI / NMI are computed from the merged table; they equal
scikit-learn's ``adjusted_rand_score`` / ``normalized_mutual_info_score`` on the
concatenated labels of all sites.

Deviation from scikit-learn: with no labelled cell at all the scores are NaN (not
1.0), so that "nothing to evaluate" is never mistaken for a perfect match.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import log

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class Contingency:
    """Counts of cells per (true label, predicted domain).

    Attributes
    ----------
    labels : list[str]
        True label names (rows), sorted.
    domains : list[int]
        Predicted domain ids (columns), sorted.
    counts : np.ndarray
        int64 (L, D) cell counts.
    """

    labels: list[str]
    domains: list[int]
    counts: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        self.labels = [str(v) for v in self.labels]
        self.domains = [int(v) for v in self.domains]
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(
            len(self.labels), len(self.domains)
        )
        if len(set(self.labels)) != len(self.labels) or len(set(self.domains)) != len(self.domains):
            raise ValueError("label names and domain ids must be unique")
        if (self.counts < 0).any():
            raise ValueError("counts must be non-negative")

    @property
    def n(self) -> int:
        """Number of cells counted."""
        return int(self.counts.sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for a Flower ``ArrayRecord``.

        ``labels`` is a numpy unicode array (not object, so it serializes without
        pickle); ``list(arrays["labels"])`` gives the names for a ``ConfigRecord``.
        """
        return {
            "counts": self.counts.copy(),
            "labels": np.array(self.labels, dtype=str),
            "domains": np.array(self.domains, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray | Sequence[str]]) -> Contingency:
        """Inverse of :meth:`to_arrays`; ``labels`` may be an array or a list of str."""
        labels = [str(v) for v in np.asarray(arrays["labels"]).reshape(-1).tolist()]
        domains = [int(v) for v in np.asarray(arrays["domains"]).reshape(-1).tolist()]
        return cls(labels=labels, domains=domains, counts=np.asarray(arrays["counts"]))


# String forms that missing values take after ``.astype(str)`` (str(np.nan) etc.).
_MISSING_STRINGS = ("", "nan", "NaN", "None", "<NA>")


def _missing_mask(values: np.ndarray) -> np.ndarray:
    """True where a label is missing (None, NaN, pandas NA, or a string in _MISSING_STRINGS)."""
    kind = values.dtype.kind
    if kind == "U":
        return np.isin(values, _MISSING_STRINGS)
    if kind in "fc":
        return np.isnan(values)
    if kind in "iub":
        return np.zeros(values.shape, dtype=bool)

    def missing(v: object) -> bool:
        if v is None or (isinstance(v, str) and v in _MISSING_STRINGS):
            return True
        try:
            return bool(v != v)  # NaN and NaT are not equal to themselves
        except TypeError:  # pandas.NA refuses bool()
            return True

    return np.frompyfunc(missing, 1, 1)(values).astype(bool)


def _as_label_array(labels_true: Sequence[object]) -> np.ndarray:
    """1-D array of labels; lists go through object dtype so NaN is not stringified."""
    if isinstance(labels_true, np.ndarray):
        values = labels_true.astype(str) if labels_true.dtype.kind == "S" else labels_true
    else:
        values = np.asarray(labels_true, dtype=object)
    if values.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {values.shape}")
    return values


def contingency(labels_true: Sequence[object], labels_pred: Sequence[int]) -> Contingency:
    """Contingency table of true labels x predicted domains at one site.

    Parameters
    ----------
    labels_true : array-like
        True labels (str, categorical, numbers; rows are named by ``str(label)``).
        Missing ones (None, NaN, pandas NA, "", or "nan" / "None" / "<NA>" as left
        by ``.astype(str)``) are skipped together with their prediction.
    labels_pred : array-like of int
        Predicted domain ids, same length.

    Returns
    -------
    Contingency
    """
    true = _as_label_array(labels_true)
    pred = np.asarray(labels_pred).reshape(-1)
    if true.shape[0] != pred.shape[0]:
        raise ValueError(f"{true.shape[0]} true labels but {pred.shape[0]} predictions")
    if pred.size and not np.issubdtype(pred.dtype, np.integer):
        pred_float = pred.astype(np.float64)
        if not np.all(np.mod(pred_float, 1) == 0):
            raise ValueError("predicted domains must be integer ids")
    keep = ~_missing_mask(true)
    names_in = true[keep]
    if names_in.dtype.kind != "U":
        names_in = np.array([str(v) for v in names_in.tolist()], dtype=str)
    names, rows = np.unique(names_in, return_inverse=True)
    domains, cols = np.unique(pred[keep].astype(np.int64), return_inverse=True)
    counts = np.bincount(
        rows.reshape(-1) * domains.size + cols.reshape(-1), minlength=names.size * domains.size
    ).reshape(names.size, domains.size)
    return Contingency(labels=names.tolist(), domains=domains.tolist(), counts=counts)


def merge_contingency(tables: Sequence[Contingency]) -> Contingency:
    """Sum tables from several sites, aligned by label name and domain id (union)."""
    labels = sorted({name for t in tables for name in t.labels})
    domains = sorted({d for t in tables for d in t.domains})
    row = {name: i for i, name in enumerate(labels)}
    col = {d: j for j, d in enumerate(domains)}
    counts = np.zeros((len(labels), len(domains)), dtype=np.int64)
    for t in tables:
        counts[np.ix_([row[n] for n in t.labels], [col[d] for d in t.domains])] += t.counts
    return Contingency(labels=labels, domains=domains, counts=counts)


def _nonempty(c: Contingency) -> np.ndarray:
    """Counts without all-zero rows and columns (labels / domains with no cell)."""
    counts = c.counts
    return counts[counts.sum(axis=1) > 0][:, counts.sum(axis=0) > 0]


def ari_from_contingency(c: Contingency) -> float:
    """Adjusted Rand index, equal to ``sklearn.metrics.adjusted_rand_score``.

    Returns
    -------
    float
        NaN when the table counts no cell.
    """
    counts = _nonempty(c)
    n = int(counts.sum())
    if n == 0:
        return float("nan")
    # pair counts as Python ints, as scikit-learn, so products cannot overflow
    sum_squares = sum(int(v) ** 2 for v in counts[counts > 0])
    rows_sq = sum(int(v) ** 2 for v in counts.sum(axis=1))
    cols_sq = sum(int(v) ** 2 for v in counts.sum(axis=0))
    tp = sum_squares - n
    fp = cols_sq - sum_squares
    fn = rows_sq - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _entropy(sizes: np.ndarray) -> float:
    sizes = sizes[sizes > 0].astype(np.float64)
    if sizes.size <= 1:
        return 0.0
    total = sizes.sum()
    return float(-np.sum((sizes / total) * (np.log(sizes) - log(total))))


def _mutual_info(counts: np.ndarray) -> float:
    """Mutual information (nats) of a table without empty rows or columns."""
    if counts.shape[0] == 1 or counts.shape[1] == 1:
        return 0.0
    total = float(counts.sum())
    rows = counts.sum(axis=1)
    cols = counts.sum(axis=0)
    nzx, nzy = np.nonzero(counts)
    nz = counts[nzx, nzy].astype(np.float64)
    outer = rows[nzx].astype(np.float64) * cols[nzy].astype(np.float64)
    p = nz / total
    # log(a / b) as log(a) - log(b), as scikit-learn, for precision
    mi = p * (np.log(nz) - log(total)) + p * (-np.log(outer) + 2.0 * log(total))
    mi = np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi)
    return float(max(mi.sum(), 0.0))


def nmi_from_contingency(c: Contingency) -> float:
    """Normalized mutual information (arithmetic mean of entropies).

    Equals ``sklearn.metrics.normalized_mutual_info_score`` with its default
    ``average_method="arithmetic"``.

    Returns
    -------
    float
        NaN when the table counts no cell.
    """
    counts = _nonempty(c)
    if counts.sum() == 0:
        return float("nan")
    if counts.shape[0] == counts.shape[1] == 1:
        return 1.0  # neither labelling splits the data: a perfect match
    mi = _mutual_info(counts)
    if mi == 0:
        return 0.0
    h_true = _entropy(counts.sum(axis=1))
    h_pred = _entropy(counts.sum(axis=0))
    return float(mi / ((h_true + h_pred) / 2.0))


def scores_from_contingency(c: Contingency) -> dict[str, float]:
    """``{"ari", "nmi", "n_labelled"}`` of a (possibly merged) table."""
    return {
        "ari": ari_from_contingency(c),
        "nmi": nmi_from_contingency(c),
        "n_labelled": float(c.n),
    }


def section_scores(labels_true: Sequence[object], labels_pred: Sequence[int]) -> dict[str, float]:
    """ARI and NMI of one tissue section, on its labelled cells only.

    Parameters
    ----------
    labels_true : array-like
        True labels; missing ones (None, NaN, "") are ignored.
    labels_pred : array-like of int
        Predicted domain ids.

    Returns
    -------
    dict[str, float]
        ``{"ari", "nmi", "n_labelled"}``; scores are NaN without labelled cells.
    """
    scores = scores_from_contingency(contingency(labels_true, labels_pred))
    if scores["n_labelled"] == 0:
        logger.warning("no labelled cells: ARI and NMI are NaN")
    return scores
