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

From a private release (:class:`ClippedStats`, see
:mod:`fedspatial.shared.privacy.feature_release`) :func:`build_feature_space` builds a
space that records the clip bounds: :func:`transform` then clips every cell exactly as
the released sums did (``normalize_total -> log1p -> clip -> subset -> scale``), so the
statistics describe the inputs. Its selection is :func:`clipped_highly_variable_mask`
and its variances are floored (:func:`clipped_moments`).

This module holds the feature space itself; its steps live beside it and are
re-exported here: names and their intersection in
:mod:`~fedspatial.shared.features.harmonization`, normalization in
:mod:`~fedspatial.shared.features.normalization`, the aggregates in
:mod:`~fedspatial.shared.features.feature_stats` and the selection in
:mod:`~fedspatial.shared.features.highly_variable`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from fedspatial.shared.features.feature_stats import (
    ClippedStats,
    FeatureStats,
    clip_cells,
    clipped_moments,
    compute_feature_stats,
    mean_var,
    merge_feature_stats,
    to_numpy,
)
from fedspatial.shared.features.harmonization import (
    HarmonizationError,
    check_features,
    count_blocks,
    feature_names,
    preview_names,
    shared_features,
)
from fedspatial.shared.features.highly_variable import (
    _seurat_dispersions as _seurat_dispersions,  # re-exported for tests/test_features.py
)
from fedspatial.shared.features.highly_variable import (
    clipped_highly_variable_mask,
    highly_variable_mask,
)
from fedspatial.shared.features.normalization import (
    check_target_sum,
    log1p_matrix,
    normalize_log,
    normalize_total_f64,
)

if TYPE_CHECKING:
    from anndata import AnnData

# The public names, as before the split: those defined in the modules above are
# re-exported, so ``from fedspatial.shared.features.selection import X`` keeps working.
__all__ = [
    "ClippedStats",
    "FeatureSpace",
    "FeatureStats",
    "HarmonizationError",
    "build_feature_space",
    "clipped_feature_space",
    "compute_feature_stats",
    "feature_names",
    "highly_variable_mask",
    "merge_feature_stats",
    "normalize_log",
    "shared_features",
    "transform",
]

logger = logging.getLogger(__name__)


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
    clip_norm, clip_square
        Set (both) for a space built from a private release: :func:`transform` scales each
        cell's log-normalized vector over ``shared`` down to these bounds
        (:func:`~fedspatial.shared.features.feature_stats.clip_cells`) before selecting
        and standardizing. ``None`` (default): no clipping.
    """

    shared: list[str]
    selected: list[str]
    mean: np.ndarray
    std: np.ndarray
    target_sum: float
    feature_key: str | None
    max_value: float = 10.0
    clip_norm: float | None = None
    clip_square: float | None = None

    def __post_init__(self) -> None:
        self.shared = [str(f) for f in self.shared]
        self.selected = [str(f) for f in self.selected]
        check_features(self.shared)
        if not self.selected:
            msg = "FeatureSpace.selected must not be empty."
            raise ValueError(msg)
        position = {f: i for i, f in enumerate(self.shared)}
        outside = [f for f in self.selected if f not in position]
        if outside:
            msg = f"selected features not in shared: {preview_names(outside)}."
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
        self.target_sum = check_target_sum(self.target_sum)
        if self.feature_key == "":
            self.feature_key = None
        self.max_value = float(self.max_value)
        if not self.max_value > 0:
            msg = f"max_value must be positive; got {self.max_value!r}."
            raise ValueError(msg)
        if (self.clip_norm is None) != (self.clip_square is None):
            raise ValueError("clip_norm and clip_square are set together or not at all.")
        if self.clip_norm is not None and self.clip_square is not None:
            self.clip_norm, self.clip_square = float(self.clip_norm), float(self.clip_square)
            if not (self.clip_norm > 0 and self.clip_square > 0):
                raise ValueError(f"clip bounds must be positive; got {self.clip_norm!r}, {self.clip_square!r}.")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"mean", "std"}`` as ``float32`` arrays (for a Flower ArrayRecord)."""
        return {"mean": self.mean.copy(), "std": self.std.copy()}

    def to_config(self) -> dict[str, Any]:
        """Scalars and name lists (for a Flower ConfigRecord).

        Keys ``"shared"`` and ``"selected"`` (``list[str]``), ``"target_sum"`` and
        ``"max_value"`` (``float``), ``"feature_key"`` (``str``; ``""`` for ``None``), and
        ``"clip_norm"``, ``"clip_square"`` (``float``) only when set (so a space without
        clipping keeps its fingerprint).
        """
        config: dict[str, Any] = {
            "shared": list(self.shared),
            "selected": list(self.selected),
            "target_sum": float(self.target_sum),
            "feature_key": self.feature_key or "",
            "max_value": float(self.max_value),
        }
        if self.clip_norm is not None:
            config.update({"clip_norm": float(self.clip_norm), "clip_square": float(self.clip_square or 0.0)})
        return config

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
            mean=to_numpy(arrays["mean"]),
            std=to_numpy(arrays["std"]),
            target_sum=float(config["target_sum"]),
            feature_key=None if feature_key is None else str(feature_key),
            max_value=float(config.get("max_value", 10.0)),
            clip_norm=None if config.get("clip_norm") is None else float(config["clip_norm"]),
            clip_square=None if config.get("clip_square") is None else float(config["clip_square"]),
        )

    def fingerprint(self) -> str:
        """Short stable hash (16 hex digits) of the whole space, for caching."""
        h = hashlib.sha256()
        h.update(json.dumps(self.to_config(), sort_keys=True).encode())
        h.update(self.mean.astype("<f4").tobytes())
        h.update(self.std.astype("<f4").tobytes())
        return h.hexdigest()[:16]


