"""Per-feature aggregates of a site's cells: the only thing a site sends to build the
feature space.

A site computes :class:`FeatureStats` (sums over its cells of the ``normalize_total``
values, of their ``log1p`` and of their squares, and detection counts) with
:func:`compute_feature_stats`; the server sums them with :func:`merge_feature_stats`.
:func:`mean_var` turns sums into scanpy's mean and unbiased variance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from fedspatial.shared.features.harmonization import check_features, count_blocks
from fedspatial.shared.features.normalization import (
    check_target_sum,
    log1p_matrix,
    normalize_total_f64,
)

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "STAT_FIELDS",
    "FeatureStats",
    "compute_feature_stats",
    "mean_var",
    "merge_feature_stats",
    "to_numpy",
]

logger = logging.getLogger(__name__)

STAT_FIELDS = ("sum_norm", "sumsq_norm", "sum_log", "sumsq_log", "n_detected")


@dataclass
class FeatureStats:
    """Per-feature aggregates of one site (or of the federation, once merged).

    Attributes
    ----------
    features
        Feature names, the order of every array.
    n_cells
        Number of cells aggregated.
    sum_norm, sumsq_norm
        ``float64 (F,)``: sum and sum of squares over cells of the ``normalize_total``
        values (library size computed over ``features`` only).
    sum_log, sumsq_log
        ``float64 (F,)``: sum and sum of squares of ``log1p`` of those values.
    n_detected
        ``float64 (F,)``: number of cells with a count ``> 0``.
    """

    features: list[str]
    n_cells: int
    sum_norm: np.ndarray
    sumsq_norm: np.ndarray
    sum_log: np.ndarray
    sumsq_log: np.ndarray
    n_detected: np.ndarray

    def __post_init__(self) -> None:
        self.features = [str(f) for f in self.features]
        if isinstance(self.n_cells, bool) or int(self.n_cells) != self.n_cells or self.n_cells < 0:
            msg = f"n_cells must be a non-negative integer; got {self.n_cells!r}."
            raise ValueError(msg)
        self.n_cells = int(self.n_cells)
        n_features = len(self.features)
        for name in STAT_FIELDS:
            arr = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if arr.shape != (n_features,):
                msg = f"FeatureStats.{name} has {arr.size} entries for {n_features} features."
                raise ValueError(msg)
            setattr(self, name, arr)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The five ``float64`` arrays, keyed by field name (for a Flower ArrayRecord)."""
        return {name: getattr(self, name).copy() for name in STAT_FIELDS}

    @classmethod
    def from_arrays(
        cls, features: Sequence[str], n_cells: int, arrays: Mapping[str, Any]
    ) -> FeatureStats:
        """Rebuild from :meth:`to_arrays` output (plain arrays or Flower ``Array`` objects)."""
        missing = [name for name in STAT_FIELDS if name not in arrays]
        if missing:
            msg = f"FeatureStats arrays lack {missing}; expected keys {list(STAT_FIELDS)}."
            raise ValueError(msg)
        return cls(
            features=list(features),
            n_cells=int(n_cells),
            **{name: to_numpy(arrays[name]) for name in STAT_FIELDS},
        )


def to_numpy(value: Any) -> np.ndarray:
    """numpy view of an ndarray-like or of an object with a ``.numpy()`` method (Flower Array)."""
    if not isinstance(value, np.ndarray) and callable(getattr(value, "numpy", None)):
        value = value.numpy()
    return np.asarray(value)


