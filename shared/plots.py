"""Figures a person looks at: domains on tissue coordinates, loss per round, marker dot plot."""

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
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
              ncol=1 if len(colours) <= 20 else 2)


def domain_palette(n: int) -> list[str]:
    """``n`` distinct colours (``"#rrggbb"``), the same list for the same ``n`` everywhere.

    tab10 up to 10, tab20 up to 20, tab20 + tab20b + tab20c up to 60, then hues spread by
    the golden angle at three lightness levels; no colour repeats. A site colours domain
    ``i`` with ``domain_palette(K)[i]``, so one domain id has one colour at every hospital
    (``uns["fedspatial_domain_colors"]`` of the annotated sections holds this list).
    """
    import colorsys

    import matplotlib
    from matplotlib.colors import to_hex

    names = ("tab10",) if n <= 10 else ("tab20",) if n <= 20 else ("tab20", "tab20b", "tab20c")
    colours: list[str] = []
    for name in names:
        cmap = matplotlib.colormaps[name]
        colours += [to_hex(cmap(i)) for i in range(cmap.N)]
    i = 0
    while len(colours) < n:
        hue, light = (i * 0.618033988749895) % 1.0, (0.35, 0.5, 0.65)[i % 3]
        colour = to_hex(colorsys.hls_to_rgb(hue, light, 0.7))
        if colour not in colours:
            colours.append(colour)
        i += 1
    return colours[:n]


def _palette(n: int) -> list[object]:
    return list(domain_palette(n))


def federation_colours(domains: pd.Series, truth: pd.Series | None, n_domains: int) -> tuple[dict[str, object], dict[str, object]]:
    """Colours for domains and labels with the federation's palette: domain ``i`` always
    gets ``domain_palette(n_domains)[i]``; a label gets the colour of the domain it
    overlaps most (Hungarian assignment), other labels colours no domain uses."""
    dom_values = domains.astype(str)
    ids = [int(v) for v in dom_values.unique() if v.lstrip("-").isdigit()]
    palette = domain_palette(max([n_domains, *(i + 1 for i in ids)]))
    dom_cats = sorted(dom_values.unique(), key=lambda v: (len(v), v))
    dom_colours: dict[str, object] = {d: palette[int(d)] if d.isdigit() else "dimgrey" for d in dom_cats}
    if truth is None or truth.notna().sum() == 0:
        return dom_colours, {}
    lab_cats = sorted(truth.dropna().astype(str).unique())
    table = pd.crosstab(dom_values[truth.notna()], truth.dropna().astype(str))
    table = table.reindex(index=dom_cats, columns=lab_cats, fill_value=0)
    rows, cols = linear_sum_assignment(-table.to_numpy())
    label_colours: dict[str, object] = {
        lab_cats[c]: dom_colours[dom_cats[r]] for r, c in zip(rows, cols, strict=True) if table.iat[r, c] > 0
    }
    used = set(map(str, dom_colours.values()))
    spare = iter(c for c in domain_palette(len(palette) + len(lab_cats)) if c not in used)
    for lab in lab_cats:
        label_colours.setdefault(lab, next(spare))
    return dom_colours, {lab: label_colours[lab] for lab in lab_cats}


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
    n_domains: int | None = None,
) -> Path:
    """Predicted domains next to the true labels (when present) on the section's coordinates.

    With ``n_domains`` (the federation's K) domain ``i`` has the federation's colour
    (:func:`federation_colours`); without, colours follow the labels (:func:`matched_colours`)."""
    dom = pd.Series(np.asarray(domains)).astype(str)
    lab = pd.Series(np.asarray(truth, dtype=object)) if truth is not None else None
    if lab is not None:
        lab = lab.where(lab.notna() & (lab.astype(str) != ""), None)
    if n_domains is not None:
        dom_colours, lab_colours = federation_colours(dom, lab, n_domains)
    else:
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
    integer_ticks(ax)
    ax.set_ylabel("reconstruction loss (MSE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def integer_ticks(ax: Axes) -> None:
    """Whole-number ticks on the x axis (rounds are 1, 2, 3, never 1.2)."""
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))


def plot_marker_dots(
    means: np.ndarray,
    fractions: np.ndarray,
    *,
    domains: Sequence[str],
    genes: Sequence[str],
    path: str | Path,
    title: str = "marker genes per domain",
) -> Path:
    """Dot plot of genes (columns) by domain (rows), as ``sc.pl.dotplot`` draws it: the
    dot's size is the fraction of the domain's cells expressing the gene, its colour the
    domain's mean log-expression scaled to [0, 1] per gene.

    ``means``, ``fractions``: ``(len(domains), len(genes))``.
    """
    means, fractions = np.asarray(means, dtype=float), np.asarray(fractions, dtype=float)
    low, high = np.nanmin(means, axis=0), np.nanmax(means, axis=0)
    scaled = (means - low) / np.where(high > low, high - low, 1.0)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(genes) + 2.0), max(2.5, 0.4 * len(domains) + 1.4)))
    cols, rows = np.meshgrid(np.arange(len(genes)), np.arange(len(domains)))
    dots = ax.scatter(cols.ravel(), rows.ravel(), s=220 * np.nan_to_num(fractions).ravel() + 1,
                      c=np.nan_to_num(scaled).ravel(), cmap="Reds", vmin=0, vmax=1, edgecolors="grey", linewidths=0.3)
    ax.set_xticks(range(len(genes)), [str(g) for g in genes], rotation=90, fontsize=7)
    ax.set_yticks(range(len(domains)), [str(d) for d in domains], fontsize=8)
    ax.set_xlim(-0.6, len(genes) - 0.4)
    ax.set_ylim(len(domains) - 0.4, -0.6)
    ax.set_ylabel("domain")
    ax.set_title(title, fontsize=9)
    fig.colorbar(dots, ax=ax, fraction=0.03, pad=0.02, label="mean expression (scaled per gene)")
    for frac in (0.25, 0.5, 1.0):  # size legend
        ax.scatter([], [], s=220 * frac + 1, c="lightgrey", edgecolors="grey", linewidths=0.3, label=f"{frac:.0%}")
    ax.legend(title="cells expressing", fontsize=6, title_fontsize=7, ncol=3, loc="upper center",
              bbox_to_anchor=(0.5, -0.1 - 0.014 * max(len(str(g)) for g in genes)), frameon=False)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def plot_reliability(curves: Mapping[str, Sequence[Mapping[str, Any]]], *, path: str | Path, title: str) -> Path:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one line
    per named confidence (the diagonal is perfect calibration), with the share of cells
    per bin below.

    ``curves``: name -> ``{"low", "high", "n", "confidence", "accuracy"}`` per bin
    (:func:`fedspatial.shared.evaluation.calibration.calibration_report`).
    """
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.4, 5.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="calibrated")
    for i, (name, bins) in enumerate(curves.items()):
        colour = _palette(10)[i % 10]
        filled = [b for b in bins if b["n"] > 0]
        top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o-", color=colour, ms=3, label=name)
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        total = max(sum(b["n"] for b in bins), 1)
        bottom.step(centres, [b["n"] / total for b in bins], where="mid", color=colour)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy (domains matched to labels)")
    top.set_title(title, fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("cells")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)
