"""Issue 18's acceptance benchmark: federated marker genes and calibrated confidence on DLPFC.

One federated simulation of the four donor-3 DLPFC sections (151673-151676, one hospital
each, Maynard et al. 2021) with ``configs/dlpfc.yaml`` as users get it (marker genes and
calibration on by default; nothing tuned on labels), then three checks:

1. ``markers_equal_pooled``: the federated marker statistics (``markers.csv``) against
   pooled ``scanpy.tl.rank_genes_groups`` on the annotated output sections, pooled,
   restricted to the genes every section shares, ``normalize_total`` + ``log1p``, grouped
   by the federated domains (max absolute difference, scanpy's float64 statistics).
2. ``dlpfc_known_markers_found``: every manual layer is matched to a federated domain by
   the calibration phase's one-to-one (Hungarian) matching; a known layer marker from the
   literature (``KNOWN_MARKERS``, fixed before any result was seen) counts as found when it
   is among the top ``--top`` (20) genes of its layer's domain.
3. ``ece``: the calibration phase's expected calibration error before and after the
   label-free temperature, with the coverage above 0.9 confidence and its accuracy.

Writes ``benchmarks/results/interpretability.md``, ``interpretability.json``,
``interpretability_reliability.png`` and ``interpretability_markers.png``.

    python benchmarks/interpretability.py [--data ../shared/data/dlpfc] [--seed 0]

The data folder may also be given by ``FEDSPATIAL_DLPFC``. ``--rounds`` and ``--sections``
exist for quick checks only; the committed result uses the config's defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from dlpfc import FOUR, write_manifest  # benchmarks/dlpfc.py: the same hospitals and manifest
from provenance import provenance  # benchmarks/provenance.py

from fedspatial.shared.storage.atomic import write_atomic, write_json_atomic, write_text_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
logger = logging.getLogger("interpretability")

# Known layer markers, written down before the benchmark was first run (not revised after).
# Maynard et al. 2021 (Nat Neurosci 24:425, doi:10.1038/s41593-020-00787-0): Fig. 1 shows the
# known markers MOBP (white matter) and PCP4 (layer 5); Fig. 2 the layer-enriched genes AQP4
# (L1), HPCAL1 (L2), FREM3 (L3), TRABD2A (L5), KRT17 (L6) and MOBP (WM). MBP: myelin basic
# protein, the oligodendrocyte/white-matter marker spatialLIBD shows next to MOBP. RORB: the
# layer-4 marker of Zeng et al. 2012 (Cell 149:483, human neocortex in situ hybridization).
KNOWN_MARKERS: dict[str, tuple[str, ...]] = {
    "Layer1": ("AQP4",),
    "Layer2": ("HPCAL1",),
    "Layer3": ("FREM3",),
    "Layer4": ("RORB",),
    "Layer5": ("PCP4", "TRABD2A"),
    "Layer6": ("KRT17",),
    "WM": ("MOBP", "MBP"),
}
SOURCES = {
    "AQP4": "Maynard 2021 Fig. 2", "HPCAL1": "Maynard 2021 Fig. 2", "FREM3": "Maynard 2021 Fig. 2",
    "RORB": "Zeng 2012", "PCP4": "Maynard 2021 Fig. 1", "TRABD2A": "Maynard 2021 Fig. 2",
    "KRT17": "Maynard 2021 Fig. 2", "MOBP": "Maynard 2021 Figs. 1-2", "MBP": "spatialLIBD (myelin)",
}
LAYERS = ("Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM")
FIELDS = {"scores": "score", "logfoldchanges": "logfoldchange", "pvals": "pval", "pvals_adj": "pval_adj"}
TARGET_EQUAL, TARGET_FOUND, TARGET_ECE = 1e-6, 2 / 3, 0.05
# Typed in on purpose (printed under "Development log", which says so).
REPEATS = (
    "three earlier runs of this script with the same seed 0 on this machine gave different partitions (joint ARI "
    "0.511, 0.512, 0.525; Layer4 or Layer2 left without a domain of its own), 5 of 9 known markers each time "
    "(not always the same ones), ECE 0.342 -> 0.223, 0.338 -> 0.219, 0.343 -> 0.215, and marker scores "
    "within 1.1e-11 of pooled scanpy every time. The runs are not bitwise reproducible. FedAvg then summed the "
    "sites' replies in arrival order; replies now come in site-name order (1d319db), but two later runs of the "
    "same commit still gave joint ARI 0.512 and 0.525, and their round-1 site losses already differed by 1e-4, "
    "before any aggregation: the variation arises inside the sites' computation (not found yet; the small "
    "demo federation is bit-identical run to run)."
)


# ----------------------------------------------------------------- the run
def run_federated(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any], float]:
    """One federated simulation with the config as users get it; returns the mode's folder,
    its metrics.json and the wall time."""
    from fedspatial.shared.config import load_config
    from fedspatial.simulation import simulate

    sections = tuple(args.sections)
    manifest = write_manifest(Path(args.data), sections, work / "federation.json")
    run_name = f"seed{args.seed}"
    if (work / run_name).exists():
        shutil.rmtree(work / run_name)
    overrides: dict[str, Any] = {
        "run-name": run_name, "results-dir": str(work), "seed": args.seed, "data.manifest": str(manifest),
    }
    if args.rounds:
        overrides["training.num-rounds"] = args.rounds
    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()
    # The integration report (batch mixing scores) is not part of this benchmark; markers and
    # calibration are phases of the run itself and run with it.
    simulate(cfg, modes=["federated"], integration_report=False)
    wall = time.perf_counter() - t0
    folder = work / run_name / "federated"
    return folder, json.loads((folder / "metrics.json").read_text()), wall


def annotated_sections(folder: Path) -> dict[str, Any]:
    """The run's annotated output sections, by section name (site order)."""
    import anndata as ad

    out = {}
    for path in sorted((folder / "sites").glob("*/*.h5ad")):
        out[path.stem.split("__")[-1]] = ad.read_h5ad(path)
    return out


