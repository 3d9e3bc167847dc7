"""Integration report of a simulated run: batch mixing and biology kept, before and
after batch correction, from the annotated sections the sites wrote.

A simulation writes every site's sections to ``<mode_dir>/**/sites/<node>/
<site>__<section>.h5ad`` with the joint embedding (``obsm["X_fedspatial"]``; with
federated Harmony also ``obsm["X_fedspatial_uncorrected"]``), the domains
(``obs["fedspatial_domain"]``) and, where sites have them, the labels. Reading them
all pools cells, which only a simulation may do, so every metric says where it can be
computed:

- ``site-computable``: the domains' ARI / NMI against the labels, exact from the sum of
  the sites' label x domain count tables; and each site's :func:`site_report` on its own
  cells (batches within the site: its sections), averaged over sites weighted by cells
  (:func:`combine_site_reports`; it does not see mixing across sites);
- ``pooled (simulation only)``: iLISI, batch ASW, graph connectivity, cLISI, label
  ASW, and ARI / NMI of a k-means of the embedding (K = number of labels), on all
  labelled cells (:func:`integration_report`).

Above 10,000 cells the metrics are computed on a stratified subsample seeded with the
run's seed (:mod:`fedspatial.shared.evaluation.sampling`; ``integration.json``'s
``sampling`` says what was subsampled). Each metric is computed once: with a single site
its within-site label scores are the pooled ones, reused.

Writes ``integration.json``, ``integration.md`` and ``embedding_before_after.png``
(joint embedding, UMAP when umap-learn is installed, PCA otherwise, coloured by site,
domain and label; a row before and a row after correction) into ``mode_dir``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from fedspatial.shared.evaluation.integration import (
    LABEL_METRICS,
    ReportSampling,
    combine_site_reports,
    integration_report,
    site_report,
)
from fedspatial.shared.evaluation.metrics import (
    ari_from_contingency,
    contingency,
    merge_contingency,
    nmi_from_contingency,
)
from fedspatial.shared.storage.atomic import write_atomic, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

EMBEDDING = "X_fedspatial"
UNCORRECTED = "X_fedspatial_uncorrected"
DOMAIN = "fedspatial_domain"
POOLED = "pooled (simulation only)"
SITE_COMPUTABLE = "site-computable"
PLOT = "embedding_before_after.png"
BATCH_KEYS = ("site", "section")


@dataclass
class _Cells:
    """The pooled annotated cells of one mode."""

    after: np.ndarray
    before: np.ndarray | None
    site: np.ndarray
    section: np.ndarray  # "site/section"
    domain: np.ndarray  # str
    label: np.ndarray | None  # object, None where unlabelled
    tables: list[Any]  # per-section label x domain counts


def _split_name(path: Path) -> tuple[str, str]:
    """``<site>__<section>.h5ad`` (the name finalize gives an annotated section)."""
    site, sep, section = path.stem.partition("__")
    return (site, section) if sep else (path.parent.name, path.stem)


def _obs_and_obsm(path: Path) -> ad.AnnData:
    """The section's ``obs`` and ``obsm`` in memory, without its counts (read backed, closed)."""
    backed = ad.read_h5ad(path, backed="r")
    try:
        return ad.AnnData(obs=backed.obs.copy(), obsm={k: np.asarray(v) for k, v in backed.obsm.items()})
    finally:
        backed.file.close()