def build_feature_space(
    stats: FeatureStats | ClippedStats,
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
        computed with the same ``target_sum`` and ``feature_key``; or a merged private
        release (:class:`ClippedStats`, see :func:`clipped_feature_space`).
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
    if isinstance(stats, ClippedStats):
        return clipped_feature_space(
            stats, n_top_features=n_top_features, target_sum=target_sum, feature_key=feature_key,
            max_value=max_value, n_bins=n_bins,
        )
    if n_top_features is None:
        mask = np.ones(len(stats.features), dtype=bool)
    else:
        mask = highly_variable_mask(stats, n_top_features=n_top_features, n_bins=n_bins)
    mean, var = mean_var(stats.sum_log[mask], stats.sumsq_log[mask], stats.n_cells)
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


def clipped_feature_space(
    stats: ClippedStats,
    *,
    n_top_features: int | None,
    target_sum: float,
    feature_key: str | None = None,
    max_value: float = 10.0,
    n_bins: int = 20,
) -> FeatureSpace:
    """The feature space from a merged private release (noisy sums of clipped values).

    Selection: :func:`clipped_highly_variable_mask` (``None`` keeps every feature).
    Standardization: the noisy pooled mean, clamped at 0 (a clipped ``log1p`` value is
    never negative), and the std ``sqrt(max(var, floor))`` with the floor of
    :func:`clipped_moments` (the noise std of the variance estimate, from public
    quantities only); a variance that is still 0 (exact, constant feature) gets std 1 as
    in :func:`build_feature_space`. No NaN: every step is defined for any noisy input.
    The space records the clip bounds, so :func:`transform` clips the inputs likewise.
    """
    mean, var, floor, mean_noise = clipped_moments(stats)
    if n_top_features is None:
        mask = np.ones(len(stats.features), dtype=bool)
    else:
        mask = clipped_highly_variable_mask(
            stats.features, mean, var, floor, mean_noise, n_top_features=n_top_features, n_bins=n_bins
        )
    var = np.maximum(var[mask], floor[mask])
    # a variance at rounding level of the mean is zero (constant feature), as above
    var[var <= 1e-12 * mean[mask] ** 2] = 0.0
    std = np.sqrt(var)
    std[std == 0] = 1.0
    selected = [f for f, keep in zip(stats.features, mask, strict=True) if keep]
    logger.info(
        "clipped_feature_space: %d of %d features selected over %d cells; %d std(s) at the noise floor",
        len(selected), len(stats.features), stats.n_cells, int(np.sum(var == floor[mask])),
    )
    return FeatureSpace(
        shared=list(stats.features),
        selected=selected,
        mean=np.maximum(mean[mask], 0.0).astype(np.float32),
        std=std.astype(np.float32),
        target_sum=target_sum,
        feature_key=feature_key,
        max_value=max_value,
        clip_norm=stats.clip_norm,
        clip_square=stats.clip_square,
    )


def transform(
    adata: AnnData, space: FeatureSpace, *, layer: str | None = None, mean: np.ndarray | None = None
) -> np.ndarray:
    """Map a section's counts into the federation's model input space.

    Restricts to ``space.shared``, applies :func:`normalize_log` with
    ``space.target_sum``, clips each cell when the space has clip bounds
    (:func:`~fedspatial.shared.features.feature_stats.clip_cells`), keeps
    ``space.selected``, standardizes with ``space.mean`` (or ``mean``) / ``space.std``
    and clips to ``[-max_value, max_value]``. Every step is per cell: a row depends on
    that cell's counts and the space alone.

    Parameters
    ----------
    adata
        A section with raw counts; features matched with ``space.feature_key``.
    space
        The federation's feature space.
    layer
        Layer holding the counts; ``None`` uses ``adata.X``. Default ``None``.
    mean
        ``(len(space.selected),)`` centre used instead of ``space.mean`` (a section's
        released mean under local DP). Default ``None``.

    Returns
    -------
    numpy.ndarray
        ``float32 (n_obs, len(space.selected))``.

    Raises
    ------
    HarmonizationError
        If ``adata`` lacks shared features (they are named).
    """
    position = {f: i for i, f in enumerate(space.shared)}
    cols = np.array([position[f] for f in space.selected], dtype=np.int64)
    centre = space.mean if mean is None else np.asarray(mean).reshape(-1)
    if centre.shape != space.mean.shape:
        raise ValueError(f"mean has {centre.size} entries for {len(space.selected)} selected features.")
    centre, std = centre.astype(np.float64), space.std.astype(np.float64)
    out = np.empty((adata.n_obs, len(cols)), dtype=np.float32)
    # block by block: a 500,000-cell section's float64 temporaries would be several GiB
    for rows, x in count_blocks(adata, space.shared, space.feature_key, layer):
        logged = log1p_matrix(normalize_total_f64(x, space.target_sum))
        if space.clip_norm is not None and space.clip_square is not None:
            logged = clip_cells(logged, space.clip_norm, space.clip_square)  # over all shared features, as released
        sub = logged[:, cols]
        dense = sub.toarray() if isinstance(sub, sparse.csr_matrix) else np.asarray(sub)
        z = (dense - centre) / std
        np.clip(z, -space.max_value, space.max_value, out=z)
        out[rows] = z
    return out