# ----------------------------------------------------------------- 1. equal to pooled scanpy
def pooled_scanpy(adatas: dict[str, Any], genes: list[str], feature_key: str, target_sum: float, method: str) -> tuple[pd.DataFrame, Any]:
    """scanpy's ``rank_genes_groups`` on the pooled annotated sections: its float64
    statistics (before it casts scores to float32 for ``uns``) and the pooled AnnData."""
    import anndata as ad
    import scanpy as sc
    from scanpy.tools._rank_genes_groups import _RankGenes

    parts = []
    for a in adatas.values():
        a = a.copy()
        a.var_names = a.var[feature_key].astype(str).to_numpy()
        a = a[:, genes].copy()
        a.X = a.X.astype(np.float64)
        parts.append(a)
    pooled = ad.concat(parts, join="inner")
    assert list(pooled.var_names) == genes
    pooled.obs["fedspatial_domain"] = pooled.obs["fedspatial_domain"].astype(str).astype("category")
    sc.pp.normalize_total(pooled, target_sum=target_sum)
    sc.pp.log1p(pooled)
    ranker = _RankGenes(pooled, "all", "fedspatial_domain", use_raw=False)
    ranker.compute_statistics(method, n_genes_user=pooled.n_vars)
    sc.tl.rank_genes_groups(pooled, "fedspatial_domain", method=method, n_genes=pooled.n_vars)
    return ranker.stats, pooled