def read_annotated(mode_dir: str | Path, *, label_key: str = "domain") -> _Cells:
    """Pool every annotated section under ``mode_dir`` (simulation outputs)."""
    mode_dir = Path(mode_dir)
    paths = sorted(p for p in mode_dir.glob("**/sites/**/*.h5ad") if not p.name.startswith("."))
    if not paths:
        raise FileNotFoundError(f"no annotated sections (**/sites/**/*.h5ad) under {mode_dir}")
    after, before, sites, sections, domains, labels, tables = [], [], [], [], [], [], []
    has_before, has_labels = True, True
    for path in paths:
        adata = _obs_and_obsm(path)
        if EMBEDDING not in adata.obsm or DOMAIN not in adata.obs:
            raise ValueError(f"{path} has no {EMBEDDING} / {DOMAIN}: not an annotated fedspatial section")
        site, section = _split_name(path)
        n = adata.n_obs
        after.append(np.asarray(adata.obsm[EMBEDDING], dtype=np.float64))
        has_before &= UNCORRECTED in adata.obsm
        if has_before:
            before.append(np.asarray(adata.obsm[UNCORRECTED], dtype=np.float64))
        sites.append(np.full(n, site, dtype=object))
        sections.append(np.full(n, f"{site}/{section}", dtype=object))
        dom = adata.obs[DOMAIN].astype(str).to_numpy()
        domains.append(dom)
        has_labels &= label_key in adata.obs
        if has_labels:
            truth = adata.obs[label_key].astype(object).to_numpy()
            labels.append(np.array([None if _missing(v) else str(v) for v in truth], dtype=object))
            tables.append(contingency(truth, dom.astype(np.int64)))
    return _Cells(
        after=np.vstack(after),
        before=np.vstack(before) if has_before else None,
        site=np.concatenate(sites),
        section=np.concatenate(sections),
        domain=np.concatenate(domains),
        label=np.concatenate(labels) if has_labels else None,
        tables=tables if has_labels else [],
    )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _labelled(cells: _Cells) -> np.ndarray:
    """Rows with a label (all rows without labels)."""
    if cells.label is None:
        return np.ones(cells.site.size, dtype=bool)
    return np.array([v is not None for v in cells.label])


def _pooled(Z: np.ndarray, cells: _Cells, batches: np.ndarray, seed: int, sampling: ReportSampling) -> dict[str, float]:
    if cells.label is None:
        return integration_report(Z, batches, seed=seed, sampling=sampling)
    keep = _labelled(cells)
    return integration_report(Z[keep], batches[keep], cells.label[keep].astype(str), seed=seed, sampling=sampling)


def _within_sites(
    Z: np.ndarray, cells: _Cells, seed: int, sampling: ReportSampling, pooled: Mapping[str, float]
) -> dict[str, float]:
    """Each site's own report (its sections as batches), combined as the server would.

    A site holding every labelled cell (a single-site run) has the pooled label scores:
    they are reused (the label metrics do not depend on the batches), not computed again."""
    reports = []
    labelled = _labelled(cells)
    for site in sorted(set(cells.site)):
        rows = (cells.site == site) & labelled
        if rows.sum() < 3:
            continue
        labels = None if cells.label is None else cells.label[rows].astype(str)
        same = labels is not None and bool(np.array_equal(rows, labelled)) and all(k in pooled for k in LABEL_METRICS)
        reports.append(site_report(Z[rows], cells.section[rows], labels, seed=seed, sampling=sampling,
                                   label_scores=pooled if same else None))
    return combine_site_reports(reports) if reports else {}


def integration_summary(
    cells: _Cells, *, batch_key: str = "site", seed: int = 0, sampling: ReportSampling | None = None
) -> dict[str, Any]:
    """Every metric of :func:`write_integration_report`, labelled by where it can be computed."""
    if batch_key not in BATCH_KEYS:
        raise ValueError(f"batch_key must be one of {BATCH_KEYS}, got {batch_key!r}")
    sampling = sampling or ReportSampling()
    batches = cells.site if batch_key == "site" else cells.section
    views = {"after": cells.after, **({"before": cells.before} if cells.before is not None else {})}
    pooled = {k: _pooled(Z, cells, batches, seed, sampling) for k, Z in views.items()}
    n_labelled = int(sum(v is not None for v in cells.label)) if cells.label is not None else 0
    out: dict[str, Any] = {
        "batch_key": batch_key,
        "n_cells": int(cells.after.shape[0]),
        "n_labelled": n_labelled,
        "sites": sorted(set(cells.site)),
        "n_batches": len(set(batches)),
        "corrected": cells.before is not None,
        "sampling": sampling.describe(n_labelled if cells.label is not None else int(cells.after.shape[0]), seed),
        SITE_COMPUTABLE: {"within_site": {k: _within_sites(Z, cells, seed, sampling, pooled[k]) for k, Z in views.items()}},
        POOLED: pooled,
    }
    if cells.tables:
        merged = merge_contingency(cells.tables)
        out[SITE_COMPUTABLE]["domains"] = {"ari": ari_from_contingency(merged), "nmi": nmi_from_contingency(merged)}
    return out


