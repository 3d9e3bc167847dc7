"""Calibration of the domain confidence, where labels exist: federated and equal to pooled.

A cell's confidence ``c`` (``obs["fedspatial_confidence"]``) is calibrated when, among
cells with confidence about ``c``, a fraction ``c`` sits in the right domain. Domains are
matched to labels one-to-one by the largest total overlap (Hungarian assignment on the
joint label x domain table); a domain left without a label counts as wrong.

Each site counts its labelled cells per (confidence bin, label, domain), with the summed
confidence (:func:`calibration_table`, ``(B, L, D)`` arrays: no cell); the server adds the
sites' tables (:func:`merge_calibration_tables`) and derives, for any matching, the
expected calibration error, the reliability curve and the coverage above 0.9
(:func:`calibration_report`), equal to the pooled computation
(:func:`expected_calibration_error`) because every quantity is a sum over cells.

Label-free recalibration (:func:`neighbour_loss`, :func:`fit_temperature`): one
temperature for the whole federation, fitted without labels so that a cell's tempered
posterior predicts its spatial neighbours' domains as well as possible; each site sends
only the loss summed over its cells for every candidate temperature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from fedspatial.shared.evaluation.metrics import _as_label_array, _missing_mask

__all__ = [
    "N_BINS",
    "TEMPERATURES",
    "CalibrationTable",
    "calibration_report",
    "calibration_table",
    "confidence_bins",
    "expected_calibration_error",
    "fit_temperature",
    "match_domains",
    "merge_calibration_tables",
    "neighbour_loss",
    "tempered_confidence",
    "tempered_log_posterior",
]

N_BINS = 10
HIGH = 0.9
"""Coverage threshold: cells with confidence above it (the last of 10 bins)."""


def confidence_bins(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin of each confidence: ``(0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]`` (0 goes to the first)."""
    c = np.asarray(confidence, dtype=np.float64)
    return np.clip(np.ceil(c * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


@dataclass
class CalibrationTable:
    """Labelled cells per (confidence bin, true label, domain).

    Attributes
    ----------
    labels, domains
        Row and column names (sorted), as in :class:`~fedspatial.shared.evaluation.metrics.Contingency`.
    counts
        ``int64 (B, L, D)``: cells.
    confidence
        ``float64 (B, L, D)``: their summed confidence.
    """

    labels: list[str]
    domains: list[int]
    counts: np.ndarray = field(repr=False)
    confidence: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        self.labels, self.domains = [str(v) for v in self.labels], [int(v) for v in self.domains]
        shape = (-1, len(self.labels), len(self.domains))
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(shape)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(shape)
        if self.counts.shape != self.confidence.shape:
            raise ValueError("calibration counts and confidence sums must have the same shape")

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[0])

    def to_json(self) -> dict[str, Any]:
        """Plain lists, for a site's JSON report."""
        return {"labels": self.labels, "domains": self.domains, "counts": self.counts.tolist(),
                "confidence": self.confidence.tolist()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> CalibrationTable:
        return cls(list(raw["labels"]), list(raw["domains"]), np.asarray(raw["counts"]), np.asarray(raw["confidence"]))


def calibration_table(
    labels_true: Sequence[object] | np.ndarray,
    domains: Sequence[int] | np.ndarray,
    confidence: Sequence[float] | np.ndarray,
    *,
    n_bins: int = N_BINS,
) -> CalibrationTable:
    """One site's (or section's) table; cells without a label are left out.

    ``labels_true``, ``domains``, ``confidence``: ``(n_obs,)`` each.
    """
    true = _as_label_array(labels_true)  # type: ignore[arg-type]  # it takes arrays too
    dom = np.asarray(domains).reshape(-1).astype(np.int64)
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if not true.shape[0] == dom.shape[0] == conf.shape[0]:
        raise ValueError(f"{true.shape[0]} labels, {dom.shape[0]} domains and {conf.shape[0]} confidences")
    keep = ~_missing_mask(true)
    names, rows = np.unique(np.array([str(v) for v in true[keep].tolist()], dtype=str), return_inverse=True)
    ids, cols = np.unique(dom[keep], return_inverse=True)
    flat = (confidence_bins(conf[keep], n_bins) * names.size + rows.reshape(-1)) * ids.size + cols.reshape(-1)
    size = n_bins * names.size * ids.size
    counts = np.bincount(flat, minlength=size)
    sums = np.bincount(flat, weights=conf[keep], minlength=size)
    return CalibrationTable(names.tolist(), ids.tolist(), counts, sums)


def merge_calibration_tables(tables: Sequence[CalibrationTable]) -> CalibrationTable:
    """Sum tables of several sections or sites, aligned by label and domain (union)."""
    if not tables:
        raise ValueError("no calibration table to merge")
    labels = sorted({v for t in tables for v in t.labels})
    domains = sorted({d for t in tables for d in t.domains})
    row, col = {v: i for i, v in enumerate(labels)}, {d: j for j, d in enumerate(domains)}
    counts = np.zeros((tables[0].n_bins, len(labels), len(domains)), dtype=np.int64)
    sums = np.zeros(counts.shape)
    for t in tables:
        if t.n_bins != counts.shape[0]:
            raise ValueError("calibration tables with different bins")
        index = np.ix_(range(t.n_bins), [row[v] for v in t.labels], [col[d] for d in t.domains])
        counts[index] += t.counts
        sums[index] += t.confidence
    return CalibrationTable(labels, domains, counts, sums)


def match_domains(table: CalibrationTable) -> dict[int, str]:
    """Domain -> label, one-to-one, maximizing the cells of matched pairs (Hungarian)."""
    overlap = table.counts.sum(axis=0)  # (L, D)
    rows, cols = linear_sum_assignment(-overlap)
    return {table.domains[c]: table.labels[r] for r, c in zip(rows, cols, strict=True)}


def calibration_report(table: CalibrationTable, matching: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Expected calibration error, the reliability curve per bin and the coverage above 0.9.

    ``ece = sum_b n_b / n * |accuracy_b - mean confidence_b|`` over non-empty bins.
    """
    matching = dict(match_domains(table) if matching is None else matching)
    correct = np.zeros(table.counts.shape, dtype=bool)
    for j, d in enumerate(table.domains):
        if d in matching and matching[d] in table.labels:
            correct[:, table.labels.index(matching[d]), j] = True
    n_b = table.counts.sum(axis=(1, 2)).astype(np.float64)
    hits_b = np.where(correct, table.counts, 0).sum(axis=(1, 2)).astype(np.float64)
    conf_b = table.confidence.sum(axis=(1, 2))
    n = n_b.sum()
    if n == 0:
        return {"n_cells": 0}
    with np.errstate(invalid="ignore", divide="ignore"):
        acc, mean_conf = hits_b / n_b, conf_b / n_b
    filled = n_b > 0
    ece = float(np.sum(n_b[filled] / n * np.abs(acc[filled] - mean_conf[filled])))
    high = confidence_bins(np.array([HIGH + 1e-12]), table.n_bins)[0]  # first bin above 0.9
    n_high = n_b[high:].sum()
    edges = np.linspace(0, 1, table.n_bins + 1)
    return {
        "n_cells": int(n),
        "ece": ece,
        "accuracy": float(hits_b.sum() / n),
        "mean_confidence": float(conf_b.sum() / n),
        "coverage_above_0.9": float(n_high / n),
        "accuracy_above_0.9": float(hits_b[high:].sum() / n_high) if n_high else float("nan"),
        "matching": {str(d): label for d, label in sorted(matching.items())},
        "bins": [
            {"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(n_b[b]),
             "confidence": float(mean_conf[b]) if filled[b] else None, "accuracy": float(acc[b]) if filled[b] else None}
            for b in range(table.n_bins)
        ],
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, *, n_bins: int = N_BINS) -> float:
    """Pooled reference: ECE of per-cell confidences and 0/1 correctness, same bins."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    bins = confidence_bins(conf, n_bins)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
    return float(total)


# ------------------------------------------------------- label-free: neighbour temperature
TEMPERATURES = np.exp(np.linspace(np.log(0.1), np.log(100.0), 81))
"""Candidate temperatures (log-spaced, about 9 % apart); the server keeps the best."""


def tempered_log_posterior(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``(n, K)``: ``log softmax(logits / T)``; ``T = 1`` is the model's own posterior."""
    from scipy.special import log_softmax

    return np.asarray(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def neighbour_loss(
    logits: np.ndarray, domains: np.ndarray, neighbors: np.ndarray, temperatures: np.ndarray = TEMPERATURES
) -> tuple[np.ndarray, int]:
    """Label-free calibration loss of one site: for every temperature, the summed
    cross-entropy of each cell's tempered posterior against its spatial neighbours' final
    domains, ``-sum_i sum_{j in N(i)} log softmax(logits_i / T)[d_j]``.

    A neighbour mostly lies in the same tissue domain as the cell, so its domain is a
    noisy stand-in for the cell's right one: the temperature that predicts it best makes
    a confidence of ``c`` mean that the model's call agrees with the tissue around the
    cell a fraction ``c`` of the time. Sums over sites give the pooled loss.

    ``logits``: ``(n, K)`` log weighted densities (any per-cell constant may be added);
    ``domains``: ``(n,)`` final domains; ``neighbors``: ``(n, m)`` indices into the same
    cells, ``-1`` for none. Returns ``(float64 (len(temperatures),), number of pairs)``.
    """
    rows, slots = np.nonzero(np.asarray(neighbors) >= 0)
    targets = np.asarray(domains, dtype=np.int64)[np.asarray(neighbors)[rows, slots]]
    losses = np.array([-tempered_log_posterior(logits, t)[rows, targets].sum() for t in temperatures])
    return losses, int(rows.size)


def fit_temperature(losses: np.ndarray, temperatures: np.ndarray = TEMPERATURES) -> float:
    """The temperature of the lowest summed loss (the first one on ties)."""
    return float(np.asarray(temperatures)[int(np.argmin(losses))])


def tempered_confidence(logits: np.ndarray, domains: np.ndarray, temperature: float) -> np.ndarray:
    """``(n,)``: each cell's tempered posterior of its final domain."""
    dom = np.asarray(domains, dtype=np.int64)
    return np.exp(tempered_log_posterior(logits, temperature)[np.arange(dom.size), dom])