def compare_to_pooled(table: pd.DataFrame, stats: pd.DataFrame, pooled: Any, top: int) -> dict[str, Any]:
    """Max absolute differences per field, by (domain, gene); and whether the top genes of
    every domain come in the same order as scanpy's ``uns`` names."""
    uns = pooled.uns["rank_genes_groups"]
    diffs = dict.fromkeys(FIELDS, 0.0)
    diffs_uns = dict.fromkeys(FIELDS, 0.0)
    same_order = True
    for domain, rows in table.groupby("domain", sort=False):
        ours = rows.set_index("gene")
        ref = stats[domain].set_index("names")
        for field, column in FIELDS.items():
            diffs[field] = max(diffs[field], float(np.abs(ours[column].to_numpy() - ref.loc[ours.index, field].to_numpy()).max()))
            stored = pd.Series(np.asarray(uns[field][domain], dtype=np.float64), index=np.asarray(uns["names"][domain]))
            diffs_uns[field] = max(diffs_uns[field], float(np.abs(ours[column].to_numpy() - stored.loc[ours.index].to_numpy()).max()))
        same_order &= list(rows.sort_values("rank")["gene"][:top]) == list(uns["names"][domain][:top])
    return {"max_abs_diff": diffs, "max_abs_diff_vs_uns_float32": diffs_uns, f"top{top}_order_equal": bool(same_order),
            "domains": sorted(table["domain"].unique().tolist(), key=int), "genes": int(pooled.n_vars), "cells": int(pooled.n_obs)}


def site_uns_readable(adatas: dict[str, Any], top: int) -> bool:
    """Every site's annotated section holds ``uns["rank_genes_groups"]`` that scanpy reads."""
    import scanpy as sc

    for a in adatas.values():
        groups = list(a.uns["rank_genes_groups"]["names"].dtype.names)
        for g in groups:
            if len(sc.get.rank_genes_groups_df(a, group=g).head(top)) != top:
                return False
    return True


# ----------------------------------------------------------------- 2. known markers
def known_markers(table: pd.DataFrame, matching: dict[str, str], symbols: dict[str, str], top: int) -> dict[str, Any]:
    """For every layer, the rank of each known marker in its matched domain's list (and,
    for reading only, its best rank over all domains)."""
    ranked = {d: [symbols.get(g, g) for g in rows.sort_values("rank")["gene"]] for d, rows in table.groupby("domain", sort=False)}
    layer_to_domain = {label: domain for domain, label in matching.items()}
    by_layer: dict[str, Any] = {}
    found = total = 0
    for layer, markers in KNOWN_MARKERS.items():
        domain = layer_to_domain.get(layer)
        ranks: dict[str, int | None] = {}
        best: dict[str, list[Any]] = {}
        for gene in markers:
            placed = sorted((names.index(gene) + 1, d) for d, names in ranked.items() if gene in names)
            if placed:
                best[gene] = [placed[0][1], placed[0][0]]
            names = ranked.get(domain or "", [])
            ranks[gene] = names.index(gene) + 1 if gene in names else None
        hits = [g for g, r in ranks.items() if r is not None and r <= top]
        found += len(hits)
        total += len(markers)
        by_layer[layer] = {"domain": domain, "found": hits, "missing": [g for g in markers if g not in hits], "rank": ranks,
                           "best_domain_and_rank": best}
    return {"found": found, "of": total, "by_layer": by_layer, "matching": "hungarian (one-to-one, largest total overlap; "
            "the calibration phase's)", "top": top}


def layer_domain_table(adatas: dict[str, Any], label_key: str) -> pd.DataFrame:
    """Labelled spots per (layer, domain), pooled over the output sections."""
    frames = [a.obs[[label_key, "fedspatial_domain"]].astype(str) for a in adatas.values()]
    obs = pd.concat(frames)
    obs = obs[obs[label_key].isin(LAYERS)]
    return pd.crosstab(obs[label_key], obs["fedspatial_domain"])


def largest_overlap(table: pd.DataFrame) -> dict[str, str]:
    """Layer -> the domain holding most of its spots (many-to-one; for comparison only)."""
    return {layer: str(table.loc[layer].idxmax()) for layer in table.index}


