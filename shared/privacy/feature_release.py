"""One private release of everything that shapes a site's model inputs (feature statistics).

**Privacy unit:** one cell added or removed; the number of cells of each section and the
feature names are public.

**What is released.** Each cell's vector ``x = log1p(normalize_total(counts))`` over the
requested (shared) features is first scaled down by one factor per cell
(:func:`~fedspatial.shared.features.feature_stats.clip_cells`) so that

* ``||x|| <= R`` (``R = privacy.feature-clip``), and
* ``||x * x|| <= C2`` (element-wise square), ``C2 = min(min(log1p(T), R) R, R^2 / 8)``.

``min(log1p(T), R) R`` is what the first clip already guarantees (``x_g <= log1p(T)``
and ``x_g <= ||x||``, so ``||x * x|| <= max_g x_g ||x||``). ``R^2 / 8 = R^2 / sqrt(64)``
is the second bound's rule: a cell whose vector has norm ``R`` spread evenly over ``m``
features has ``||x * x|| = R^2 / sqrt(m)``, so the clip binds only for cells whose
expression is concentrated on fewer than about :data:`SPREAD_FEATURES` (64) features.
It is a scale, not a separate clip of the squares: the same factor multiplies ``x``,
so the released sums of squares remain exactly the squares of the inputs (a clip of
``x * x`` alone would bias every variance downwards). On the synthetic demo (400
features) ``||x * x||`` of the clipped cells is 25 to 35, well inside ``C2 = 50``; the
worst case (184 for ``R = 20``, ``T = 10^4``) would multiply the noise on the variances
by 3.7.

The site releases, in **one Gaussian mechanism**, two blocks:

1. for every section ``s``: ``A_s = sum_{cells of s} x`` (``F`` values); sections are
   disjoint, so one cell moves the concatenation of all ``A_s`` by at most ``R``;
2. for the site: ``B = sum_{cells} x * x`` (``F`` values), moved by at most ``C2``.

``B`` is released per site, not per section: only the pooled variance is used (the
federation's std, the selection), and one draw per site instead of one per section
keeps its noise ``sqrt(sections per site)`` times smaller. Each block gets Gaussian noise
of std ``b x`` its sensitivity with ``b = sigma sqrt(2)`` (:data:`BLOCKS` = 2), ``sigma``
the plan's ``feature_noise`` (:func:`~fedspatial.shared.privacy.budget.budget_plan`). Two
such blocks compose exactly into one Gaussian mechanism of noise multiplier
``b / sqrt(2) = sigma``, the one charged to the ledger (kind ``feature-stats``, once).

**What leaves the site:** ``sum_s A_s`` and ``B`` (post-processing of the release, free),
with the (public) variance of their noise. The site keeps the per-section ``A_s`` in its
state: a repeated request returns the same values without a new draw or charge, and
under ``features.scale: section`` each section is centred by its released mean
``A_s / n_s``.

**Replaces** :func:`fedspatial.shared.privacy.dp.feature_stats_bounds` and
:func:`fedspatial.shared.privacy.dp.noisy_feature_stats` (loose bounds ``T`` and ``T^2``
on unclipped values); nothing calls them any more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedspatial.shared.features.feature_stats import ClippedStats, compute_clipped_stats
from fedspatial.shared.protocol.payload import Payload

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "BLOCKS",
    "SPREAD_FEATURES",
    "STATE_PREFIX",
    "FeatureRelease",
    "ReleaseBounds",
    "block_noise_multiplier",
    "gaussian_release",
    "release_bounds",
    "release_features",
    "release_key",
]

logger = logging.getLogger(__name__)

SPREAD_FEATURES = 64
"""The square bound is ``R^2 / sqrt(SPREAD_FEATURES)``: it binds only for cells whose
expression is concentrated on fewer features than this."""
BLOCKS = 2
"""Blocks of the release (section sums, site sum of squares), each with multiplier ``sigma sqrt(BLOCKS)``."""
STATE_PREFIX = "fedspatial-feature-release-"
"""Prefix of the site-state key of a release (followed by :func:`release_key`)."""


@dataclass(frozen=True)
class ReleaseBounds:
    """Per-cell L2 bounds: of the clipped log-normalized vector, and of its square."""

    clip_norm: float
    clip_square: float


def release_bounds(feature_clip: float, target_sum: float) -> ReleaseBounds:
    """``R = feature_clip`` and ``C2 = min(min(log1p(T), R) R, R^2 / sqrt(SPREAD_FEATURES))``."""
    r = float(feature_clip)
    if not (r > 0 and math.isfinite(r)):
        raise ValueError(f"privacy.feature-clip must be a positive number; got {feature_clip!r}")
    natural = min(math.log1p(float(target_sum)), r) * r
    return ReleaseBounds(r, min(natural, r * r / math.sqrt(SPREAD_FEATURES)))


def block_noise_multiplier(noise_multiplier: float) -> float:
    """Noise multiplier of each block, so that the :data:`BLOCKS` compose to ``noise_multiplier``."""
    return float(noise_multiplier) * math.sqrt(BLOCKS)


def release_key(
    features: Sequence[str], sections: Sequence[str], target_sum: float, bounds: ReleaseBounds, noise_multiplier: float
) -> str:
    """Site-state key of the release answering this request (same request, same key)."""
    blob = json.dumps(
        [list(map(str, features)), list(map(str, sections)), float(target_sum),
         bounds.clip_norm, bounds.clip_square, float(noise_multiplier)]
    )
    return STATE_PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class FeatureRelease:
    """A site's released feature statistics, as it keeps them.

    Attributes
    ----------
    features
        Feature names, the column order.
    target_sum, bounds, noise_multiplier
        How it was computed (``noise_multiplier``: the whole release's, as charged).
    sections
        Section keys, the row order of ``sums``.
    n_cells
        Cells of each section (public).
    sums
        ``float64 (J, F)``: noisy per-section sums of the clipped vectors.
    sumsq
        ``float64 (F,)``: noisy site sum of their squares.
    """

    features: list[str]
    target_sum: float
    bounds: ReleaseBounds
    noise_multiplier: float
    sections: list[str]
    n_cells: list[int]
    sums: np.ndarray
    sumsq: np.ndarray

    @property
    def key(self) -> str:
        return release_key(self.features, self.sections, self.target_sum, self.bounds, self.noise_multiplier)

    def site_stats(self) -> ClippedStats:
        """What the site sends: the sum of its sections' sums, its sum of squares, and the
        variance of the noise on each (``J (b R)^2`` and ``(b C2)^2``)."""
        b = block_noise_multiplier(self.noise_multiplier)
        return ClippedStats(
            self.features, sum(self.n_cells), self.sums.sum(axis=0), self.sumsq,
            self.bounds.clip_norm, self.bounds.clip_square,
            noise_var_sum=len(self.sections) * (b * self.bounds.clip_norm) ** 2,
            noise_var_sumsq=(b * self.bounds.clip_square) ** 2,
        )

    def section_mean(self, section: str) -> np.ndarray:
        """``float64 (F,)``: a section's released mean, clamped at 0 (the clipped values are >= 0)."""
        if section not in self.sections:
            raise KeyError(f"the feature release holds no section {section!r} (it holds {self.sections})")
        j = self.sections.index(section)
        return np.maximum(self.sums[j] / max(self.n_cells[j], 1), 0.0)

    def to_payload(self) -> Payload:
        """For the site's state (arrays ``sums``, ``sumsq``; the rest in config)."""
        return Payload(
            arrays={"sums": self.sums.copy(), "sumsq": self.sumsq.copy()},
            config={
                "features": list(self.features), "sections": list(self.sections), "n-cells": list(self.n_cells),
                "target-sum": float(self.target_sum), "clip-norm": self.bounds.clip_norm,
                "clip-square": self.bounds.clip_square, "noise-multiplier": float(self.noise_multiplier),
            },
        )

    @classmethod
    def from_payload(cls, payload: Payload) -> FeatureRelease:
        n_cells = payload.config.get("n-cells", [])
        assert isinstance(n_cells, list)
        return cls(
            features=payload.strings("features"),
            target_sum=payload.number("target-sum"),
            bounds=ReleaseBounds(payload.number("clip-norm"), payload.number("clip-square")),
            noise_multiplier=payload.number("noise-multiplier"),
            sections=payload.strings("sections"),
            n_cells=[int(n) for n in n_cells],  # type: ignore[call-overload]
            sums=np.asarray(payload.array("sums"), dtype=np.float64),
            sumsq=np.asarray(payload.array("sumsq"), dtype=np.float64),
        )


def gaussian_release(
    exact: Sequence[tuple[str, ClippedStats]],
    *,
    target_sum: float,
    noise_multiplier: float,
    seed: int | None = None,
) -> FeatureRelease:
    """The Gaussian mechanism on exact per-section sums (see the module docstring).

    Parameters
    ----------
    exact
        ``(section key, exact ClippedStats)`` of every section, all with the same
        features and clip bounds.
    target_sum
        ``normalize_total``'s total (recorded).
    noise_multiplier
        ``sigma`` of the whole release (> 0); each block gets ``sigma sqrt(2)`` x its bound.
    seed
        Noise seed (tests); ``None`` draws a secret one.

    Returns
    -------
    FeatureRelease
        The noisy per-section sums and site sum of squares.
    """
    if not exact:
        raise ValueError("a feature release needs at least one section")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0; got {noise_multiplier!r}")
    first = exact[0][1]
    bounds = ReleaseBounds(first.clip_norm, first.clip_square)
    for key, st in exact:
        if st.features != first.features or (st.clip_norm, st.clip_square) != (bounds.clip_norm, bounds.clip_square):
            raise ValueError(f"section {key!r} was summed over other features or bounds than {exact[0][0]!r}")
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    b = block_noise_multiplier(noise_multiplier)
    sums = np.stack([st.sum_clipped for _, st in exact])
    sumsq = np.sum([st.sumsq_clipped for _, st in exact], axis=0)
    return FeatureRelease(
        features=list(first.features),
        target_sum=float(target_sum),
        bounds=bounds,
        noise_multiplier=float(noise_multiplier),
        sections=[key for key, _ in exact],
        n_cells=[st.n_cells for _, st in exact],
        sums=sums + rng.normal(0.0, b * bounds.clip_norm, size=sums.shape),
        sumsq=sumsq + rng.normal(0.0, b * bounds.clip_square, size=sumsq.shape),
    )


def release_features(
    sections: Sequence[tuple[str, AnnData]],
    features: Sequence[str],
    *,
    target_sum: float,
    bounds: ReleaseBounds,
    noise_multiplier: float,
    feature_key: str | None = None,
    seed: int | None = None,
) -> FeatureRelease:
    """Clip, sum per section and release (:func:`gaussian_release`) a site's sections.

    Parameters
    ----------
    sections
        ``(section key, AnnData with raw counts)`` of the sections released.
    features
        The requested (shared) features, the column order.
    """
    exact = [
        (key, compute_clipped_stats(
            adata, features, target_sum=target_sum, clip_norm=bounds.clip_norm,
            clip_square=bounds.clip_square, feature_key=feature_key,
        ))
        for key, adata in sections
    ]
    release = gaussian_release(exact, target_sum=target_sum, noise_multiplier=noise_multiplier, seed=seed)
    logger.info(
        "feature release: %d section(s), %d features, clip %.3g / %.3g, noise multiplier %.3f",
        len(sections), len(release.features), bounds.clip_norm, bounds.clip_square, noise_multiplier,
    )
    return release