def compute_feature_stats(
    adatas: Sequence[AnnData] | AnnData,
    features: Sequence[str],
    *,
    target_sum: float = 1e4,
    feature_key: str | None = None,
    layer: str | None = None,
) -> FeatureStats:
    """Per-feature aggregates of a site's sections, over a given feature list.

    Each section is first restricted to ``features`` (in that order); the library
    size of a cell is therefore the total over these features only. Then
    ``normalize_total`` to ``target_sum`` and ``log1p`` are applied and the sums are
    accumulated in float64.

    Parameters
    ----------
    adatas
        The site's sections (a single AnnData is accepted too), raw counts.
    features
        Feature names (typically :func:`shared_features`), matched against
        :func:`feature_names` with ``feature_key``.
    target_sum
        Total per cell after normalization. Default ``1e4``.
    feature_key
        Column of ``adata.var`` with the identifiers; ``None`` uses ``var_names``.
        Default ``None``.
    layer
        Layer holding the counts; ``None`` uses ``adata.X``. Default ``None``.

    Returns
    -------
    FeatureStats
        Aggregates over all cells of all sections.
    """
    from anndata import AnnData

    target = check_target_sum(target_sum)
    feats = check_features(features)
    sections = [adatas] if isinstance(adatas, AnnData) else list(adatas)
    n_features = len(feats)
    sums = {name: np.zeros(n_features, dtype=np.float64) for name in STAT_FIELDS}
    n_cells = 0
    for adata in sections:
        n_cells += adata.n_obs
        for _, x in count_blocks(adata, feats, feature_key, layer):  # temporaries bounded by a block
            _accumulate(sums, x, target, n_features)
    logger.info(
        "compute_feature_stats: %d cells in %d section(s), %d features",
        n_cells,
        len(sections),
        n_features,
    )
    return FeatureStats(features=feats, n_cells=n_cells, **sums)


def _accumulate(
    sums: dict[str, np.ndarray], x: np.ndarray | sparse.csr_matrix, target: float, n_features: int
) -> None:
    """Add one block of counts' per-feature sums to ``sums``."""
    norm = normalize_total_f64(x, target)
    logged = log1p_matrix(norm)
    if isinstance(x, sparse.csr_matrix):
        assert isinstance(norm, sparse.csr_matrix) and isinstance(logged, sparse.csr_matrix)
        idx = norm.indices
        sums["sum_norm"] += np.bincount(idx, weights=norm.data, minlength=n_features)
        sums["sumsq_norm"] += np.bincount(idx, weights=norm.data**2, minlength=n_features)
        sums["sum_log"] += np.bincount(idx, weights=logged.data, minlength=n_features)
        sums["sumsq_log"] += np.bincount(idx, weights=logged.data**2, minlength=n_features)
        sums["n_detected"] += np.bincount(x.indices, weights=(x.data > 0).astype(np.float64), minlength=n_features)
    else:
        sums["sum_norm"] += norm.sum(axis=0)
        sums["sumsq_norm"] += (norm**2).sum(axis=0)
        sums["sum_log"] += logged.sum(axis=0)
        sums["sumsq_log"] += (logged**2).sum(axis=0)
        sums["n_detected"] += (np.asarray(x) > 0).sum(axis=0)


def merge_feature_stats(stats: Sequence[FeatureStats]) -> FeatureStats:
    """Sum the aggregates of several sites.

    Parameters
    ----------
    stats
        Per-site aggregates over the same features in the same order.

    Returns
    -------
    FeatureStats
        The federation's aggregates.

    Raises
    ------
    ValueError
        If ``stats`` is empty or the feature lists differ.
    """
    stats = list(stats)
    if not stats:
        msg = "merge_feature_stats needs at least one FeatureStats."
        raise ValueError(msg)
    features = stats[0].features
    for k, st in enumerate(stats[1:], start=1):
        if st.features != features:
            msg = (
                f"FeatureStats #{k} has different features ({len(st.features)}) than #0 "
                f"({len(features)}); all sites must aggregate over the same features in the same order."
            )
            raise ValueError(msg)
    merged = {name: np.sum([getattr(st, name) for st in stats], axis=0) for name in STAT_FIELDS}
    return FeatureStats(features=list(features), n_cells=sum(st.n_cells for st in stats), **merged)


def mean_var(total: np.ndarray, total_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from sums, as scanpy's ``_get_mean_var`` (no ddof for n=1)."""
    mean = total / n
    var = total_sq / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    # cancellation can leave tiny negatives for constant features
    return mean, np.maximum(var, 0.0)
