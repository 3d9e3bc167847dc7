"""Geometry of the synthetic sections: a tissue outline on a Visium-like hexagonal spot
grid, and its spatial domains (wavy cortical-like layers plus patchy blobs)."""

from __future__ import annotations

import numpy as np

__all__ = ["domain_layout", "smooth_field", "tissue_spots"]


def smooth_field(
    rng: np.random.Generator, xy: np.ndarray, length_scale: float, n_waves: int = 96
) -> np.ndarray:
    """Standardised smooth Gaussian random field at ``xy`` (random Fourier features).

    Grid-free and O(n * n_waves), so it scales to large sections.
    """
    omega = rng.normal(scale=1.0 / length_scale, size=(n_waves, 2))
    phase = rng.uniform(0.0, 2.0 * np.pi, size=n_waves)
    field = np.cos(xy @ omega.T + phase).sum(axis=1)
    return (field - field.mean()) / (field.std() + 1e-12)


def _hex_grid(
    n_rows: int, n_cols: int, spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visium-like hexagonal grid: returns (xy, array_row, array_col)."""
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    rows, cols = rows.ravel(), cols.ravel()
    x = cols * spacing + (rows % 2) * spacing / 2.0
    y = rows * spacing * np.sqrt(3.0) / 2.0
    return np.column_stack([x, y]), rows, cols


def _rotate(xy: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return xy @ np.array([[c, -s], [s, c]])


def tissue_spots(
    rng: np.random.Generator, n_spots: int, spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick exactly ``n_spots`` grid spots forming an irregular, blob-shaped tissue."""
    side = int(np.ceil(np.sqrt(4.0 * n_spots))) + 4  # ~4x the tissue area: room for odd shapes
    xy, rows, cols = _hex_grid(side, side, spacing)
    centred = xy - xy.mean(axis=0)
    radius = np.sqrt(n_spots) * spacing
    aspect = rng.uniform(0.75, 1.33)
    rot = _rotate(centred, rng.uniform(0.0, np.pi)) / radius
    ellipse = np.hypot(rot[:, 0] / aspect, rot[:, 1] * aspect)
    outline = ellipse + 0.08 * smooth_field(rng, centred / radius, 0.35)
    keep = np.sort(np.argpartition(outline, n_spots - 1)[:n_spots])
    coords = xy[keep] + rng.normal(scale=0.02 * spacing, size=(n_spots, 2))  # slight jitter
    coords += rng.uniform(5.0, 15.0, size=2) * spacing  # arbitrary slide offset
    return coords, rows[keep], cols[keep]


def domain_layout(
    rng: np.random.Generator, xy: np.ndarray, weights: np.ndarray, n_layered: int
) -> tuple[np.ndarray, np.ndarray]:
    """Assign domains: wavy layers by depth, then patches from thresholded fields.

    Returns ``(labels, depth)`` where depth is the rank-normalised layer coordinate in [0, 1].
    """
    n = len(xy)
    scale = max(float(np.ptp(xy, axis=0).mean()), 1.0)  # tissue diameter
    uv = _rotate(xy - xy.mean(axis=0), rng.uniform(0.0, 2.0 * np.pi)) / scale
    u, v = uv[:, 0], uv[:, 1]
    wavelength = rng.uniform(0.5, 1.2)
    depth = (
        u
        + rng.uniform(0.05, 0.12) * np.sin(2.0 * np.pi * v / wavelength + rng.uniform(0, 2 * np.pi))
        + rng.uniform(-0.4, 0.4) * v**2  # cortical curvature
        + 0.03 * smooth_field(rng, uv, 0.08)  # ragged boundaries
    )
    depth = np.argsort(np.argsort(depth)) / max(n - 1, 1)

    layer_w = weights[:n_layered]
    cum = np.cumsum(layer_w) / layer_w.sum()
    labels = np.minimum(np.searchsorted(cum, depth, side="right"), n_layered - 1)

    # Patch coverage: a full-weight patch domain covers ~1/K of the tissue.
    n_domains = len(weights)
    for k in range(n_layered, n_domains):
        coverage = weights[k] / n_domains
        field = smooth_field(rng, uv, rng.uniform(0.07, 0.12))
        if coverage <= 0.0:
            continue
        labels[field >= np.quantile(field, 1.0 - coverage)] = k
    return labels, depth
