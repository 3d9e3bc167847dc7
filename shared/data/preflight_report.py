"""The cross-site report ``fedspatial inspect`` prints (and ``simulate`` on a refusal)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedspatial.shared.data.crosssite import ALLOW_HINT

if TYPE_CHECKING:
    from fedspatial.shared.data.preflight import Preflight

_MAX_CATEGORIES = 8


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    return [line(rows[0]), line(["-" * w for w in widths]), *(line(r) for r in rows[1:])]


def format_report(report: Preflight) -> str:
    """Sites, features kept/dropped, identifier scheme, X, labels; pairwise overlap; findings."""
    s = report.settings
    key = s.label_key
    rows = [["site", "sections", "cells", "features", "kept", "dropped", "ids", "X", f"obs[{key!r}]"]]
    for site in report.sites:
        kept = "-" if site.kept is None else str(site.kept)
        dropped = "-" if site.kept is None else str(len(site.features) - site.kept)
        labels = site.labels.get(key)
        rows.append([site.name, str(len(site.sections)), f"{site.n_cells:,}", f"{len(site.features):,}", kept,
                     dropped, site.scheme, site.x_kind, f"{len(labels)} categories" if labels else "absent"])
    ident = f"var[{s.feature_key!r}]" if s.feature_key else "var_names"
    lines = [f"{len(report.sites)} site(s); features matched on {ident}; "
             f"{len(report.shared):,} feature(s) shared by the federation", "", *_table(rows, {1, 2, 3, 4, 5})]
    if report.pairwise:
        names = [site.name for site in report.sites]
        grid = [["shared features", *names]]
        for a in names:
            grid.append([a, *(str(len(next(x for x in report.sites if x.name == a).features)) if a == b
                              else str(report.pairwise.get((a, b), report.pairwise.get((b, a), 0)))
                              for b in names)])
        lines += ["", *_table(grid, set(range(1, len(names) + 1)))]
    lines.append("")
    for site in report.sites:
        columns = []
        for column, counts in site.labels.items():
            cats = list(counts)
            shown = ", ".join(cats[:_MAX_CATEGORIES]) + (", ..." if len(cats) > _MAX_CATEGORIES else "")
            columns.append(f"{column} ({len(cats)}: {shown})")
        lines.append(f"label-like obs columns at {site.name}: " + ("; ".join(columns) if columns else "none"))
    errors, warnings = report.errors, report.warnings
    if errors:
        lines += ["", f"{len(errors)} error(s), fix before running:", *(f"  - {f.message}" for f in errors)]
    if warnings:
        lines += ["", f"{len(warnings)} warning(s) ({ALLOW_HINT}):",
                  *(f"  - [{f.kind}] {f.message}" for f in warnings)]
    return "\n".join(lines)
