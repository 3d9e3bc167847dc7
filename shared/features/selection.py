"""Harmonized feature space built from per-feature aggregates only.

Sites never send cells. Each site computes :class:`FeatureStats` (per-feature sums
over its cells) with :func:`compute_feature_stats`; the server sums them with
:func:`merge_feature_stats` and derives one :class:`FeatureSpace` with
:func:`build_feature_space`:

* ``shared``: the features present at every site (:func:`shared_features`); the
  library size of a cell is computed over these features only;
* ``selected``: highly-variable features, chosen by :func:`highly_variable_mask`,
  which reproduces ``scanpy.pp.highly_variable_genes(flavor="seurat")`` on the
  pooled, ``normalize_total`` + ``log1p``-transformed data from the sums alone;
* ``mean`` / ``std``: the standardization of ``sc.pp.scale`` on the pooled data.

Every site then maps its cells into the model input with :func:`transform`, which
equals the pooled scanpy pipeline ``normalize_total -> log1p -> subset -> scale``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "FeatureSpace",
    "FeatureStats",
    "HarmonizationError",
    "build_feature_space",
    "compute_feature_stats",
    "feature_names",
    "highly_variable_mask",
    "merge_feature_stats",
    "normalize_log",
    "shared_features",
    "transform",
]

logger = logging.getLogger(__name__)

_STAT_FIELDS = ("sum_norm", "sumsq_norm", "sum_log", "sumsq_log", "n_detected")


class HarmonizationError(ValueError):
    """The sites' feature spaces cannot be harmonized (no overlap, duplicates, missing)."""


# --------------------------------------------------------------------------- names
def feature_names(adata: AnnData, feature_key: str | None = None) -> list[str]:
    """Names identifying the features of ``adata`` across sites.

    Parameters
    ----------
    adata
        Annotated data matrix (cells x features).
    feature_key
        Column of ``adata.var`` holding the identifiers (e.g. ``"gene_ids"`` to match
        Ensembl IDs across panels whose symbols differ). Default ``None``: use
        ``adata.var_names``.

    Returns
    -------
    list of str
        One name per feature, in ``adata.var`` order.

    Raises
    ------
    KeyError
        If ``feature_key`` is not a column of ``adata.var``.
    HarmonizationError
        If the column has missing values.
    """
    if feature_key is None:
        return [str(name) for name in adata.var_names]
    if feature_key not in adata.var.columns:
        msg = (
            f"feature_key {feature_key!r} is not a column of adata.var; available "
            f"columns: {list(map(str, adata.var.columns))} (use feature_key=None for var_names)."
        )
        raise KeyError(msg)
    column = adata.var[feature_key]
    n_missing = int(column.isna().sum())
    if n_missing:
        msg = f"adata.var[{feature_key!r}] has {n_missing} missing value(s); every feature needs an identifier."
        raise HarmonizationError(msg)
    return [str(name) for name in column]


def _duplicates(names: Sequence[str]) -> list[str]:
    counts = pd.Series(list(names), dtype=object).value_counts()
    return [str(n) for n in counts.index[counts > 1]]


def _preview(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in total)" if len(names) > limit else "")


def shared_features(site_features: Mapping[str, Sequence[str]]) -> list[str]:
    """Features present at every site.

    Parameters
    ----------
    site_features
        Feature names of each site, keyed by site name.

    Returns
    -------
    list of str
        The intersection, in the order of the first site.

    Raises
    ------
    HarmonizationError
        If no site is given, if a site lists a feature twice, or if no feature is
        shared by all sites (the message names every site and its feature count).
    """
    if not site_features:
        msg = "no sites given; cannot build a shared feature space."
        raise HarmonizationError(msg)
    sites = {str(site): [str(n) for n in names] for site, names in site_features.items()}
    for site, names in sites.items():
        dups = _duplicates(names)
        if dups:
            msg = (
                f"site {site!r} has duplicate feature names ({len(dups)}): {_preview(dups)}; "
                "feature names must be unique (consider a different feature_key)."
            )
            raise HarmonizationError(msg)
    common = set.intersection(*(set(names) for names in sites.values()))
    first = next(iter(sites.values()))
    shared = [name for name in first if name in common]
    summary = ", ".join(f"{site!r} ({len(names)} features)" for site, names in sites.items())
    if not shared:
        msg = (
            f"no features shared with the federation: {summary}. Check that all sites "
            "use the same identifiers (feature_key, e.g. 'gene_ids')."
        )
        raise HarmonizationError(msg)
    logger.info(
        "shared_features: %d features shared by %d site(s): %s", len(shared), len(sites), summary
    )
    return shared


