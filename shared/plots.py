"""Figures a person looks at: domains on tissue coordinates, loss per round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from fedspatial.shared.storage.atomic import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _pyplot() -> Any:
    """matplotlib.pyplot, imported on first use: importing it costs a deployed ClientApp
    process most of a second, and only the last message of a run draws."""
    import matplotlib

    matplotlib.use("Agg")  # files only; sites and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _point_size(n: int) -> float:
    # about the same ink for a 500-spot and a 50,000-cell section
    return float(np.clip(2e4 / max(n, 1), 0.5, 30.0))


def _scatter(ax: Axes, coords: np.ndarray, values: pd.Series, colours: Mapping[str, object], title: str) -> None:
    size = _point_size(len(coords))
    missing = values.isna().to_numpy()
    if missing.any():
        ax.scatter(coords[missing, 0], coords[missing, 1], s=size, c="lightgrey", linewidths=0, label="unlabelled")
    text = values.astype(str).to_numpy()
    for cat, colour in colours.items():
        sel = (text == cat) & ~missing
        if sel.any():
            ax.scatter(coords[sel, 0], coords[sel, 1], s=size, color=colour, linewidths=0, label=cat)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.invert_yaxis()  # image convention, as squidpy draws Visium sections
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _palette(n: int) -> list[object]:
    cmap = _pyplot().get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def matched_colours(domains: pd.Series, truth: pd.Series | None) -> tuple[dict[str, object], dict[str, object]]:
    """Colours for domains and labels; a domain matched to a label (maximum overlap,
    Hungarian assignment) gets that label's colour, so the two panels read alike."""
    dom_cats = sorted(domains.astype(str).unique(), key=lambda v: (len(v), v))
    if truth is None or truth.notna().sum() == 0:
        return dict(zip(dom_cats, _palette(len(dom_cats)), strict=True)), {}
    lab_cats = sorted(truth.dropna().astype(str).unique())
    table = pd.crosstab(domains.astype(str)[truth.notna()], truth.dropna().astype(str))
    table = table.reindex(index=dom_cats, columns=lab_cats, fill_value=0)
    palette = _palette(max(len(dom_cats), len(lab_cats)) + len(dom_cats))
    label_colours = dict(zip(lab_cats, palette, strict=False))
    rows, cols = linear_sum_assignment(-table.to_numpy())
    dom_colours: dict[str, object] = {dom_cats[r]: label_colours[lab_cats[c]] for r, c in zip(rows, cols, strict=True)}
    spare = iter(palette[len(lab_cats):])
    for d in dom_cats:
        dom_colours.setdefault(d, next(spare))
    return {d: dom_colours[d] for d in dom_cats}, label_colours


def plot_section_domains(
    coords: np.ndarray,
    domains: np.ndarray,
    truth: np.ndarray | None,
    *,
    title: str,
    path: str | Path,
) -> Path:
    """Predicted domains next to the true labels (when present) on the section's coordinates."""
    dom = pd.Series(np.asarray(domains)).astype(str)
    lab = pd.Series(np.asarray(truth, dtype=object)) if truth is not None else None
    if lab is not None:
        lab = lab.where(lab.notna() & (lab.astype(str) != ""), None)
    dom_colours, lab_colours = matched_colours(dom, lab)
    panels = 2 if lab is not None else 1
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.2), squeeze=False)
    _scatter(axes[0, 0], coords, dom, dom_colours, f"{title}: fedspatial domains")
    if lab is not None:
        _scatter(axes[0, 1], coords, lab, lab_colours, f"{title}: labels")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def plot_loss(curves: Mapping[str, Sequence[tuple[int, float]]], *, path: str | Path, title: str = "loss per round") -> Path:
    """One line per named curve of ``(round, loss)`` points."""
    plt = _pyplot()
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