def dotplot(pooled: Any, table: pd.DataFrame, matching: dict[str, str], symbols: dict[str, str], path: Path, n: int) -> Path:
    """The top ``n`` genes of every matched domain, with gene symbols, rows named by layer."""
    from fedspatial.shared.plots import plot_marker_dots

    domains = sorted(matching, key=lambda d: LAYERS.index(matching[d]) if matching[d] in LAYERS else 99)
    genes = list(dict.fromkeys(g for d in domains for g in table[table["domain"] == d].sort_values("rank")["gene"][:n]))
    x = pooled[:, genes].X
    dom = pooled.obs["fedspatial_domain"].astype(str).to_numpy()
    means, fractions = [], []
    for d in domains:
        rows = x[dom == d]
        means.append(np.asarray(rows.mean(axis=0)).ravel())
        fractions.append(np.asarray((rows > 0).mean(axis=0)).ravel())
    return plot_marker_dots(np.array(means), np.array(fractions), domains=[f"{d} ({matching[d]})" for d in domains],
                            genes=[symbols.get(g, g) for g in genes], path=path,
                            title=f"top {n} marker genes of each domain (matched layer), {pooled.n_obs} spots")


# ----------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("FEDSPATIAL_DLPFC", str(ROOT.parent / "shared" / "data" / "dlpfc"))
    parser.add_argument("--data", default=default_data, help="folder with 151673-151676.h5ad")
    parser.add_argument("--config", default=str(ROOT / "configs" / "dlpfc.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=0, help="override training.num-rounds (0: the config's; quick checks only)")
    parser.add_argument("--sections", default=",".join(FOUR), type=lambda v: v.split(","), help="quick checks only")
    parser.add_argument("--top", type=int, default=20, help="a known marker counts when in its domain's top N")
    parser.add_argument("--work", default=str(HERE / ".work" / "interpretability"))
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("flwr").propagate = False
    data = Path(args.data)
    missing = [s for s in args.sections if not (data / f"{s}.h5ad").is_file()]
    if missing:
        print(f"DLPFC data not found in {data} (missing {', '.join(missing)}.h5ad): pass --data or set FEDSPATIAL_DLPFC", file=sys.stderr)
        return 2
    from fedspatial.shared.config import load_config

    cfg = load_config(args.config)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(sys.argv[1:])
    t0 = time.perf_counter()

    logger.info("federated run: sections %s, seed %d", ",".join(args.sections), args.seed)
    folder, metrics, run_wall = run_federated(args, work)
    if "skipped" in metrics.get("markers", {"skipped": "no markers entry"}):
        raise SystemExit(f"the run wrote no marker genes: {metrics.get('markers')}")
    table = pd.read_csv(folder / "markers.csv", dtype={"domain": str, "gene": str})
    adatas = annotated_sections(folder)
    key = cfg.data.feature_key or ""
    symbols = {}
    for a in adatas.values():
        ids = a.var[key].astype(str) if key else pd.Series(a.var_names, index=a.var_names)
        symbols.update(dict(zip(ids, map(str, a.var_names), strict=True)))
    genes = list(dict.fromkeys(table["gene"]))  # every shared gene (each domain lists all of them)

    logger.info("pooled scanpy rank_genes_groups on %d genes", len(genes))
    stats, pooled = pooled_scanpy(adatas, genes, key, cfg.features.target_sum, cfg.markers.marker_method)
    equal = compare_to_pooled(table, stats, pooled, args.top)
    equal["site_uns_readable"] = site_uns_readable(adatas, args.top)
    logger.info("federated vs pooled scanpy: %s", equal["max_abs_diff"])

    calibration = metrics["calibration"]
    matching: dict[str, str] = calibration["before"]["matching"]
    found = known_markers(table, matching, symbols, args.top)
    crosstab = layer_domain_table(adatas, cfg.data.label_key)
    overlap = largest_overlap(crosstab)
    for layer, entry in found["by_layer"].items():
        dom = entry["domain"]
        entry["layer_spots_in_domain"] = int(crosstab.loc[layer, dom]) if dom in crosstab.columns and layer in crosstab.index else 0
        entry["layer_spots"] = int(crosstab.loc[layer].sum()) if layer in crosstab.index else 0
        entry["domain_spots_labelled"] = int(crosstab[dom].sum()) if dom in crosstab.columns else 0
    found_overlap = known_markers(table, {d: layer for layer, d in overlap.items()}, symbols, args.top) if len(set(overlap.values())) == len(overlap) else None
    logger.info("known markers found: %d of %d", found["found"], found["of"])

    for src, dst in (("reliability.png", "interpretability_reliability.png"),):
        if (folder / src).is_file():
            write_atomic(out / dst, lambda tmp, s=folder / src: shutil.copyfile(s, tmp))
    dotplot(pooled, table, matching, symbols, out / "interpretability_markers.png", 5)
    total = time.perf_counter() - t0

    settings = {"command": f"python benchmarks/interpretability.py {command}".strip(), **vars(args),
                "num-rounds": args.rounds or cfg.training.num_rounds}
    # The JSON holds exactly the issue's keys (and the provenance every result carries);
    # the details behind them go into the markdown only.
    result: dict[str, Any] = {
        "markers_equal_pooled": equal["max_abs_diff"]["scores"],
        "dlpfc_known_markers_found": found,
        "ece": {"before": calibration["before"]["ece"], "after": calibration["after"]["ece"]},
        **provenance(settings),
    }
    details: dict[str, Any] = {
        "markers_equal_pooled_detail": equal,
        "calibration": {
            "temperature": calibration.get("temperature"),
            **{k: {f: calibration[k][f] for f in ("ece", "accuracy", "mean_confidence", "coverage_above_0.9", "accuracy_above_0.9")}
               for k in ("before", "after")},
            "matching": matching,
        },
        "run": {"wall_s": run_wall, "total_s": total, "joint_ari": metrics["joint"].get("ari"),
                "median_section_ari": metrics.get("median_section_ari"), "domain_sizes": metrics.get("domain-sizes")},
    }
    write_json_atomic(out / "interpretability.json", result)
    report = markdown({**result, **details}, table, symbols, matching, overlap, found_overlap, cfg, args, metrics)
    write_text_atomic(out / "interpretability.md", report)
    print(report)
    return 0


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def markdown(result: dict[str, Any], table: pd.DataFrame, symbols: dict[str, str], matching: dict[str, str],
             overlap: dict[str, str], found_overlap: dict[str, Any] | None, cfg: Any, args: argparse.Namespace,
             metrics: dict[str, Any]) -> str:
    eq, found, cal, run = result["markers_equal_pooled_detail"], result["dlpfc_known_markers_found"], result["calibration"], result["run"]
    ece = result["ece"]
    rounds = args.rounds or cfg.training.num_rounds
    top = args.top
    lines = [
        "# Interpretability: marker genes and calibrated confidence on DLPFC",
        "",
        f"One federated run of DLPFC sections {', '.join(args.sections)} (Maynard et al. 2021; one hospital each), "
        f"seed {args.seed}, config `configs/dlpfc.yaml` as users get it ({rounds} rounds"
        + ("" if not args.rounds else f", reduced from {cfg.training.num_rounds} for a quick check") +
        f", K = {cfg.clustering.n_domains}, marker genes `{cfg.markers.marker_method}` and calibration on by default). "
        "Nothing was tuned on labels: labels enter only the evaluation (matching domains to layers, ECE).",
        f"Machine: {platform.machine()}, {platform.system()}, {os.cpu_count()} CPU cores, CPU only. "
        f"Federated run {run['wall_s']:.0f} s, whole benchmark {run['total_s']:.0f} s. "
        f"Joint ARI {run['joint_ari']:.3f}, median section ARI {run['median_section_ari']:.3f}. "
        f"Command: `{result['config']['command']}`.",
        "",
        "## Targets",
        "",
        f"- markers equal pooled scanpy to 1e-6: max |score difference| {result['markers_equal_pooled']:.1e} "
        f"({_met(result['markers_equal_pooled'] <= TARGET_EQUAL)})",
        f"- at least 2/3 of the listed known markers in the top {top} of their matched domain: "
        f"{found['found']}/{found['of']} ({_met(found['found'] >= TARGET_FOUND * found['of'])})",
        f"- ECE after <= 0.05 and lower than before: before {ece['before']:.3f}, after {ece['after']:.3f} "
        f"({_met(ece['after'] <= TARGET_ECE and ece['after'] < ece['before'])})",
        "",
        "## 1. Federated marker genes vs pooled scanpy",
        "",
        f"The run's `markers.csv` (every one of the {eq['genes']} genes the {len(args.sections)} sections share, for each of "
        f"{len(eq['domains'])} domains) against `scanpy.tl.rank_genes_groups(method=\"{cfg.markers.marker_method}\")` "
        f"on the pooled annotated output sections ({eq['cells']} spots; genes matched on `var[\"{cfg.data.feature_key}\"]`, "
        "restricted to the shared genes, float64, `normalize_total` + `log1p`, grouped by `obs[\"fedspatial_domain\"]`). "
        "Differences by (domain, gene), against scanpy's float64 statistics (before it rounds scores and "
        "fold changes to float32 for `uns`):",
        "",
        "| statistic | max abs difference | vs scanpy's `uns` (float32) |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {f} | {eq['max_abs_diff'][f]:.1e} | {eq['max_abs_diff_vs_uns_float32'][f]:.1e} |" for f in FIELDS]
    lines += [
        "",
        f"Top {top} genes of every domain in scanpy's order: {'identical' if eq[f'top{top}_order_equal'] else 'NOT identical'}. "
        f"Each site's annotated section carries `uns[\"rank_genes_groups\"]` that `sc.get.rank_genes_groups_df` reads: "
        f"{'yes' if eq['site_uns_readable'] else 'NO'}.",
        "",
        "## 2. Known layer markers",
        "",
        "Layers are matched to domains one-to-one by the calibration phase's Hungarian matching (largest "
        "total overlap of labelled spots); a marker counts as found when it is among the top "
        f"{top} genes (by t-test score) of its layer's domain. The list was fixed in the script before the "
        "first run: Maynard et al. 2021 (Nat Neurosci 24:425) Fig. 1 (MOBP white matter, PCP4 layer 5) and "
        "Fig. 2 (layer-enriched AQP4 L1, HPCAL1 L2, FREM3 L3, TRABD2A L5, KRT17 L6, MOBP WM); MBP (myelin "
        "basic protein, white matter, shown with MOBP in spatialLIBD); RORB (layer 4, Zeng et al. 2012, "
        "Cell 149:483). All nine genes are among the shared genes.",
        "",
        "| layer | domain | layer's spots in it | marker (rank in domain) | found | best rank anywhere (domain) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for layer, entry in found["by_layer"].items():
        ranks = ", ".join(f"{g} ({r if r is not None else '-'})" for g, r in entry["rank"].items())
        best = ", ".join(f"{g} {r} ({d})" for g, (d, r) in entry["best_domain_and_rank"].items())
        share = f"{entry['layer_spots_in_domain']} of {entry['layer_spots']}"
        lines.append(f"| {layer} | {entry['domain']} | {share} | {ranks} | {len(entry['found'])}/{len(entry['rank'])} | {best} |")
    lines += ["", f"Found: {found['found']} of {found['of']}."]
    weak = [f"{layer} (domain {e['domain']} holds {e['layer_spots_in_domain']} of its {e['layer_spots']} labelled spots)"
            for layer, e in found["by_layer"].items() if e["layer_spots"] and e["layer_spots_in_domain"] < 0.25 * e["layer_spots"]]
    if weak:
        lines.append(
            "A one-to-one matching gives every layer a domain even where the clustering has none for it: "
            f"{'; '.join(weak)}. A marker of such a layer cannot rank high in a domain made of other tissue; "
            "the last column shows where each marker ranks best."
        )
    if found_overlap is not None:
        lines.append(
            f"With each layer matched instead to the domain holding most of its spots, the same count is "
            f"{found_overlap['found']} of {found_overlap['of']} (given for comparison; the target uses the Hungarian matching)."
        )
    else:
        shared = sorted({d for d in overlap.values() if list(overlap.values()).count(d) > 1})
        lines.append(
            f"Matched instead by largest overlap, several layers would share domain(s) {', '.join(shared)} "
            f"({', '.join(f'{k}->{v}' for k, v in overlap.items())}); the target uses the one-to-one matching."
        )
    lines += ["", f"Top 10 markers of each matched domain (gene symbols; `markers.csv` lists Ensembl ids, "
              f"`data.feature-key: {cfg.data.feature_key}`):", "", "| layer | domain | top 10 |", "| --- | --- | --- |"]
    for domain, layer in sorted(matching.items(), key=lambda kv: LAYERS.index(kv[1]) if kv[1] in LAYERS else 99):
        rows = table[table["domain"] == domain].sort_values("rank")
        lines.append(f"| {layer} | {domain} | {', '.join(symbols.get(g, g) for g in rows['gene'][:10])} |")
    sizes = metrics.get("domain-sizes") or []
    unmatched = [str(d) for d in range(len(sizes)) if str(d) not in matching]
    if unmatched:
        lines.append(f"\nDomains without a layer: {', '.join(unmatched)}.")
    lines += [
        "",
        "![top 5 markers per domain](interpretability_markers.png)",
        "",
        "(Dot plot drawn by this script from the pooled outputs with gene symbols; the run's own "
        "`markers_dotplot.png` shows the same per-domain means and fractions with Ensembl ids.)",
        "",
        "## 3. Calibration of the domain confidence",
        "",
        "From the run's `metrics.json: calibration` (binned tables summed over the sites, domains matched to "
        "layers one-to-one; a domain without a layer counts as wrong). After: `obs[\"fedspatial_confidence_calibrated\"]`, "
        f"the posterior tempered by one label-free temperature T = {cal['temperature']:.3g} fitted on spatial-neighbour "
        "agreement.",
        "",
        "| confidence | ECE | accuracy | mean confidence | spots above 0.9 | their accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, name in (("before", "posterior (`fedspatial_confidence`)"), ("after", "recalibrated")):
        c = cal[key]
        lines.append(f"| {name} | {c['ece']:.3f} | {c['accuracy']:.3f} | {c['mean_confidence']:.3f} | "
                     f"{100 * c['coverage_above_0.9']:.1f} % | {c['accuracy_above_0.9']:.3f} |")
    before, after = cal["before"], cal["after"]
    lines += [
        "",
        f"Reading: {100 * (1 - before['accuracy']):.0f} % of labelled spots lie in a domain not matched to their layer, "
        f"so a confidence calibrated against the layers would average about {before['accuracy']:.2f}; the posterior "
        f"averages {before['mean_confidence']:.2f} and the recalibrated one {after['mean_confidence']:.2f}. The "
        "label-free temperature sees only disagreement between a spot and its spatial neighbours; a domain that differs "
        "from the manual layer consistently over a whole region (two layers merged, one layer split in two) agrees with "
        "its neighbours and still looks certain: a fit on neighbour agreement cannot see it.",
        "",
        "![reliability](interpretability_reliability.png)",
        "",
        "## Development log",
        "",
        "Measured by hand while writing this script, not rerun by it: " + REPEATS,
        "",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