# --------------------------------------------------------------------------- normalization
def _check_target_sum(target_sum: Any) -> float:
    try:
        value = float(target_sum)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(target_sum, bool) or not np.isfinite(value) or value <= 0:
        msg = f"target_sum must be a positive finite number; got {target_sum!r}."
        raise ValueError(msg)
    return value


def _as_matrix(x: Any) -> np.ndarray | sparse.csr_matrix:
    """A canonical CSR matrix (sparse input) or a 2-D ndarray (anything else)."""
    if sparse.issparse(x):
        csr = sparse.csr_matrix(x)
        csr.sum_duplicates()
        return csr
    arr = np.asarray(x)
    if arr.ndim != 2:
        msg = f"expected a 2-D (cells x features) matrix; got shape {arr.shape}."
        raise ValueError(msg)
    return arr


def _normalize_f64(
    x: np.ndarray | sparse.csr_matrix, target_sum: float
) -> np.ndarray | sparse.csr_matrix:
    """``normalize_total`` in float64: each cell scaled to ``target_sum`` (zero cells stay 0)."""
    if isinstance(x, sparse.csr_matrix):
        data = np.asarray(x.data, dtype=np.float64)
        if data.size and data.min() < 0:
            msg = "normalization expects non-negative counts; found negative values."
            raise ValueError(msg)
        counts = np.bincount(
            np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)), weights=data, minlength=x.shape[0]
        )
        scale = counts / target_sum
        scale[scale == 0] = 1.0
        out = sparse.csr_matrix(
            (data / np.repeat(scale, np.diff(x.indptr)), x.indices.copy(), x.indptr.copy()),
            shape=x.shape,
        )
        return out
    dense = np.asarray(x, dtype=np.float64)
    if dense.size and dense.min() < 0:
        msg = "normalization expects non-negative counts; found negative values."
        raise ValueError(msg)
    scale = dense.sum(axis=1) / target_sum
    scale[scale == 0] = 1.0
    return dense / scale[:, None]


def _log1p(x: np.ndarray | sparse.csr_matrix) -> np.ndarray | sparse.csr_matrix:
    if isinstance(x, sparse.csr_matrix):
        return sparse.csr_matrix((np.log1p(x.data), x.indices, x.indptr), shape=x.shape)
    return np.log1p(x)


def normalize_log(x: Any, *, target_sum: float) -> np.ndarray | sparse.csr_matrix:
    """Per-cell ``normalize_total`` to ``target_sum`` followed by ``log1p``.

    Equals ``sc.pp.normalize_total(adata, target_sum=target_sum)`` followed by
    ``sc.pp.log1p(adata)`` (computed in float64, then cast).

    Parameters
    ----------
    x
        Counts, cells x features: a SciPy sparse matrix or an array-like.
    target_sum
        Total of every cell after normalization (e.g. ``1e4``). Cells whose total is
        zero stay zero.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix
        Same kind as the input (sparse input gives CSR). ``float64`` for ``float64``
        input, ``float32`` otherwise (integers included, as in scanpy).
    """
    target = _check_target_sum(target_sum)
    mat = _as_matrix(x)
    dtype = np.float64 if mat.dtype == np.float64 else np.float32
    out = _log1p(_normalize_f64(mat, target))
    return out.astype(dtype)


