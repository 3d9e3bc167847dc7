"""Pooled per-feature variance of all sites' cells, from per-site moments (it scales
scikit-learn's ``tol``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedspatial.shared.algorithms._kmeans_arrays import as_2d_float, row_chunks


@dataclass
class FeatureMoments:
    """Per-feature count, mean and sum of squared deviations (M2) of a site's cells.

    Equivalent information to per-feature sums and sums of squares, but combining
    means and M2 (Chan et al.) avoids the cancellation of ``E[x^2] - E[x]^2``.
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "count": np.array([self.count], dtype=np.float64),
            "mean": np.asarray(self.mean, dtype=np.float64),
            "m2": np.asarray(self.m2, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FeatureMoments:
        return cls(
            count=float(np.asarray(arrays["count"]).reshape(-1)[0]),
            mean=np.asarray(arrays["mean"], dtype=np.float64).reshape(-1),
            m2=np.asarray(arrays["m2"], dtype=np.float64).reshape(-1),
        )


def feature_moments(X: np.ndarray) -> FeatureMoments:
    """Per-feature moments of a site's cells (sent once, before k-means)."""
    X = as_2d_float(X, "X")
    d = X.shape[1]
    parts = []
    for sl in row_chunks(X.shape[0], 2 * d):
        Xc = np.asarray(X[sl], dtype=np.float64)
        mean = Xc.mean(axis=0)
        parts.append(FeatureMoments(float(Xc.shape[0]), mean, ((Xc - mean) ** 2).sum(axis=0)))
    if not parts:
        return FeatureMoments(0.0, np.zeros(d), np.zeros(d))
    return merge_feature_moments(parts)


def merge_feature_moments(moments: Sequence[FeatureMoments]) -> FeatureMoments:
    """Combine moments of disjoint sets of cells (pairwise update of Chan et al.)."""
    if len(moments) == 0:
        raise ValueError("no feature moments to merge")
    count, mean, m2 = 0.0, np.zeros_like(moments[0].mean), np.zeros_like(moments[0].m2)
    for m in moments:
        if m.count == 0:
            continue
        total = count + m.count
        delta = m.mean - mean
        mean = mean + delta * (m.count / total)
        m2 = m2 + m.m2 + delta**2 * (count * m.count / total)
        count = total
    return FeatureMoments(count, mean, m2)


def pooled_feature_variance_from_sites(site_moments: Sequence[FeatureMoments]) -> np.ndarray:
    """Per-feature (population, ddof=0) variance of the pooled cells of all sites.

    Parameters
    ----------
    site_moments : Sequence[FeatureMoments]
        One :func:`feature_moments` result per site.

    Returns
    -------
    np.ndarray
        float64 (D,), equal to ``np.var(np.vstack(site_X), axis=0)``.
    """
    merged = merge_feature_moments(site_moments)
    if merged.count == 0:
        raise ValueError("no cells at any site")
    return merged.m2 / merged.count
