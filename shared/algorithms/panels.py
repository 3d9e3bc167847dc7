"""Small feature panels mapped onto the federation's feature space.

Intersecting feature lists is the usual harmonization, but one section measured with a
small targeted panel (a 500-gene Visium panel, a 40-marker CODEX panel next to whole
transcriptomes) would shrink every site's features to the few it shares. Instead:

1. :func:`plan_panels` calls a section *mapped* when its panel holds fewer than
   ``min_fraction`` x the median section's features; the feature space is built from the
   other (*reference*) sections only.
2. Reference sites return regression sums (:func:`panel_moments`) between their cells'
   panel features and their model inputs (the standardized features or their principal
   components); the server fits a ridge regression (:func:`fit_panel_map`).
3. A mapped section's model input is then predicted from its own panel
   (:meth:`PanelMap.transform`), so the same model and clustering apply to every section.

The server only ever sees ``p x p`` and ``p x r`` sums over many cells (``p`` panel
features, ``r`` model inputs), like the federated PCA products.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedspatial.shared.features.selection import HarmonizationError

logger = logging.getLogger(__name__)

__all__ = ["PanelMap", "PanelPlan", "fit_panel_map", "merge_panel_moments", "panel_moments", "plan_panels"]


@dataclass
class PanelPlan:
    """Which sections define the feature space and which are mapped onto it.

    Attributes
    ----------
    shared
        Features present in every reference section, in the first reference section's order.
    reference
        Keys of the sections whose features define the space.
    panels
        Panel id -> the features (a subset of ``shared``, in ``shared`` order) a group of
        mapped sections has.
    mapped
        Mapped section key -> its panel id.
    """

    shared: list[str]
    reference: list[str]
    panels: dict[str, list[str]] = field(default_factory=dict)
    mapped: dict[str, str] = field(default_factory=dict)


def _panel_id(features: Sequence[str]) -> str:
    return "panel-" + hashlib.sha256("\n".join(features).encode()).hexdigest()[:12]


def plan_panels(section_features: Mapping[str, Sequence[str]], *, min_fraction: float = 0.5) -> PanelPlan:
    """Split sections into reference sections and small panels mapped onto them.

    Parameters
    ----------
    section_features
        Feature names of every section, keyed by section (``site/section``).
    min_fraction
        A section holding fewer than ``min_fraction`` x the median section's features is
        mapped; ``0`` keeps the plain intersection over all sections. Default 0.5.

    Returns
    -------
    PanelPlan

    Raises
    ------
    HarmonizationError
        If no section is given, or a mapped panel shares no feature with the reference
        sections (the message names it).
    """
    from fedspatial.shared.features.selection import shared_features

    if not section_features:
        raise HarmonizationError("no sections given; cannot build a shared feature space.")
    sizes = {key: len(names) for key, names in section_features.items()}
    cutoff = min_fraction * float(np.median(list(sizes.values())))
    small = {key for key, n in sizes.items() if n < cutoff}
    reference = [key for key in section_features if key not in small]
    shared = shared_features({key: section_features[key] for key in reference})
    plan = PanelPlan(shared=shared, reference=reference)
    for key in section_features:
        if key not in small:
            continue
        have = set(section_features[key])
        panel = [f for f in shared if f in have]
        if not panel:
            msg = (
                f"section {key!r} ({sizes[key]} features) shares no feature with the other sections; "
                "check its identifiers (data.feature-key)."
            )
            raise HarmonizationError(msg)
        pid = _panel_id(panel)
        plan.panels[pid] = panel
        plan.mapped[key] = pid
    if plan.mapped:
        logger.info(
            "plan_panels: %d features shared by %d reference section(s); %s mapped from their own panel",
            len(shared),
            len(reference),
            ", ".join(f"{k} ({len(plan.panels[p])} shared features)" for k, p in plan.mapped.items()),
        )
    return plan


def panel_moments(X: np.ndarray, Z: np.ndarray) -> dict[str, np.ndarray]:
    """A reference site's regression sums between panel features ``X`` ``(n, p)`` and
    model inputs ``Z`` ``(n, r)`` of the same cells (float64)."""
    X = np.asarray(X, dtype=np.float64)
    Z = np.asarray(Z, dtype=np.float64)
    if X.ndim != 2 or Z.ndim != 2 or len(X) != len(Z):
        raise ValueError(f"X and Z must be 2-D with the same rows; got {X.shape} and {Z.shape}")
    return {
        "count": np.array([float(len(X))]),
        "sum-x": X.sum(axis=0),
        "sum-z": Z.sum(axis=0),
        "sumsq-z": np.square(Z).sum(axis=0),
        "xtx": X.T @ X,
        "xtz": X.T @ Z,
    }


def merge_panel_moments(moments: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not moments:
        raise ValueError("merge_panel_moments needs at least one site's sums")
    return {key: np.sum([np.asarray(m[key], dtype=np.float64) for m in moments], axis=0) for key in moments[0]}


@dataclass
class PanelMap:
    """Linear map from a panel's standardized features to the model inputs.

    Attributes
    ----------
    coef
        ``(p, r)`` regression coefficients.
    intercept
        ``(r,)``.
    r2
        ``(r,)`` in-sample coefficient of determination of each model input on the
        reference cells (how much of it the panel explains).
    """

    coef: np.ndarray
    intercept: np.ndarray
    r2: np.ndarray

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) @ self.coef + self.intercept).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef, "intercept": self.intercept, "r2": self.r2}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> PanelMap:
        return cls(*(np.asarray(arrays[k], dtype=np.float64) for k in ("coef", "intercept", "r2")))


def fit_panel_map(merged: Mapping[str, np.ndarray], *, ridge: float = 1e-3) -> PanelMap:
    """Ridge regression of the model inputs on the panel features, with intercept,
    from pooled sums (equal to fitting on the pooled cells).

    Parameters
    ----------
    merged
        :func:`merge_panel_moments` over the reference sites.
    ridge
        Penalty relative to the mean panel-feature variance (standardized features:
        about 1). Default 1e-3, enough to keep collinear panels well posed.
    """
    n = float(merged["count"][0])
    if n < 2:
        raise ValueError("a panel map needs at least two reference cells")
    mx = merged["sum-x"] / n
    mz = merged["sum-z"] / n
    sxx = merged["xtx"] / n - np.outer(mx, mx)
    sxz = merged["xtz"] / n - np.outer(mx, mz)
    scale = max(float(np.trace(sxx)) / len(sxx), 1e-12)
    coef = np.linalg.solve(sxx + ridge * scale * np.eye(len(sxx)), sxz)
    # explained variance from the same sums: 2 b'sxz - b'sxx b, per output
    explained = np.einsum("pr,pr->r", coef, sxz) * 2 - np.einsum("pr,pq,qr->r", coef, sxx, coef)
    var_z = merged["sumsq-z"] / n - mz**2
    r2 = np.where(var_z > 0, explained / np.where(var_z > 0, var_z, 1.0), 0.0)
    return PanelMap(coef=coef, intercept=mz - mx @ coef, r2=r2)