# --------------------------------------------------------------------------- statistics
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
        for name in _STAT_FIELDS:
            arr = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if arr.shape != (n_features,):
                msg = f"FeatureStats.{name} has {arr.size} entries for {n_features} features."
                raise ValueError(msg)
            setattr(self, name, arr)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The five ``float64`` arrays, keyed by field name (for a Flower ArrayRecord)."""
        return {name: getattr(self, name).copy() for name in _STAT_FIELDS}

    @classmethod
    def from_arrays(
        cls, features: Sequence[str], n_cells: int, arrays: Mapping[str, Any]
    ) -> FeatureStats:
        """Rebuild from :meth:`to_arrays` output (plain arrays or Flower ``Array`` objects)."""
        missing = [name for name in _STAT_FIELDS if name not in arrays]
        if missing:
            msg = f"FeatureStats arrays lack {missing}; expected keys {list(_STAT_FIELDS)}."
            raise ValueError(msg)
        return cls(
            features=list(features),
            n_cells=int(n_cells),
            **{name: _to_numpy(arrays[name]) for name in _STAT_FIELDS},
        )


def _to_numpy(value: Any) -> np.ndarray:
    """numpy view of an ndarray-like or of an object with a ``.numpy()`` method (Flower Array)."""
    if not isinstance(value, np.ndarray) and callable(getattr(value, "numpy", None)):
        value = value.numpy()
    return np.asarray(value)


def _counts(adata: AnnData, layer: str | None) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        msg = f"layer {layer!r} not found in adata.layers; available: {list(adata.layers.keys())}."
        raise KeyError(msg)
    return adata.layers[layer]


def _restrict(
    adata: AnnData, features: Sequence[str], feature_key: str | None, layer: str | None
) -> np.ndarray | sparse.csr_matrix:
    """Counts of ``adata`` for ``features``, in that order (CSR or dense)."""
    names = pd.Index(feature_names(adata, feature_key))
    wanted = pd.Index([str(f) for f in features])
    missing = [f for f in wanted if f not in names]
    if missing:
        where = "adata.var_names" if feature_key is None else f"adata.var[{feature_key!r}]"
        msg = f"{len(missing)} feature(s) of the feature space are missing from {where}: {_preview(missing)}."
        raise HarmonizationError(msg)
    if not names.is_unique:
        dups = set(_duplicates(list(names))) & set(wanted)
        if dups:
            msg = f"feature(s) appear more than once in the data: {_preview(sorted(dups))}."
            raise HarmonizationError(msg)
        positions = np.array([names.get_loc(f) for f in wanted], dtype=np.int64)
    else:
        positions = names.get_indexer(wanted).astype(np.int64)
    x = _as_matrix(_counts(adata, layer))[:, positions]
    if isinstance(x, sparse.csr_matrix):
        x = sparse.csr_matrix(x)
        x.sum_duplicates()
    return x


def _check_features(features: Sequence[str]) -> list[str]:
    feats = [str(f) for f in features]
    if not feats:
        msg = "features must not be empty."
        raise ValueError(msg)
    dups = _duplicates(feats)
    if dups:
        msg = f"features must be unique; duplicated: {_preview(dups)}."
        raise HarmonizationError(msg)
    return feats


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

    target = _check_target_sum(target_sum)
    feats = _check_features(features)
    sections = [adatas] if isinstance(adatas, AnnData) else list(adatas)
    n_features = len(feats)
    sums = {name: np.zeros(n_features, dtype=np.float64) for name in _STAT_FIELDS}
    n_cells = 0
    for adata in sections:
        x = _restrict(adata, feats, feature_key, layer)
        norm = _normalize_f64(x, target)
        logged = _log1p(norm)
        n_cells += x.shape[0]
        if isinstance(x, sparse.csr_matrix):
            assert isinstance(norm, sparse.csr_matrix) and isinstance(logged, sparse.csr_matrix)
            idx = norm.indices
            sums["sum_norm"] += np.bincount(idx, weights=norm.data, minlength=n_features)
            sums["sumsq_norm"] += np.bincount(idx, weights=norm.data**2, minlength=n_features)
            sums["sum_log"] += np.bincount(idx, weights=logged.data, minlength=n_features)
            sums["sumsq_log"] += np.bincount(idx, weights=logged.data**2, minlength=n_features)
            sums["n_detected"] += np.bincount(
                x.indices, weights=(x.data > 0).astype(np.float64), minlength=n_features
            )
        else:
            sums["sum_norm"] += norm.sum(axis=0)
            sums["sumsq_norm"] += (norm**2).sum(axis=0)
            sums["sum_log"] += logged.sum(axis=0)
            sums["sumsq_log"] += (logged**2).sum(axis=0)
            sums["n_detected"] += (np.asarray(x) > 0).sum(axis=0)
    logger.info(
        "compute_feature_stats: %d cells in %d section(s), %d features",
        n_cells,
        len(sections),
        n_features,
    )
    return FeatureStats(features=feats, n_cells=n_cells, **sums)


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
    merged = {name: np.sum([getattr(st, name) for st in stats], axis=0) for name in _STAT_FIELDS}
    return FeatureStats(features=list(features), n_cells=sum(st.n_cells for st in stats), **merged)


def _mean_var(total: np.ndarray, total_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from sums, as scanpy's ``_get_mean_var`` (no ddof for n=1)."""
    mean = total / n
    var = total_sq / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    # cancellation can leave tiny negatives for constant features
    return mean, np.maximum(var, 0.0)