# ------------------------------------------------------------------------ plot
LAYOUTS = ("auto", "umap", "pca")


def _layout(Z: np.ndarray, seed: int, layout: str = "auto") -> tuple[np.ndarray, str]:
    """2-D layout: UMAP (``auto``: when umap-learn is installed, not a dependency) or PCA."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "umap" or (layout == "auto" and importlib.util.find_spec("umap") is not None):
        import umap

        return np.asarray(umap.UMAP(random_state=seed).fit_transform(Z)), "UMAP"
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(Z), "PCA"


def plot_before_after(cells: _Cells, path: str | Path, *, seed: int = 0, layout: str = "auto") -> Path:
    """Joint embedding coloured by site, domain and (if any) label; before and after."""
    from matplotlib.figure import Figure

    rows = [("after correction" if cells.before is not None else "no correction", cells.after)]
    if cells.before is not None:
        rows.insert(0, ("before correction", cells.before))
    colourings: list[tuple[str, np.ndarray]] = [("site", cells.site), ("domain", cells.domain)]
    if cells.label is not None:
        colourings.append(("label", np.array(["unlabelled" if v is None else v for v in cells.label], dtype=object)))
    fig = Figure(figsize=(4.2 * len(colourings), 3.8 * len(rows)))
    axes = np.asarray(fig.subplots(len(rows), len(colourings), squeeze=False))
    size = float(np.clip(2e4 / max(len(cells.site), 1), 0.3, 10.0))
    for r, (title, Z) in enumerate(rows):
        xy, method = _layout(Z, seed, layout)
        for c, (name, values) in enumerate(colourings):
            ax = axes[r, c]
            for i, value in enumerate(sorted(set(values.astype(str)))):
                sel = values.astype(str) == value
                colour = "lightgrey" if value == "unlabelled" else f"C{i % 10}" if len(set(values)) <= 10 else None
                ax.scatter(xy[sel, 0], xy[sel, 1], s=size, linewidths=0, label=value, color=colour)
            ax.set_title(f"{title}: {name}", fontsize=9)
            ax.set_xlabel(f"{method} 1", fontsize=7)
            ax.set_ylabel(f"{method} 2", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# ------------------------------------------------------------------------ report
def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _table(title: str, scores: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> list[str]:
    views = [v for v in ("before", "after") if v in scores]
    lines = [f"### {title}", "", "| metric | " + " | ".join(views) + " |", "| --- | " + " | ".join("---" for _ in views) + " |"]
    for m in metrics:
        if any(m in scores[v] for v in views):
            lines.append(f"| {m} | " + " | ".join(_fmt(scores[v].get(m)) for v in views) + " |")
    return [*lines, ""]


def _sampling_note(sampling: Mapping[str, Any] | None) -> list[str]:
    """One sentence saying which metrics were estimated on a subsample (none: nothing)."""
    if not sampling or not (sampling.get("subsampled") or sampling.get("lisi_subsampled")):
        return []
    parts = []
    if sampling.get("subsampled"):
        parts.append(f"batch / label ASW and graph connectivity on a stratified (label x batch) subsample of "
                     f"{sampling['max_cells']:,} cells, the k-means behind ARI / NMI fitted on it (all cells assigned)")
    if sampling.get("lisi_subsampled"):
        parts.append(f"iLISI / cLISI as the median over {sampling['lisi_cells']:,} such cells, each with its "
                     "neighbours among all cells")
    return [f"Subsampled ({sampling['n_cells']:,} cells, seed {sampling['seed']}): " + "; ".join(parts) + ".", ""]


def report_markdown(summary: Mapping[str, Any], mode_dir: Path) -> str:
    metrics = ("ilisi", "batch_asw", "graph_connectivity", "ari", "nmi", "clisi", "label_asw")
    lines = [
        f"# Integration report: {mode_dir.name}",
        "",
        f"{summary['n_cells']} cells ({summary['n_labelled']} labelled) at {len(summary['sites'])} site(s); "
        f"batch = {summary['batch_key']} ({summary['n_batches']} batches); "
        + ("batch-corrected embedding (before = `X_fedspatial_uncorrected`)." if summary["corrected"] else "no batch correction."),
        "",
        "Scores in [0, 1], higher is better: iLISI, batch ASW, graph connectivity measure batch "
        "mixing; ARI / NMI, cLISI, label ASW measure biology kept.",
        "",
        *_sampling_note(summary.get("sampling")),
        f"## {SITE_COMPUTABLE}",
        "",
    ]
    site = summary[SITE_COMPUTABLE]
    if "domains" in site:
        d = site["domains"]
        lines += [
            f"Domains vs labels, from the summed label x domain tables: ARI {_fmt(d['ari'])}, NMI {_fmt(d['nmi'])}.",
            "",
        ]
    lines += _table("within each site (its sections as batches), mean over sites weighted by cells", site["within_site"], metrics)
    lines += [f"## {POOLED}", "", "Needs every cell in one place: available in simulation only.", ""]
    lines += _table("all labelled cells", summary[POOLED], metrics)
    lines += [f"![joint embedding]({PLOT})", ""]
    return "\n".join(lines)


def write_integration_report(
    mode_dir: str | Path,
    *,
    batch_key: str = "site",
    label_key: str = "domain",
    seed: int = 0,
    layout: str = "auto",
) -> dict[str, Any]:
    """Integration metrics and plots of one simulated mode (``federated``, ...).

    Parameters
    ----------
    mode_dir : str or Path
        The mode's results folder (``<results>/<run>/<mode>``).
    batch_key : str, default "site"
        What a batch is for the pooled metrics: ``site`` or ``section``.
    label_key : str, default "domain"
        ``obs`` column of the labels (biology metrics are left out without it).
    seed : int, default 0
        Random state of the k-means behind the embedding's ARI / NMI and of the layout.
    layout : str, default "auto"
        Plot layout: ``umap``, ``pca``, or ``auto`` (UMAP if umap-learn is installed).

    Returns
    -------
    dict[str, Any]
        What ``integration.json`` holds; ``seconds`` (and ``seconds_by_part``: read,
        metrics, plot) is the report's own wall time, written files excepted.
    """
    if layout not in LAYOUTS:  # fail before the metrics' work
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    mode_dir = Path(mode_dir)
    t0 = time.perf_counter()
    cells = read_annotated(mode_dir, label_key=label_key)
    t1 = time.perf_counter()
    summary = integration_summary(cells, batch_key=batch_key, seed=seed)
    t2 = time.perf_counter()
    summary["plot"] = plot_before_after(cells, mode_dir / PLOT, seed=seed, layout=layout).name
    t3 = time.perf_counter()
    summary["seconds"] = t3 - t0
    summary["seconds_by_part"] = {"read": t1 - t0, "metrics": t2 - t1, "plot": t3 - t2}
    write_json_atomic(mode_dir / "integration.json", summary)
    write_text_atomic(mode_dir / "integration.md", report_markdown(summary, mode_dir))
    logger.info("integration report of %s: iLISI %s after correction (%s)%s", mode_dir.name,
                _fmt(summary[POOLED]["after"].get("ilisi")), POOLED, _ilisi_note(cells, summary))
    return summary


def _ilisi_note(cells: _Cells, summary: Mapping[str, Any]) -> str:
    """Why an iLISI is n/a (logged as ``ilisi=nan``): batch mixing needs two batches or more."""
    notes = []
    if summary["n_batches"] < 2:
        notes.append(f"the pooled iLISI is n/a: all cells are from one {summary['batch_key']}, and batch mixing "
                     "needs two or more (expected with one site); nothing failed")
    single = sorted(site for site in set(cells.site) if len(set(cells.section[cells.site == site])) < 2)
    if single:
        notes.append(f"the within-site iLISI of {', '.join(single)} is n/a (ilisi=nan above): a site with one "
                     "section has no second batch to mix; nothing failed")
    return "; " + "; ".join(notes) if notes else ""
