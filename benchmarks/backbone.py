"""Backbone benchmark: federated vs local-only vs centralized on a large synthetic federation.

Runs the three modes side by side (same config, same machine, one after the other) on
the built-in synthetic federation scaled to >= 30,000 spots over 3 sites, with the
defaults a user gets from configs/demo.yaml. Writes benchmarks/results/backbone.md and
benchmarks/results/backbone.json (keys: joint_ari, wall_s, wall_ratio, and commit, config,
machine, date: where the figures came from).

    python benchmarks/backbone.py [--scale 7] [--work benchmarks/.work]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance  # benchmarks/provenance.py

from fedspatial.shared.config import load_config
from fedspatial.shared.data.manifest import read_manifest
from fedspatial.simulation import simulate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Peak memory of one site's client work (load, harmonize, graph, train one round,
# embed), measured in a fresh process per site so sites do not share a high-water mark.
SITE_PROBE = r"""
import json, resource, sys, torch
from fedspatial.shared.data.sections import SiteSource, load_site_sections, prepare_graph_data
from fedspatial.shared.features.selection import compute_feature_stats, build_feature_space, feature_names
from fedspatial.shared.models import GATAutoencoder
from fedspatial.shared.training.loop import train_epochs, embed
cfg = json.loads(sys.argv[1])
sections = load_site_sections([SiteSource(cfg["name"], cfg["path"])])
features = feature_names(sections[0].adata)
stats = compute_feature_stats([s.adata for s in sections], features)
space = build_feature_space(stats, n_top_features=cfg["n_top"], target_sum=1e4)
data = prepare_graph_data(sections, space, n_neighbors=cfg["k"])
model = GATAutoencoder(len(space.selected), cfg["hidden"], cfg["latent"])
train_epochs(model, data, epochs=cfg["epochs"], batch_size=cfg["batch"])
embed(model, data)
print(json.dumps({"cells": data.n_cells, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def site_peak_memory(manifest: dict, cfg) -> dict[str, dict]:
    out = {}
    for node in manifest["nodes"]:
        site = node["sites"][0]
        probe = {
            "name": site["name"], "path": site["data-path"], "n_top": cfg.features.n_top_features,
            "k": cfg.neighbors.n_neighbors, "hidden": cfg.model.hidden_dim, "latent": cfg.model.latent_dim,
            "epochs": cfg.training.local_epochs, "batch": cfg.training.batch_size,
        }
        res = subprocess.run([sys.executable, "-c", SITE_PROBE, json.dumps(probe)], capture_output=True, text=True, check=True)
        out[site["name"]] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--scale", type=float, default=7.0, help="synthetic section size multiplier")
    parser.add_argument("--work", default=str(HERE / ".work"), help="scratch folder (data and runs)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("flwr").propagate = False

    work = Path(args.work)
    run_name = "backbone"
    if (work / run_name).exists():
        shutil.rmtree(work / run_name)
    cfg = load_config(
        args.config,
        {
            "run-name": run_name,
            "results-dir": str(work),
            "data.synthetic-dir": str(work / f"synthetic-x{args.scale:g}"),
            "data.synthetic-scale": args.scale,
        },
    )
    t0 = time.perf_counter()
    results = simulate(cfg)
    total = time.perf_counter() - t0

    run_dir = work / run_name
    manifest = read_manifest(Path(cfg.data.synthetic_dir) / "federation.json")
    n_spots = {
        site: rep["n_cells"]
        for site, rep in json.loads((run_dir / "federated" / "metrics.json").read_text())["sites"].items()
    }
    memory = site_peak_memory(manifest, cfg)
    fed, cen, loc = results["federated"], results["centralized"], results["local"]
    ratio = fed["wall_s"] / cen["wall_s"]

    figures = {
        "joint_ari": {m: round(results[m]["joint_ari"], 4) for m in ("federated", "local", "centralized")},
        "wall_s": {m: round(results[m]["wall_s"], 2) for m in ("federated", "local", "centralized")},
        "wall_ratio": round(ratio, 3),
        **provenance({"command": " ".join(["python", "benchmarks/backbone.py", *sys.argv[1:]]), "scale": args.scale, "run-config": cfg.to_run_config()}),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backbone.json").write_text(json.dumps(figures, indent=2) + "\n")

    lines = [
        "# Backbone benchmark: federated vs local-only vs centralized",
        "",
        f"Synthetic federation (built-in generator, scale x{args.scale:g}): "
        f"{sum(n_spots.values()):,} spots over {len(n_spots)} sites "
        f"({', '.join(f'{k}: {v:,}' for k, v in n_spots.items())}), config `configs/demo.yaml` defaults "
        f"({cfg.training.num_rounds} rounds x {cfg.training.local_epochs} local epochs, "
        f"{cfg.features.n_top_features} features, {cfg.clustering.n_domains} domains).",
        f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores, CPU only. Modes ran one after another in one process; whole benchmark "
        f"{total:.0f} s. Command: `python benchmarks/backbone.py --scale {args.scale:g}`; "
        f"commit {figures['commit']}, {figures['date']}.",
        "",
        "| mode | joint ARI | joint NMI | mean section ARI | median section ARI | wall s | s/round | bytes/round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in ("federated", "local", "centralized"):
        r = results[mode]
        lines.append(
            f"| {mode} | {r['joint_ari']:.3f} | {r['joint_nmi']:.3f} | {r['mean_section_ari']:.3f} | "
            f"{r['median_section_ari']:.3f} | {r['wall_s']:.1f} | {r['seconds_per_round']:.2f} | {r['bytes_per_round']:,.0f} |"
        )
    lines += [
        "",
        f"- federated / centralized wall time: **{ratio:.2f}** (target <= 2)",
        f"- federated joint ARI - centralized: {fed['joint_ari'] - cen['joint_ari']:+.3f} (target >= -0.05)",
        f"- federated joint ARI - local-only: {fed['joint_ari'] - loc['joint_ari']:+.3f} (target >= +0.10)",
        "- wall s: whole simulation including Flower/Ray start-up; local-only is the sum of one "
        "simulation per site. s/round: mean time of a training round (train + evaluate messages). "
        "bytes/round: model arrays sent to and received from all sites per round.",
        "- Local-only domain ids are chosen by each site alone, so the joint ARI penalizes ids "
        "that disagree across sites; mean section ARI does not.",
        "",
        "Peak memory per site (fresh process: load, harmonize, graph, one round of training, embed):",
        "",
        "| site | spots | peak RSS MiB |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {s} | {m['cells']:,} | {m['peak_rss_mb']:.0f} |" for s, m in memory.items()]
    lines += ["", "Per-section ARI:", "", "| section | federated | local | centralized |", "| --- | --- | --- | --- |"]
    for sec in sorted(fed["section_ari"]):
        lines.append(
            f"| {sec} | {fed['section_ari'][sec]:.3f} | {loc['section_ari'].get(sec, float('nan')):.3f} | "
            f"{cen['section_ari'].get(sec, float('nan')):.3f} |"
        )
    (out / "backbone.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
