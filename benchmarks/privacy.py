"""Privacy benchmark: the privacy-utility curve of node-level DP-SGD on the demo federation,
and the cost of DP-SGD per epoch.

- Joint ARI of the federated run without DP and with local DP at epsilon 1, 4 and 8
  (per site, delta 1e-5, whole run), same config and rounds (configs/demo.yaml).
- ``dp_overhead``: DP-SGD epoch time / non-private epoch time on the largest demo site,
  measured side by side in this process (interleaved repeats, median), before the runs.

Writes benchmarks/results/privacy.md and benchmarks/results/privacy.json.

    python benchmarks/privacy.py [--epsilons 1 4 8] [--rounds 30] [--work benchmarks/.work]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from provenance import provenance  # benchmarks/provenance.py

from fedspatial.shared.config import ExperimentConfig, load_config
from fedspatial.shared.data.manifest import read_manifest
from fedspatial.shared.data.sections import SiteSource, load_site_sections, prepare_graph_data
from fedspatial.shared.features.selection import (
    build_feature_space,
    compute_feature_stats,
    feature_names,
)
from fedspatial.shared.graph.neighbors import bound_in_degree
from fedspatial.shared.models import GATAutoencoder
from fedspatial.shared.privacy.dp import NodeBound, dp_train_epochs, plan_round
from fedspatial.shared.storage.atomic import write_json_atomic, write_text_atomic
from fedspatial.shared.training.loop import GraphData, train_epochs
from fedspatial.simulation import ensure_federation, simulate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def epoch_times(cfg: ExperimentConfig, manifest: Path, repeats: int, modes: list[str]) -> dict[str, list[float]]:
    """Seconds per local epoch on the largest site: non-private vs DP-SGD engines."""
    sites = [n["sites"][0] for n in read_manifest(manifest)["nodes"]]
    sections = max((load_site_sections([SiteSource(s["name"], s["data-path"])]) for s in sites), key=lambda x: sum(a.adata.n_obs for a in x))
    stats = compute_feature_stats([s.adata for s in sections], feature_names(sections[0].adata))
    space = build_feature_space(stats, n_top_features=cfg.features.n_top_features, target_sum=cfg.features.target_sum)
    data = prepare_graph_data(sections, space, n_neighbors=cfg.neighbors.n_neighbors)
    k = cfg.privacy.max_degree or cfg.neighbors.n_neighbors
    dp_data = GraphData(data.x, torch.from_numpy(bound_in_degree(data.neighbors.numpy(), k)), data.sections)
    t = cfg.training
    plan = plan_round(data.n_cells, batch_size=t.batch_size, epochs=1, max_grad_norm=1.0, bound=NodeBound(k), node_noise_multiplier=1.0)
    times: dict[str, list[float]] = {"non-private": [], **{f"dp-{m}": [] for m in modes}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the simulation, where each site's ClientApp gets one core
    for r in range(repeats + 1):  # the first pass warms up and is dropped
        for name in times:
            torch.manual_seed(r)
            model = GATAutoencoder(len(space.selected), cfg.model.hidden_dim, cfg.model.latent_dim)
            start = time.perf_counter()
            if name == "non-private":
                train_epochs(model, data, epochs=1, batch_size=t.batch_size, lr=t.lr, seed=r)
            else:
                dp_train_epochs(model, dp_data, plan, lr=t.lr, grad_sample_mode=name[3:], seed=r)
            if r:
                times[name].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    times["n-cells"] = [float(data.n_cells)]
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--rounds", type=int, default=None, help="default: the config's num-rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per engine")
    parser.add_argument("--work", default=str(HERE / ".work"))
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("flwr").propagate = False
    work = Path(args.work)
    t0 = time.perf_counter()

    base = {"data.synthetic-dir": str(work / "synthetic-x1"), "results-dir": str(work), "simulation.modes": ["federated"]}
    if args.rounds:
        base["training.num-rounds"] = args.rounds
    cfg = load_config(args.config, base)
    manifest = ensure_federation(cfg)
    engines = ["ghost", "hooks", "functorch"]
    times = epoch_times(cfg, manifest, args.repeats, engines)
    median = {k: statistics.median(v) for k, v in times.items() if k != "n-cells"}
    overhead = {m: median[f"dp-{m}"] / median["non-private"] for m in engines}

    runs: dict[str, dict] = {}
    for eps in [None, *args.epsilons]:
        name = "privacy-none" if eps is None else f"privacy-eps{eps:g}"
        shutil.rmtree(work / name, ignore_errors=True)
        overrides = {**base, "run-name": name}
        if eps is not None:
            overrides.update({"privacy.local-dp": True, "privacy.target-epsilon": eps})
        run_cfg = load_config(args.config, overrides)
        res = simulate(run_cfg)["federated"]
        report = json.loads((work / name / "federated" / "metrics.json").read_text())
        spent = {s: v["epsilon"] for s, v in report["privacy"].get("site-epsilon", {}).items()}
        sigma = {}
        for site in spent:
            ledger = json.loads((work / name / "federated" / "sites" / site / "privacy_ledger.json").read_text())
            sigma[site] = ledger["node-noise-multiplier"]
        runs[name] = {
            "target_epsilon": eps, "joint_ari": res["joint_ari"], "joint_nmi": res["joint_nmi"],
            "mean_section_ari": res["mean_section_ari"], "wall_s": res["wall_s"],
            "seconds_per_round": res["seconds_per_round"], "site_epsilon": spent, "node_noise_multiplier": sigma,
        }
    none = runs["privacy-none"]["joint_ari"]
    eps8 = runs.get("privacy-eps8", {}).get("joint_ari")
    figures = {
        "joint_ari": {("none" if r["target_epsilon"] is None else f"eps{r['target_epsilon']:g}"): round(r["joint_ari"], 4) for r in runs.values()},
        "dp_overhead": round(overhead["ghost"], 3),
        "dp_overhead_by_engine": {m: round(v, 3) for m, v in overhead.items()},
        "epoch_seconds": {k: round(v, 4) for k, v in median.items()},
        "eps8_ari_gap": None if eps8 is None else round(none - eps8, 4),
        "runs": runs,
    }
    figures.update(provenance({"command": " ".join(["python", "benchmarks/privacy.py", *sys.argv[1:]]), **vars(args)}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "privacy.json", figures)

    rounds, epochs = cfg.training.num_rounds, cfg.training.local_epochs
    cmd = "python benchmarks/privacy.py" + (f" --rounds {args.rounds}" if args.rounds else "")
    lines = [
        "# Privacy benchmark: node-level DP-SGD on the demo federation",
        "",
        f"Demo federation (`configs/demo.yaml`: 3 synthetic hospitals, {rounds} rounds x {epochs} local epochs, "
        f"batch {cfg.training.batch_size}, {cfg.features.n_top_features} features, {cfg.clustering.n_domains} domains), "
        f"federated mode. Local DP: privacy unit one cell, degree bound {cfg.privacy.max_degree or cfg.neighbors.n_neighbors}, "
        f"clipping norm {cfg.privacy.max_grad_norm}, delta {cfg.privacy.delta:g}, noise calibrated so that each site "
        "spends the target epsilon over the whole run (dp-accounting PLD accountant, node-level pair: shared/privacy/accounting.py).",
        f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}, {os.cpu_count()} CPU cores (shared), "
        f"CPU only, torch {torch.__version__}. Whole benchmark {time.perf_counter() - t0:.0f} s. Command: `{cmd}`. "
        f"Commit `{figures['commit']}`, {figures['date']}.",
        "",
        "| setting | site epsilon (max) | node noise multiplier | joint ARI | joint NMI | mean section ARI | s/round |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs.values():
        label = "no DP" if r["target_epsilon"] is None else f"local DP, epsilon {r['target_epsilon']:g}"
        eps_txt = f"{max(r['site_epsilon'].values()):.2f}" if r["site_epsilon"] else "-"
        sig_txt = ", ".join(f"{v:.2f}" for v in r["node_noise_multiplier"].values()) or "-"
        lines.append(
            f"| {label} | {eps_txt} | {sig_txt} | {r['joint_ari']:.3f} | {r['joint_nmi']:.3f} | "
            f"{r['mean_section_ari']:.3f} | {r['seconds_per_round']:.2f} |"
        )
    lines += [
        "",
        f"- joint ARI at epsilon 8 minus no DP: **{-figures['eps8_ari_gap']:+.3f}** (target >= -0.10)" if eps8 is not None else "",
        f"- `dp_overhead` (ghost clipping, the default): **{overhead['ghost']:.2f}** (target <= 2.0); "
        + ", ".join(f"{m}: {overhead[m]:.2f}" for m in engines)
        + f". One epoch on the largest site, one thread ({int(times['n-cells'][0]):,} cells), median of {args.repeats} "
        f"interleaved repeats after a warm-up: non-private {median['non-private']:.3f} s, "
        + ", ".join(f"{m} {median['dp-' + m]:.3f} s" for m in engines) + ".",
        "- Node-level noise multiplier: noise std over the node-level sensitivity (1 + 2 x degree bound) x clipping "
        f"norm; the optimizer adds noise of std (that x {1 + 2 * (cfg.privacy.max_degree or cfg.neighbors.n_neighbors)}) x clipping norm to each step's sum of clipped "
        "per-neighbourhood gradients.",
    ]
    write_text_atomic(out / "privacy.md", "\n".join(x for x in lines if x is not None) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
