"""Figures a person looks at: domains on tissue coordinates, loss per round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; sites and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedspatial.shared.atomic import write_atomic  # noqa: E402


def _point_size(coords: np.ndarray) -> float:
    # about the same ink for a 500-spot and a 50,000-cell section
    return float(np.clip(2e4 / max(len(coords), 1), 0.5, 30.0))


def _scatter(ax: plt.Axes, coords: np.ndarray, values: np.ndarray, title: str) -> None:
    cats = sorted({v for v in values if v == v and v is not None}, key=str)
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    size = _point_size(coords)
    missing = np.array([not (v == v) or v is None for v in values])
    if missing.any():
        ax.scatter(coords[missing, 0], coords[missing, 1], s=size, c="lightgrey", linewidths=0, label="n/a")
    for i, cat in enumerate(cats):
        sel = np.array([v == cat for v in values])
        ax.scatter(coords[sel, 0], coords[sel, 1], s=size, color=cmap(i % cmap.N), linewidths=0, label=str(cat))
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.invert_yaxis()  # image convention, as squidpy draws Visium sections
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def plot_section_domains(
    coords: np.ndarray,
    domains: np.ndarray,
    truth: np.ndarray | None,
    *,
    title: str,
    path: str | Path,
) -> Path:
    """Predicted domains next to the true labels (when present) on the section's coordinates."""
    panels = 2 if truth is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.2), squeeze=False)
    _scatter(axes[0, 0], coords, np.asarray(domains).astype(object), f"{title}: fedspatial domains")
    if truth is not None:
        _scatter(axes[0, 1], coords, np.asarray(truth, dtype=object), f"{title}: labels")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def plot_loss(curves: Mapping[str, Sequence[tuple[int, float]]], *, path: str | Path, title: str = "loss per round") -> Path:
    """One line per named curve of ``(round, loss)`` points."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, points in curves.items():
        if points:
            rounds, values = zip(*points, strict=True)
            ax.plot(rounds, values, marker="o", ms=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("reconstruction loss (MSE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)
