"""Seeded, stratified subsamples of cells, so the integration metrics cost the same at
any section size (as scib subsamples large data sets).

Which metric may be estimated on a subsample, and how (see
:mod:`~fedspatial.shared.evaluation.integration`):

* the silhouettes (batch and label ASW) are means over cells of a per-cell score made
  of mean distances to other cells: both the cells scored and the cells they are
  compared with are a stratified subsample (the silhouette *of* that subsample);
* LISI is a per-cell score over the cell's nearest neighbours among *all* cells: only
  the cells whose LISI enters the median are a subsample, their neighbours are searched
  among every cell, so each score is exact;
* graph connectivity is a property of the kNN graph: it is computed on the kNN graph of
  a stratified subsample (scib's subsampling of large data), so it is an estimate;
* the k-means behind ARI / NMI is fitted on a stratified subsample and every cell is
  then assigned to its nearest centre: ARI and NMI are over all cells.

Exact kNN searches in an embedding of tens of dimensions are brute force (trees are
slower there): O(queries x cells). With the subsamples above the report costs
O(max_cells^2 + lisi_cells x n) in time, and every distance block is bounded by
``WORKING_MEMORY_MIB`` (scikit-learn's ``working_memory``), never n x n.

Below ``max_cells`` nothing is subsampled: every metric is the exact one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["EXACT", "ReportSampling", "strata_of", "stratified_subsample"]

# Defaults of the integration report (documented in the README and integration.md).
MAX_CELLS = 10_000
LISI_CELLS = 5_000
WORKING_MEMORY_MIB = 64


@dataclass(frozen=True)
class ReportSampling:
    """How many cells the report scores at most; the subsamples are drawn with the
    report's seed (the run's ``seed``), stratified by label x batch.

    Attributes
    ----------
    max_cells : int or None
        Size of the subsample on which the silhouettes (batch and label ASW) and graph
        connectivity are computed and the k-means is fitted (None: all cells; the
        silhouettes are then O(n^2) in time).
    lisi_cells : int or None
        Cells whose LISI enters the median, their neighbours searched among all cells
        (None: all cells, O(n^2) in time by brute-force search).
    """

    max_cells: int | None = MAX_CELLS
    lisi_cells: int | None = LISI_CELLS

    def describe(self, n_cells: int, seed: int) -> dict[str, object]:
        """What the report did for ``n_cells`` cells (written into ``integration.json``)."""
        out: dict[str, object] = dict(asdict(self))
        out.update(
            n_cells=int(n_cells), seed=int(seed),
            subsampled=self.max_cells is not None and n_cells > self.max_cells,
            lisi_subsampled=self.lisi_cells is not None and n_cells > self.lisi_cells,
        )
        return out


EXACT = ReportSampling(max_cells=None, lisi_cells=None)


def stratified_subsample(strata: np.ndarray, max_cells: int | None, seed: int = 0) -> np.ndarray | None:
    """Sorted row indices of a stratified random subsample of about ``max_cells`` rows.

    Each stratum (e.g. label x batch) keeps its share of the rows, ``floor(max_cells *
    n_s / n)`` (at least one row, at most its ``n_s``), and the rows left over go to
    the strata with the largest remainders; within a stratum the rows are drawn
    uniformly without replacement. The total is ``max_cells``, plus at most one row per
    stratum too small to get one by its share.

    Parameters
    ----------
    strata : np.ndarray
        Integer stratum of each row (n,).
    max_cells : int or None
        Target size; None, or ``n <= max_cells``: no subsample.
    seed : int, default 0
        Random state (``numpy.random.default_rng``).

    Returns
    -------
    np.ndarray or None
        The rows (sorted, int64), or None when every row is kept.
    """
    strata = np.asarray(strata).reshape(-1)
    n = strata.size
    if max_cells is None or n <= max_cells:
        return None
    if max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    codes, sizes = np.unique(strata, return_inverse=True, return_counts=True)[1:]
    exact = max_cells * sizes / n
    quota = np.minimum(np.maximum(np.floor(exact).astype(np.int64), 1), sizes)
    left = max_cells - int(quota.sum())
    if left > 0:
        room = sizes - quota
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        for s in order:
            if left == 0:
                break
            if room[s] > 0:
                quota[s] += 1
                left -= 1
    rng = np.random.default_rng(seed)
    by_stratum = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chosen = [
        rng.choice(by_stratum[starts[s] : starts[s + 1]], size=int(quota[s]), replace=False)
        for s in range(sizes.size)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def strata_of(*columns: np.ndarray) -> np.ndarray:
    """One integer stratum per row from several integer code columns (their combination)."""
    out = np.zeros(np.asarray(columns[0]).size, dtype=np.int64)
    for col in columns:
        col = np.asarray(col, dtype=np.int64).reshape(-1)
        out = out * (int(col.max(initial=0)) + 1) + col
    return out
