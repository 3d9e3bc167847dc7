"""Highly-variable features from pooled aggregates, as scanpy's ``flavor="seurat"``.

:func:`highly_variable_mask` reproduces ``scanpy.pp.highly_variable_genes(flavor="seurat")``
on the pooled, ``normalize_total`` + ``log1p``-transformed cells from the sums in a
merged :class:`~fedspatial.shared.features.feature_stats.FeatureStats` alone.

:func:`clipped_highly_variable_mask` is its variant for a private release, which holds
only the clipped ``log1p`` values (:class:`~fedspatial.shared.features.feature_stats.ClippedStats`):
the same per-bin normalized log dispersion, computed from their mean and variance, over
the features whose noisy mean stands clear of the noise.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from fedspatial.shared.features.feature_stats import FeatureStats, mean_var
from fedspatial.shared.features.harmonization import HarmonizationError

__all__ = ["MEAN_NOISE_STDS", "clipped_highly_variable_mask", "highly_variable_mask"]

MEAN_NOISE_STDS = 3.0
"""A feature competes in :func:`clipped_highly_variable_mask` only when its noisy mean
exceeds this many noise stds (else its dispersion is a ratio of noise to noise)."""

logger = logging.getLogger(__name__)


def _seurat_dispersions(stats: FeatureStats, n_bins: int) -> pd.DataFrame:
    """scanpy's ``flavor="seurat"`` per-feature table from the aggregates.

    Columns ``means``, ``dispersions``, ``mean_bin``, ``dispersions_norm``; mirrors
    ``scanpy.preprocessing._highly_variable_genes._highly_variable_genes_single_batch``.
    """
    mean, var = mean_var(stats.sum_norm, stats.sumsq_norm, stats.n_cells)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion}, index=pd.Index(stats.features))
    return _normalize_in_bins(df, n_bins)


def _normalize_in_bins(df: pd.DataFrame, n_bins: int) -> pd.DataFrame:
    """Add ``mean_bin`` (``pd.cut`` of ``means``) and ``dispersions_norm`` (per-bin z-score)."""
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    bin_stats = grouped.agg(avg="mean", dev="std")
    # a bin with a single feature has no std: scanpy sets its normalized dispersion to 1
    one_per_bin = bin_stats["dev"].isnull()
    bin_stats.loc[one_per_bin, "dev"] = bin_stats.loc[one_per_bin, "avg"]
    bin_stats.loc[one_per_bin, "avg"] = 0
    per_feature = bin_stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - per_feature["avg"]) / per_feature["dev"]
    return df


def highly_variable_mask(
    stats: FeatureStats, *, n_top_features: int, n_bins: int = 20
) -> np.ndarray:
    """Highly-variable features, as scanpy's ``flavor="seurat"``, from aggregates.

    Equals ``sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top_features,
    n_bins=n_bins)`` run on the pooled cells after ``sc.pp.normalize_total(adata,
    target_sum)`` and ``sc.pp.log1p(adata)``: mean and unbiased variance of the
    normalized values, log dispersion, ``pd.cut`` of ``log1p(mean)`` into ``n_bins``
    equal-width bins, per-bin z-score (a bin holding one feature gets 1), and the top
    ``n_top_features`` normalized dispersions, ties at the cut-off included.
    Features with an undefined normalized dispersion (e.g. constant features) are
    not selected; if fewer than ``n_top_features`` have one, all of those are.

    Parameters
    ----------
    stats
        Pooled (merged) aggregates.
    n_top_features
        Number of features to select. If ``>= len(stats.features)`` every feature is
        selected (scanpy would drop those with an undefined dispersion).
    n_bins
        Number of mean bins. Default 20.

    Returns
    -------
    numpy.ndarray
        ``bool (F,)`` mask over ``stats.features``.
    """
    if (
        isinstance(n_top_features, bool)
        or not isinstance(n_top_features, int | np.integer)
        or n_top_features < 1
    ):
        msg = f"n_top_features must be a positive integer; got {n_top_features!r}."
        raise ValueError(msg)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        msg = f"n_bins must be a positive integer; got {n_bins!r}."
        raise ValueError(msg)
    if stats.n_cells < 1:
        msg = "highly_variable_mask needs statistics over at least one cell."
        raise ValueError(msg)
    n_features = len(stats.features)
    if n_top_features >= n_features:
        logger.info(
            "highly_variable_mask: n_top_features=%d >= %d features; selecting all",
            n_top_features,
            n_features,
        )
        return np.ones(n_features, dtype=bool)
    disp_norm = _seurat_dispersions(stats, int(n_bins))["dispersions_norm"].to_numpy(
        dtype=np.float64
    )
    return _top(disp_norm, int(n_top_features))


def _top(disp_norm: np.ndarray, n_top: int) -> np.ndarray:
    """The ``n_top`` largest defined normalized dispersions (ties at the cut-off included)."""
    finite = disp_norm[~np.isnan(disp_norm)]
    if finite.size == 0:
        msg = "no feature has a defined dispersion (are all features constant?); cannot select features."
        raise HarmonizationError(msg)
    if n_top > finite.size:
        logger.warning(
            "n_top_features=%d > %d features with a defined dispersion; selecting those.",
            n_top,
            finite.size,
        )
        n_top = finite.size
    cutoff = np.sort(finite)[::-1][n_top - 1]
    return np.nan_to_num(disp_norm, nan=-np.inf) >= cutoff


def clipped_highly_variable_mask(
    features: list[str],
    mean: np.ndarray,
    var: np.ndarray,
    floor: np.ndarray,
    mean_noise_std: float,
    *,
    n_top_features: int,
    n_bins: int = 20,
) -> np.ndarray:
    """Highly-variable features from the (noisy) mean and variance of clipped ``log1p`` values.

    The log dispersion ``log(max(var, floor) / mean)`` of each feature is z-scored within
    ``n_bins`` equal-width bins of ``mean`` (scanpy's ``seurat`` rule, with the log values'
    own mean in place of ``log1p`` of the unlogged mean, which a private release does not
    hold); the ``n_top_features`` largest win. Only features whose mean exceeds
    :data:`MEAN_NOISE_STDS` x ``mean_noise_std`` compete, so a feature whose statistics
    are noise cannot win; the floor keeps a noise-sized variance from ranking as a signal.

    Parameters
    ----------
    features
        Names, the order of the arrays.
    mean, var, floor
        ``float64 (F,)`` from :func:`~fedspatial.shared.features.feature_stats.clipped_moments`.
    mean_noise_std
        Noise std of each mean (0 for exact statistics).
    n_top_features, n_bins
        As in :func:`highly_variable_mask`.

    Returns
    -------
    numpy.ndarray
        ``bool (F,)`` mask over ``features``.

    Raises
    ------
    HarmonizationError
        If no feature clears the noise (the message names the threshold).
    """
    if isinstance(n_top_features, bool) or not isinstance(n_top_features, int | np.integer) or n_top_features < 1:
        raise ValueError(f"n_top_features must be a positive integer; got {n_top_features!r}.")
    eligible = mean > max(MEAN_NOISE_STDS * mean_noise_std, 0.0)
    if not eligible.any():
        raise HarmonizationError(
            f"no feature has a mean above {MEAN_NOISE_STDS:g} noise stds ({MEAN_NOISE_STDS * mean_noise_std:.3g}): "
            "the feature statistics are all noise; raise privacy.target-epsilon (or lower privacy.feature-stats-noise)"
        )
    if n_top_features >= len(features):
        return np.ones(len(features), dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.maximum(var, floor)[eligible] / mean[eligible]
        dispersion[dispersion <= 0] = np.nan
        dispersion = np.log(dispersion)
    index = pd.Index([f for f, keep in zip(features, eligible, strict=True) if keep])
    df = pd.DataFrame({"means": mean[eligible], "dispersions": dispersion}, index=index)
    disp_norm = np.full(len(features), np.nan)
    disp_norm[eligible] = _normalize_in_bins(df, int(n_bins))["dispersions_norm"].to_numpy(dtype=np.float64)
    logger.info(
        "clipped_highly_variable_mask: %d of %d features clear %g noise stds of the mean",
        int(eligible.sum()), len(features), MEAN_NOISE_STDS,
    )
    return _top(disp_norm, int(n_top_features))
