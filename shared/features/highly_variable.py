"""Highly-variable features from pooled aggregates, as scanpy's ``flavor="seurat"``.

:func:`highly_variable_mask` reproduces ``scanpy.pp.highly_variable_genes(flavor="seurat")``
on the pooled, ``normalize_total`` + ``log1p``-transformed cells from the sums in a
merged :class:`~fedspatial.shared.features.feature_stats.FeatureStats` alone.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from fedspatial.shared.features.feature_stats import FeatureStats, mean_var
from fedspatial.shared.features.harmonization import HarmonizationError

__all__ = ["highly_variable_mask"]

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
    finite = disp_norm[~np.isnan(disp_norm)]
    n_top = int(n_top_features)
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
