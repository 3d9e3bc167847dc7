"""``summary.md`` and ``summary.html`` of a ``fedspatial simulate`` run folder: the mode
table, sites and sections (cells, features, ARI/NMI where labels exist), features kept and
dropped, the warnings the run reports hold, and every PNG of the folder (linked from the
Markdown, inline in the HTML, so the one file can be mailed or attached to a lab notebook).

Everything is read from the run folder's ``<mode>/metrics.json`` (``local/<site>/metrics.json``
in local mode) and its PNGs; nothing here needs the data or Flower.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SHARED_FRACTION_WARNING = 0.5
"""A section keeping less than this share of its features gets a warning."""


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Block:
    """One heading and what follows it: paragraphs, a table, a list, images."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    table: Table | None = None
    items: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    """PNG paths relative to the run folder."""


def comparison_rows(results: Mapping[str, Mapping[str, Any]]) -> Table:
    """The modes (federated, local, centralized) side by side."""
    header = ["mode", "joint ARI", "joint NMI", "mean section ARI", "median section ARI", "wall s", "s/round"]
    rows = [
        [mode, f"{res['joint_ari']:.3f}", f"{res['joint_nmi']:.3f}", f"{res['mean_section_ari']:.3f}",
         f"{res['median_section_ari']:.3f}", f"{res['wall_s']:.1f}", f"{res['seconds_per_round']:.2f}"]
        for mode, res in results.items()
    ]
    return Table(header, rows)


