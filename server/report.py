"""The run report: metrics.json, loss plot, and the comparison table across modes."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedspatial.server.summary import comparison_rows, write_summary
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.evaluation.metrics import (
    Contingency,
    ari_from_contingency,
    merge_contingency,
    nmi_from_contingency,
)
from fedspatial.shared.plots import plot_loss
from fedspatial.shared.storage.atomic import write_json_atomic
from fedspatial.strategies.privacy import central_dp_epsilon

logger = logging.getLogger(__name__)


def contingency_from_json(raw: Mapping[str, Any]) -> Contingency:
    return Contingency(
        labels=list(raw["labels"]),
        domains=[int(d) for d in raw["domains"]],
        counts=np.asarray(raw["counts"], dtype=np.int64).reshape(len(raw["labels"]), len(raw["domains"])),
    )


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarize_sites(site_reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-section, per-site and joint scores from what the sites returned."""
    sections: dict[str, Any] = {}
    tables: dict[str, list[Contingency]] = {}
    for rep in site_reports:
        sections.update(rep["sections"])
        for site, raw in rep.get("contingency", {}).items():
            tables.setdefault(site, []).append(contingency_from_json(raw))
    sites: dict[str, Any] = {}
    for key, sec in sections.items():
        site = sites.setdefault(sec["site"], {"sections": [], "n_cells": 0})
        site["sections"].append(key)
        site["n_cells"] += sec["n_cells"]
    for name, site in sites.items():
        site["mean_section_ari"] = _mean([sections[s].get("ari", float("nan")) for s in site["sections"]])
        if name in tables:
            merged = merge_contingency(tables[name])
            site["ari"] = ari_from_contingency(merged)
            site["nmi"] = nmi_from_contingency(merged)
    all_tables = [t for ts in tables.values() for t in ts]
    joint: dict[str, float] = {}
    if all_tables:
        merged = merge_contingency(all_tables)
        joint = {"ari": ari_from_contingency(merged), "nmi": nmi_from_contingency(merged)}
    section_aris = [s.get("ari", float("nan")) for s in sections.values()]
    return {
        "sections": sections,
        "sites": sites,
        "joint": joint,
        "mean_section_ari": _mean(section_aris),
        "median_section_ari": float(np.nanmedian(section_aris)) if section_aris else float("nan"),
        "contingency": {site: [t.counts.tolist() for t in ts] for site, ts in tables.items()},
        "_tables": all_tables,
    }


def write_run_report(
    folder: str | Path,
    *,
    history: list[dict[str, Any]],
    site_names: Mapping[str, str],
    site_reports: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    folder = Path(folder)
    rounds = []
    for entry in history:
        e = dict(entry)
        e["sites"] = {site_names.get(k, k): v for k, v in entry.get("sites", {}).items()}
        rounds.append(e)
    summary = summarize_sites(site_reports)
    tables = summary.pop("_tables")
    report = {
        "rounds": rounds,
        **summary,
        "contingency_tables": [
            {"labels": t.labels, "domains": t.domains, "counts": t.counts.tolist()} for t in tables
        ],
        **dict(extra),
    }
    write_json_atomic(folder / "metrics.json", report)
    plot_loss(
        {
            "train (weighted mean over sites)": [(r["round"], r["train-loss"]) for r in rounds if r.get("train-loss") is not None],
            "evaluate (global model)": [(r["round"], r["eval-loss"]) for r in rounds if r.get("eval-loss") is not None],
        },
        path=folder / "loss.png",
    )
    logger.info(
        "run finished: joint ARI %.3f, mean section ARI %.3f -> %s",
        report["joint"].get("ari", float("nan")),
        report["mean_section_ari"],
        folder,
    )
    return report


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table comparing modes (federated, local, centralized)."""
    table = comparison_rows(results)
    lines = ["| " + " | ".join(table.header) + " |", "| " + " | ".join("---" for _ in table.header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table.rows]) + "\n"


def write_comparison(folder: str | Path, results: Mapping[str, Mapping[str, Any]]) -> str:
    """``summary.json`` (the modes' scores), and ``summary.md`` and ``summary.html``
    (:mod:`fedspatial.server.summary`); returns the mode table (Markdown)."""
    write_json_atomic(Path(folder) / "summary.json", results)
    write_summary(folder, results)
    return comparison_table(results)


def privacy_summary(
    cfg: ExperimentConfig,
    history: list[dict[str, Any]],
    names: dict[str, str],
    stopped: dict[str, Any] | None,
    refusals: dict[int, dict[int, str]],
    site_reports: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """What the run's report says about privacy: each site's epsilon for the whole run
    (every release, as its finalize reply states; after its last round where it sent no
    finalize reply; its own ledger has the details), central DP's client-level epsilon,
    SecAgg+."""
    p = cfg.privacy
    out: dict[str, Any] = {"local-dp": p.local_dp, "central-dp": p.central_dp, "secagg": p.secagg}
    if p.local_dp:
        spent: dict[str, Any] = {}
        for entry in history:
            for node, m in entry.get("sites", {}).items():
                if "dp-epsilon" in m:
                    spent[names.get(node, node)] = {"epsilon": m["dp-epsilon"], "delta": m.get("dp-delta"), "after-round": entry["round"]}
        for rep in site_reports:
            if "privacy" in rep:
                spent[rep["site"]] = {**rep["privacy"], "after": "the whole run (all releases)"}
        out["site-epsilon"] = spent
        out["ledger"] = "privacy_ledger.json in each site's results folder"
    if p.central_dp != "none":
        rounds = sum(1 for e in history if e.get("n-sites"))
        out["central"] = {
            "mode": p.central_dp,
            "noise-multiplier": p.central_noise_multiplier,
            "clipping-norm": p.central_clipping_norm,
            "rounds": rounds,
            "delta": p.delta,
            "client-level-epsilon": central_dp_epsilon(p.central_noise_multiplier, rounds, p.delta),
            "privacy-unit": "one site (its whole model update), every site in every round, equal weights",
        }
    if stopped is not None:
        out["stopped"] = stopped
    if refusals:
        out["refusals"] = {str(r): {names.get(str(n), str(n)): why for n, why in by.items()} for r, by in refusals.items()}
    return out