# --------------------------------------------------------------------------- HVG
def _seurat_dispersions(stats: FeatureStats, n_bins: int) -> pd.DataFrame:
    """scanpy's ``flavor="seurat"`` per-feature table from the aggregates.

    Columns ``means``, ``dispersions``, ``mean_bin``, ``dispersions_norm``; mirrors
    ``scanpy.preprocessing._highly_variable_genes._highly_variable_genes_single_batch``.
    """
    mean, var = _mean_var(stats.sum_norm, stats.sumsq_norm, stats.n_cells)
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


# --------------------------------------------------------------------------- feature space
@dataclass
class FeatureSpace:
    """The federation's model input space.

    Attributes
    ----------
    shared
        Features present at every site; the library size is computed over these.
    selected
        Model input features: a subset of ``shared``, in ``shared`` order.
    mean, std
        ``float32 (len(selected),)``: mean and standard deviation of the
        ``log1p``-normalized values over the pooled cells, as ``sc.pp.scale``
        computes them (unbiased, ``ddof=1``; a zero std is stored as 1).
    target_sum
        Total per cell of ``normalize_total``.
    feature_key
        Column of ``adata.var`` holding the identifiers, ``None`` for ``var_names``.
    max_value
        Standardized values are clipped to ``[-max_value, max_value]``. Default 10.
    """

    shared: list[str]
    selected: list[str]
    mean: np.ndarray
    std: np.ndarray
    target_sum: float
    feature_key: str | None
    max_value: float = 10.0

    def __post_init__(self) -> None:
        self.shared = [str(f) for f in self.shared]
        self.selected = [str(f) for f in self.selected]
        _check_features(self.shared)
        if not self.selected:
            msg = "FeatureSpace.selected must not be empty."
            raise ValueError(msg)
        position = {f: i for i, f in enumerate(self.shared)}
        outside = [f for f in self.selected if f not in position]
        if outside:
            msg = f"selected features not in shared: {_preview(outside)}."
            raise ValueError(msg)
        pos = [position[f] for f in self.selected]
        if any(b <= a for a, b in pairwise(pos)):
            msg = "selected features must be unique and in shared order."
            raise ValueError(msg)
        self.mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(self.std, dtype=np.float32).reshape(-1)
        for name, arr in (("mean", self.mean), ("std", self.std)):
            if arr.shape != (len(self.selected),):
                msg = f"FeatureSpace.{name} has {arr.size} entries for {len(self.selected)} selected features."
                raise ValueError(msg)
            if not np.all(np.isfinite(arr)):
                msg = f"FeatureSpace.{name} has non-finite values."
                raise ValueError(msg)
        if np.any(self.std <= 0):
            msg = "FeatureSpace.std must be positive."
            raise ValueError(msg)
        self.target_sum = _check_target_sum(self.target_sum)
        if self.feature_key == "":
            self.feature_key = None
        self.max_value = float(self.max_value)
        if not self.max_value > 0:
            msg = f"max_value must be positive; got {self.max_value!r}."
            raise ValueError(msg)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"mean", "std"}`` as ``float32`` arrays (for a Flower ArrayRecord)."""
        return {"mean": self.mean.copy(), "std": self.std.copy()}

    def to_config(self) -> dict[str, Any]:
        """Scalars and name lists (for a Flower ConfigRecord).

        Keys ``"shared"`` and ``"selected"`` (``list[str]``), ``"target_sum"`` and
        ``"max_value"`` (``float``), ``"feature_key"`` (``str``; ``""`` for ``None``).
        """
        return {
            "shared": list(self.shared),
            "selected": list(self.selected),
            "target_sum": float(self.target_sum),
            "feature_key": self.feature_key or "",
            "max_value": float(self.max_value),
        }

    @classmethod
    def from_parts(cls, arrays: Mapping[str, Any], config: Mapping[str, Any]) -> FeatureSpace:
        """Rebuild from :meth:`to_arrays` and :meth:`to_config` output.

        ``arrays`` values may be numpy arrays or Flower ``Array`` objects (anything
        with a ``.numpy()`` method).
        """
        missing = [k for k in ("mean", "std") if k not in arrays] + [
            k for k in ("shared", "selected", "target_sum") if k not in config
        ]
        if missing:
            msg = f"cannot rebuild a FeatureSpace: missing {missing}."
            raise ValueError(msg)
        feature_key = config.get("feature_key") or None
        return cls(
            shared=list(config["shared"]),
            selected=list(config["selected"]),
            mean=_to_numpy(arrays["mean"]),
            std=_to_numpy(arrays["std"]),
            target_sum=float(config["target_sum"]),
            feature_key=None if feature_key is None else str(feature_key),
            max_value=float(config.get("max_value", 10.0)),
        )

    def fingerprint(self) -> str:
        """Short stable hash (16 hex digits) of the whole space, for caching."""
        h = hashlib.sha256()
        h.update(json.dumps(self.to_config(), sort_keys=True).encode())
        h.update(self.mean.astype("<f4").tobytes())
        h.update(self.std.astype("<f4").tobytes())
        return h.hexdigest()[:16]


def build_feature_space(
    stats: FeatureStats,
    *,
    n_top_features: int | None,
    target_sum: float,
    feature_key: str | None = None,
    max_value: float = 10.0,
    n_bins: int = 20,
) -> FeatureSpace:
    """The federation's feature space from pooled aggregates.

    Parameters
    ----------
    stats
        Merged aggregates over the shared features (:func:`merge_feature_stats`),
        computed with the same ``target_sum`` and ``feature_key``.
    n_top_features
        Number of highly-variable features to select (:func:`highly_variable_mask`);
        ``None`` keeps every feature (a small panel's standardization, see
        :mod:`fedspatial.shared.algorithms.panels`).
    target_sum
        Total per cell used for the statistics (stored for :func:`transform`).
    feature_key
        Identifier column used for the statistics. Default ``None`` (``var_names``).
    max_value
        Clip bound of the standardized values. Default 10.0.
    n_bins
        Number of mean bins for the selection. Default 20.

    Returns
    -------
    FeatureSpace
        ``shared = stats.features``, the selected subset and its standardization.
    """
    if n_top_features is None:
        mask = np.ones(len(stats.features), dtype=bool)
    else:
        mask = highly_variable_mask(stats, n_top_features=n_top_features, n_bins=n_bins)
    mean, var = _mean_var(stats.sum_log[mask], stats.sumsq_log[mask], stats.n_cells)
    # treat a variance at rounding level of the mean as zero (constant feature)
    var[var <= 1e-12 * mean**2] = 0.0
    std = np.sqrt(var)
    std[std == 0] = 1.0
    selected = [f for f, keep in zip(stats.features, mask, strict=True) if keep]
    logger.info(
        "build_feature_space: %d of %d shared features selected over %d cells",
        len(selected),
        len(stats.features),
        stats.n_cells,
    )
    return FeatureSpace(
        shared=list(stats.features),
        selected=selected,
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        target_sum=target_sum,
        feature_key=feature_key,
        max_value=max_value,
    )


def transform(adata: AnnData, space: FeatureSpace, *, layer: str | None = None) -> np.ndarray:
    """Map a section's counts into the federation's model input space.

    Restricts to ``space.shared``, applies :func:`normalize_log` with
    ``space.target_sum``, keeps ``space.selected``, standardizes with
    ``space.mean`` / ``space.std`` and clips to ``[-max_value, max_value]``.

    Parameters
    ----------
    adata
        A section with raw counts; features matched with ``space.feature_key``.
    space
        The federation's feature space.
    layer
        Layer holding the counts; ``None`` uses ``adata.X``. Default ``None``.

    Returns
    -------
    numpy.ndarray
        ``float32 (n_obs, len(space.selected))``.

    Raises
    ------
    HarmonizationError
        If ``adata`` lacks shared features (they are named).
    """
    x = _restrict(adata, space.shared, space.feature_key, layer)
    logged = _log1p(_normalize_f64(x, space.target_sum))
    position = {f: i for i, f in enumerate(space.shared)}
    cols = np.array([position[f] for f in space.selected], dtype=np.int64)
    sub = logged[:, cols]
    dense = sub.toarray() if isinstance(sub, sparse.csr_matrix) else np.asarray(sub)
    z = (dense - space.mean.astype(np.float64)) / space.std.astype(np.float64)
    np.clip(z, -space.max_value, space.max_value, out=z)
    return z.astype(np.float32)