def mode_reports(folder: Path, modes: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """``{mode: [metrics.json, ...]}`` (one per simulation: several in local mode)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for mode in modes:
        paths = [folder / mode / "metrics.json"] if mode != "local" else sorted((folder / "local").glob("*/metrics.json"))
        reports = []
        for path in paths:
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, ValueError) as err:
                logger.warning("summary: cannot read %s (%s); its scores are left out", path, err)
        out[mode] = reports
    return out


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int | float):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def _sections(reports: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {key: sec for r in reports for key, sec in r.get("sections", {}).items()}


def _sites(reports: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: site for r in reports for name, site in r.get("sites", {}).items()}


def collect_warnings(by_mode: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """What a reader should know, from the reports: dropped sites, privacy stops and
    refusals, skipped markers, sections without labels, sections keeping few of their
    features, poorly mapped panels, and any ``warnings`` list a report carries."""
    found: list[str] = []
    for mode, reports in by_mode.items():
        for rep in reports:
            found += [f"{mode}: {w}" for w in rep.get("warnings", []) if isinstance(w, str)]
            for site, why in (rep.get("dropped-sites") or {}).items():
                found.append(f"{mode}: site {site} was dropped during the run ({why})")
            privacy = rep.get("privacy") or {}
            if privacy.get("stopped"):
                found.append(f"{mode}: training stopped early for privacy: {json.dumps(privacy['stopped'])}")
            for rnd, by_site in (privacy.get("refusals") or {}).items():
                for site, why in by_site.items():
                    found.append(f"{mode}: round {rnd}: site {site} refused ({why})")
            markers = rep.get("markers")
            if isinstance(markers, Mapping) and markers.get("skipped"):
                found.append(f"{mode}: marker genes skipped: {markers['skipped']}")
            for panel, info in (rep.get("mapped-panels") or {}).items():
                r2 = info.get("r2-mean") if isinstance(info, Mapping) else None
                if isinstance(r2, float) and r2 < 0.5:
                    found.append(f"{mode}: section {panel} was mapped from a small panel with mean R^2 {r2:.2f} "
                                 "(its domains are less certain)")
        sections = _sections(reports)
        unlabelled = sorted(k for k, s in sections.items() if "ari" not in s)
        if unlabelled:
            found.append(f"{mode}: no labels in {len(unlabelled)} section(s) ({', '.join(unlabelled[:5])}"
                         f"{', ...' if len(unlabelled) > 5 else ''}): no ARI/NMI for them")
        for key, sec in sorted(sections.items()):
            total, shared = sec.get("n_features"), sec.get("n_features_shared")
            if isinstance(total, int) and isinstance(shared, int) and total and shared < SHARED_FRACTION_WARNING * total:
                found.append(f"{mode}: section {key} kept {shared} of its {total} features "
                             f"({total - shared} not shared with the federation)")
    return list(dict.fromkeys(found))


def build_summary(folder: Path, results: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[Block]]:
    """The title and blocks of the summary of ``folder`` (modes: the keys of ``results``)."""
    modes = list(results)
    by_mode = mode_reports(folder, modes)
    any_reports = next((r for r in by_mode.values() if r), [])
    sections = _sections(any_reports)
    sites = sorted({s["site"] for s in sections.values()})
    n_cells = sum(int(s.get("n_cells", 0)) for s in sections.values())
    blocks = [Block("Modes", [f"Run folder `{folder.name}`: {len(sites)} site(s), {len(sections)} section(s), "
                              f"{n_cells} cells; modes {', '.join(modes)}."], table=comparison_rows(results))]
    header = ["site", "sections", "cells"]
    for mode in modes:
        header += [f"{mode} ARI", f"{mode} NMI"]
    site_rows = []
    for site in sites:
        keys = [k for k, s in sections.items() if s["site"] == site]
        row = [site, str(len(keys)), str(sum(int(sections[k].get("n_cells", 0)) for k in keys))]
        for mode in modes:
            info = _sites(by_mode[mode]).get(site, {})
            row += [_num(info.get("ari")), _num(info.get("nmi"))]
        site_rows.append(row)
    blocks.append(Block("Sites", ["ARI/NMI over each site's labelled cells (– where a site has no labels)."],
                        table=Table(header, site_rows)))
    header = ["section", "site", "cells", "features", "shared", "used"]
    for mode in modes:
        header += [f"{mode} ARI", f"{mode} NMI"]
    section_rows = []
    per_mode = {mode: _sections(by_mode[mode]) for mode in modes}
    for key, sec in sorted(sections.items()):
        row = [key, sec["site"], str(sec.get("n_cells", "–"))] + [
            _num(sec.get(f)) for f in ("n_features", "n_features_shared", "n_features_used")
        ]
        for mode in modes:
            other = per_mode[mode].get(key, {})
            row += [_num(other.get("ari")), _num(other.get("nmi"))]
        section_rows.append(row)
    blocks.append(Block(
        "Sections",
        ["features: in the section's file; shared: of those, in the federation's feature space "
         "(the others are dropped); used: model inputs (the selected features)."],
        table=Table(header, section_rows),
    ))
    feature_rows = [
        [mode if mode != "local" else f"local/{', '.join(sorted(rep.get('sites', {}))) or '?'}",
         _num(rep.get("n-features-shared")), _num(rep.get("n-features-selected")),
         _num(len(rep.get("mapped-panels") or {}))]
        for mode, reps in by_mode.items() for rep in reps
    ]
    blocks.append(Block("Features", ["shared: features every site holds (in local mode: the site's own); "
                                     "selected: model inputs; mapped: sections mapped from a small panel."],
                        table=Table(["mode", "shared", "selected", "mapped sections"], feature_rows)))
    warnings = collect_warnings(by_mode)
    blocks.append(Block("Warnings", [] if warnings else ["None recorded in the run reports."], items=warnings))
    images = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png") if not p.name.startswith("."))
    blocks.append(Block("Figures", [] if images else ["No figures in the run folder."], images=images))
    return "fedspatial run summary", blocks


# ----------------------------------------------------------------------------- rendering


def _md_table(table: Table) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, table.header)) + " |", "| " + " | ".join("---" for _ in table.header) + " |"]
    return lines + ["| " + " | ".join(map(cell, row)) + " |" for row in table.rows]


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        lines += [f"## {b.heading}", ""]
        for par in b.paragraphs:
            lines += [par, ""]
        if b.table is not None:
            lines += [*_md_table(b.table), ""]
        if b.items:
            lines += [*(f"- {item}" for item in b.items), ""]
        if b.images:
            lines += [*(f"- [{img}]({img.replace(' ', '%20')})" for img in b.images), ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:42em;height:auto}
figcaption{font-size:.85em;color:#555}code{background:#f4f4f4;padding:0 .2em}"""


def _inline(text: str) -> str:
    """Escaped text, with `code` spans kept."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, blocks: Sequence[Block], folder: Path) -> str:
    """One self-contained page: every image inline as a ``data:`` URI (a missing file
    shows its path)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}: {html.escape(folder.name)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        out.append(f"<h2>{html.escape(b.heading)}</h2>")
        out += [f"<p>{_inline(par)}</p>" for par in b.paragraphs]
        if b.table is not None:
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.table.header) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.table.rows]
            out.append("</tbody></table>")
        if b.items:
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in b.items) + "</ul>")
        for img in b.images:
            try:
                data = base64.b64encode((folder / img).read_bytes()).decode("ascii")
            except OSError:
                out.append(f"<p>missing figure: {html.escape(img)}</p>")
                continue
            name = html.escape(img)
            out.append(f'<figure><a href="{name}"><img src="data:image/png;base64,{data}" alt="{name}"></a>'
                       f"<figcaption>{name}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_summary(folder: str | Path, results: Mapping[str, Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.html`` into the run folder; returns their paths."""
    from fedspatial.shared.storage.atomic import write_text_atomic

    folder = Path(folder)
    title, blocks = build_summary(folder, results)
    md = write_text_atomic(folder / "summary.md", render_markdown(title, blocks))
    page = write_text_atomic(folder / "summary.html", render_html(title, blocks, folder))
    logger.info("summary: %s and %s", md, page.name)
    return md, page
