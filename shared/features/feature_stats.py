"""Per-feature aggregates of a site's cells: the only thing a site sends to build the
feature space.

A site computes :class:`FeatureStats` (sums over its cells of the ``normalize_total``
values, of their ``log1p`` and of their squares, and detection counts) with
:func:`compute_feature_stats`; the server sums them with :func:`merge_feature_stats`.
:func:`mean_var` turns sums into scanpy's mean and unbiased variance.

A private release (:mod:`fedspatial.shared.privacy.feature_release`) sends
:class:`ClippedStats` instead: sums of each cell's log-normalized vector after
:func:`clip_cells` bounded its contribution, and of its square, with the variance of
the noise added to them; :func:`clipped_moments` turns them into means, variances and
the variance floor.
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
    "CLIPPED_FIELDS",
    "STAT_FIELDS",
    "ClippedStats",
    "FeatureStats",
    "clip_cells",
    "clipped_moments",
    "compute_clipped_stats",
    "compute_feature_stats",
    "mean_var",
    "merge_clipped_stats",
    "merge_feature_stats",
    "to_numpy",
]

logger = logging.getLogger(__name__)

STAT_FIELDS = ("sum_norm", "sumsq_norm", "sum_log", "sumsq_log", "n_detected")
CLIPPED_FIELDS = ("sum_clipped", "sumsq_clipped")


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


# --------------------------------------------------------------------- clipped aggregates
@dataclass
class ClippedStats:
    """Per-feature sums of the clipped log-normalized values (a private release's content).

    Attributes
    ----------
    features
        Feature names, the order of every array.
    n_cells
        Number of cells summed (public).
    sum_clipped, sumsq_clipped
        ``float64 (F,)``: sums over cells of :func:`clip_cells` of ``log1p(normalize_total)``
        and of its square (noised when released).
    clip_norm, clip_square
        The bounds :func:`clip_cells` applied: L2 norm of a cell's vector, and of its square.
    noise_var_sum, noise_var_sumsq
        Variance of the Gaussian noise on each entry of ``sum_clipped`` / ``sumsq_clipped``
        (0 for exact sums); the server derives its floors and thresholds from them.
    """

    features: list[str]
    n_cells: int
    sum_clipped: np.ndarray
    sumsq_clipped: np.ndarray
    clip_norm: float
    clip_square: float
    noise_var_sum: float = 0.0
    noise_var_sumsq: float = 0.0

    def __post_init__(self) -> None:
        self.features = [str(f) for f in self.features]
        if isinstance(self.n_cells, bool) or int(self.n_cells) != self.n_cells or self.n_cells < 0:
            raise ValueError(f"n_cells must be a non-negative integer; got {self.n_cells!r}.")
        self.n_cells = int(self.n_cells)
        for name in CLIPPED_FIELDS:
            arr = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if arr.shape != (len(self.features),):
                raise ValueError(f"ClippedStats.{name} has {arr.size} entries for {len(self.features)} features.")
            setattr(self, name, arr)
        self.clip_norm, self.clip_square = float(self.clip_norm), float(self.clip_square)
        if not (self.clip_norm > 0 and self.clip_square > 0):
            raise ValueError(f"clip bounds must be positive; got {self.clip_norm!r}, {self.clip_square!r}.")
        self.noise_var_sum, self.noise_var_sumsq = float(self.noise_var_sum), float(self.noise_var_sumsq)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The two ``float64 (F,)`` arrays, keyed by field name."""
        return {name: getattr(self, name).copy() for name in CLIPPED_FIELDS}


def clip_cells(
    x: np.ndarray | sparse.csr_matrix, clip_norm: float, clip_square: float
) -> np.ndarray | sparse.csr_matrix:
    """Each cell's (row's) values scaled down so that their L2 norm is at most
    ``clip_norm`` and the L2 norm of their element-wise square at most ``clip_square``.

    One factor per cell, ``s = min(1, clip_norm / ||x||, sqrt(clip_square / ||x * x||))``
    (a hair below it where it binds, so that rounding never lifts a norm above its bound).
    A row's result depends on that row alone (no sum runs across rows), so removing a
    cell leaves every other row bit-identical.

    Parameters
    ----------
    x
        ``float64 (n, F)``: ``log1p(normalize_total)`` values, dense or CSR.
    clip_norm, clip_square
        The two bounds (positive).

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix
        ``float64 (n, F)``, the same kind as ``x``.
    """
    if isinstance(x, sparse.csr_matrix):
        data = np.asarray(x.data, dtype=np.float64)
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        squares = data * data
        # bincount adds each row's entries in order: a row's total ignores the other rows
        scale = _clip_scale(
            np.bincount(rows, weights=squares, minlength=x.shape[0]),
            np.bincount(rows, weights=squares * squares, minlength=x.shape[0]),
            clip_norm,
            clip_square,
        )
        return sparse.csr_matrix((data * scale[rows], x.indices.copy(), x.indptr.copy()), shape=x.shape)
    dense = np.asarray(x, dtype=np.float64)
    squares = dense * dense
    scale = _clip_scale(squares.sum(axis=1), (squares * squares).sum(axis=1), clip_norm, clip_square)
    return dense * scale[:, None]


def _clip_scale(norm_sq: np.ndarray, quartic: np.ndarray, clip_norm: float, clip_square: float) -> np.ndarray:
    """``(n,)`` factors of :func:`clip_cells` from each row's sum of squares and of fourth powers."""
    with np.errstate(divide="ignore"):
        bound = np.minimum(clip_norm / np.sqrt(norm_sq), np.sqrt(clip_square / np.sqrt(quartic)))
    return np.where(bound < 1.0, bound * (1.0 - 1e-12), 1.0)


def compute_clipped_stats(
    adatas: Sequence[AnnData] | AnnData,
    features: Sequence[str],
    *,
    target_sum: float,
    clip_norm: float,
    clip_square: float,
    feature_key: str | None = None,
    layer: str | None = None,
) -> ClippedStats:
    """Exact :class:`ClippedStats` of some sections (restricted to ``features`` first, as
    :func:`compute_feature_stats`; then ``normalize_total``, ``log1p`` and :func:`clip_cells`)."""
    from anndata import AnnData

    target = check_target_sum(target_sum)
    feats = check_features(features)
    sections = [adatas] if isinstance(adatas, AnnData) else list(adatas)
    total, total_sq = np.zeros(len(feats)), np.zeros(len(feats))
    n_cells = 0
    for adata in sections:
        n_cells += adata.n_obs
        for _, x in count_blocks(adata, feats, feature_key, layer):
            clipped = clip_cells(log1p_matrix(normalize_total_f64(x, target)), clip_norm, clip_square)
            if isinstance(clipped, sparse.csr_matrix):
                total += np.bincount(clipped.indices, weights=clipped.data, minlength=len(feats))
                total_sq += np.bincount(clipped.indices, weights=clipped.data**2, minlength=len(feats))
            else:
                total += clipped.sum(axis=0)
                total_sq += (clipped**2).sum(axis=0)
    return ClippedStats(feats, n_cells, total, total_sq, clip_norm, clip_square)


def merge_clipped_stats(stats: Sequence[ClippedStats]) -> ClippedStats:
    """Sum several sites' :class:`ClippedStats` (independent noise: the variances add)."""
    stats = list(stats)
    if not stats:
        raise ValueError("merge_clipped_stats needs at least one ClippedStats.")
    first = stats[0]
    for k, st in enumerate(stats[1:], start=1):
        if st.features != first.features or (st.clip_norm, st.clip_square) != (first.clip_norm, first.clip_square):
            raise ValueError(f"ClippedStats #{k} differs from #0 in its features or clip bounds.")
    return ClippedStats(
        list(first.features),
        sum(st.n_cells for st in stats),
        np.sum([st.sum_clipped for st in stats], axis=0),
        np.sum([st.sumsq_clipped for st in stats], axis=0),
        first.clip_norm,
        first.clip_square,
        sum(st.noise_var_sum for st in stats),
        sum(st.noise_var_sumsq for st in stats),
    )


def clipped_moments(stats: ClippedStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Mean, unbiased variance, variance floor and the mean's noise std, from (noisy) sums.

    With ``n`` cells and noise variances ``v1`` (on each sum) and ``v2`` (on each sum of
    squares), the noisy variance ``(S2 / n - m^2) n / (n - 1)`` carries noise of std
    ``sqrt(v2 + 4 m^2 v1) / (n - 1)`` (first order, ``m`` the mean clamped at 0). That std
    is the **variance floor** of each feature: a variance no larger than its own noise is
    not told apart from noise, and dividing by its square root would blow the feature up.
    Exact sums give a floor of 0.

    Returns
    -------
    tuple
        ``mean``, ``var`` (may be negative under noise), ``floor`` (all ``float64 (F,)``)
        and the noise std of each mean, ``sqrt(v1) / n``.
    """
    n = stats.n_cells
    if n < 1:
        raise ValueError("clipped_moments needs statistics over at least one cell.")
    mean = stats.sum_clipped / n
    var = stats.sumsq_clipped / n - mean**2
    ddof = n / (n - 1) if n > 1 else 1.0
    var *= ddof
    m = np.maximum(mean, 0.0)
    floor = np.sqrt(stats.noise_var_sumsq + 4.0 * m**2 * stats.noise_var_sum) / n * ddof
    return mean, var, floor, float(np.sqrt(stats.noise_var_sum) / n)
