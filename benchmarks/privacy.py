"""Privacy benchmark: the privacy-utility curve of local DP, end to end (issue 13).

For the demo federation (``configs/demo.yaml``) and the DLPFC four hospitals (sections
151673-151676, ``configs/dlpfc.yaml``), federated mode only, epsilon in {1, 4, 8, inf}
and 3 seeds, each run in its own folder (its sites' privacy ledgers are its own):

- ``inf``: the non-private run with the config's shipped defaults (what a user gets
  without DP);
- epsilon ``e``: the same config plus ``privacy.local-dp: true``, ``privacy.target-epsilon:
  e`` and only the overrides the local-DP config checks demand (shared/privacy/checks.py:
  ``features.n-pcs`` 0, ``clustering.mixture``/``harmony`` none, ``clustering.n-init`` 1).

Figures: ``joint_ari`` (median over seeds) is the ARI of all labelled cells of all sites
pooled, computed exactly from the annotated h5ad files the sites write (under local DP the
run's own report holds only noised label x domain tables); ``end_to_end_epsilon`` is the
largest final ``epsilon`` of the sites' ``privacy_ledger.json`` (all releases of the run),
the most over the seeds (``null`` for ``inf``: no guarantee); ``dp_overhead`` comes from
``benchmarks/dp_timing.py``. Writes ``benchmarks/results/privacy.{md,json}``.

    python benchmarks/privacy.py [--datasets demo,dlpfc] [--epsilons 1,4,8,inf] [--seeds 0,1,2]
                                 [--rounds N] [--skip-timing] [--data ../shared/data/dlpfc]
    python benchmarks/privacy.py --report-only      # re-render privacy.md from privacy.json

Only the (data set, epsilon) entries run by one invocation are replaced in an existing
``privacy.json``; the others keep their values (and their own commit and date), so the
demo and DLPFC halves can run at different times.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dlpfc import FOUR, write_manifest  # benchmarks/dlpfc.py
from provenance import portable, provenance  # benchmarks/provenance.py

from fedspatial.shared.config import ExperimentConfig, load_config
from fedspatial.shared.privacy.accounting import ACCOUNTANT
from fedspatial.shared.storage.atomic import write_json_atomic, write_text_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = {"demo": ROOT / "configs" / "demo.yaml", "dlpfc": ROOT / "configs" / "dlpfc.yaml"}
TITLES = {"demo": "Demo federation (3 synthetic hospitals)", "dlpfc": "DLPFC, four hospitals (151673-151676)"}
EPSILONS = ("1", "4", "8", "inf")
ARI_TARGETS = {"8": 0.75, "4": 0.6}
"""Joint ARI at epsilon e >= this fraction of the non-private joint ARI."""
EPSILON_TOLERANCE = 0.01
MAX_OVERHEAD = 1.5
# Settings refused under local DP (shared/privacy/checks.py) and the value each needs.
DP_REQUIRED = {"features.n-pcs": 0, "clustering.mixture": "none", "clustering.harmony": "none",
               "clustering.n-init": 1, "training.proximal-mu": 0.0}
LEDGER = "privacy_ledger.json"
logger = logging.getLogger("privacy")


def eps_key(value: str) -> str:
    """``"8"``, ``"0.5"``, ``"inf"``: the key of one epsilon in the result file."""
    x = float(value)
    return "inf" if math.isinf(x) else f"{x:g}"


def dp_overrides(cfg: ExperimentConfig) -> dict[str, Any]:
    """The overrides of :data:`DP_REQUIRED` whose value in ``cfg`` differs (only those)."""
    out = {}
    for key, value in DP_REQUIRED.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name.replace("-", "_")) != value:
            out[key] = value
    return out


def settings(dataset: str, eps: str, rounds: int) -> dict[str, Any]:
    """What a run of ``dataset`` at ``eps`` overrides in its config (besides folders and seed)."""
    extra: dict[str, Any] = {"simulation.modes": ["federated"]}
    if rounds:
        extra["training.num-rounds"] = rounds
    if eps == "inf":
        return extra
    required = dp_overrides(load_config(CONFIGS[dataset], extra))  # read before local-dp refuses them
    return extra | {"privacy.local-dp": True, "privacy.target-epsilon": float(eps)} | required


# ----------------------------------------------------------------- one run
def pooled_scores(run_dir: Path, label_key: str) -> dict[str, Any]:
    """Exact scores from the annotated sections of a federated run: ``joint_ari`` (all
    labelled cells of all sites pooled; domain ids are shared in federated mode) and
    ``section_ari`` per section, with the same contingency code as the run's own report;
    ``sites``: the sites that wrote sections."""
    import anndata as ad

    from fedspatial.shared.evaluation import metrics

    tables, sections, sites = [], {}, set()
    for path in sorted((run_dir / "federated").rglob("*__*.h5ad")):
        adata = ad.read_h5ad(path, backed="r")  # obs only: the counts stay on disk
        obs = adata.obs
        adata.file.close()
        sites.add(path.stem.split("__", 1)[0])
        table = metrics.contingency(obs[label_key].to_numpy(), obs["fedspatial_domain"].astype(int).to_numpy())
        tables.append(table)
        sections[path.stem.split("__", 1)[1]] = metrics.ari_from_contingency(table)
    if not tables:
        raise RuntimeError(f"no annotated sections under {run_dir / 'federated'}")
    joint = metrics.ari_from_contingency(metrics.merge_contingency(tables))
    return {"joint_ari": joint, "section_ari": sections, "sites": sorted(sites)}


def ledgers(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per site: the final epsilon of its ledger, its status and the releases it charged."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((run_dir / "federated").rglob(LEDGER)):
        led = json.loads(path.read_text())
        kinds: dict[str, int] = {}
        for r in led.get("releases", []):
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        out[led.get("site", path.parent.name)] = {
            "epsilon": led["epsilon"], "delta": led.get("delta"), "status": led.get("status"),
            "node_noise_multiplier": led.get("node-noise-multiplier"), "releases": kinds,
        }
    return out


def run_one(dataset: str, eps: str, seed: int, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """One federated run in ``work/<dataset>/eps<e>-seed<s>``; its scores and ledgers.
    A failing run is recorded (``error``), not raised: the other runs still count."""
    from fedspatial.simulation import simulate

    name = f"eps{eps.replace('.', 'p')}-seed{seed}"
    folder = work / dataset
    shutil.rmtree(folder / name, ignore_errors=True)
    entry: dict[str, Any] = {"seed": seed}
    t0 = time.perf_counter()
    try:
        cfg = load_config(CONFIGS[dataset], {**overrides, "run-name": name, "results-dir": str(folder), "seed": seed})
        res = simulate(cfg, integration_report=False)["federated"]
        scores = pooled_scores(folder / name, cfg.data.label_key)
        sites = ledgers(folder / name)
        entry |= {
            "joint_ari": scores["joint_ari"], "reported_joint_ari": res["joint_ari"],
            "median_section_ari": statistics.median(scores["section_ari"].values()),
            "section_ari": scores["section_ari"], "sites": sites,
            "end_to_end_epsilon": max((s["epsilon"] for s in sites.values()), default=None) if eps != "inf" else None,
            "seconds_per_round": res["seconds_per_round"],
        }
        if eps != "inf":  # a site without a ledger would leave its releases out of the maximum
            entry["sites_without_ledger"] = [s for s in scores["sites"] if s not in sites]
    except Exception as err:  # recorded in the results and the exit status: the other runs still count
        logger.exception("%s epsilon %s seed %d failed", dataset, eps, seed)
        entry["error"] = error_line(err)
    entry["wall_s"] = time.perf_counter() - t0
    logger.info("%s epsilon %s seed %d: joint ARI %s, end-to-end epsilon %s, %.0f s", dataset, eps, seed,
                _fmt(entry.get("joint_ari")), _fmt(entry.get("end_to_end_epsilon")), entry["wall_s"])
    return entry


def error_line(err: BaseException) -> str:
    """The error's first line, and the last ``...Error:`` line inside it when that differs
    (a site's failure reaches the server wrapped in a SiteError naming it)."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()] or [""]
    cause = next((x for x in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", x)), None)
    text = f"{type(err).__name__}: {lines[0]}" + (f" ... {cause}" if cause and cause != lines[0] else "")
    return text[:400]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else None


# ----------------------------------------------------------------- result file
def empty_result() -> dict[str, Any]:
    return {
        "joint_ari": {d: dict.fromkeys(EPSILONS) for d in CONFIGS},
        "end_to_end_epsilon": {d: dict.fromkeys(EPSILONS) for d in CONFIGS},
        "dp_overhead": None, "dp_timing": None, "accountant": ACCOUNTANT, "runs": {d: {"epsilons": {}} for d in CONFIGS},
    }


def previous(path: Path) -> dict[str, Any]:
    """An existing privacy.json of this structure, else an empty result (the old one,
    keyed "none"/"eps8", is not merged into)."""
    result = empty_result()
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return result
    if not all(isinstance(old.get("joint_ari", {}).get(d), dict) for d in CONFIGS):
        logger.info("%s has another structure: not merged", path)
        return result
    for key in ("joint_ari", "end_to_end_epsilon", "runs"):
        for d in CONFIGS:
            result[key][d] |= old[key].get(d, {})
    result["dp_overhead"], result["dp_timing"] = old.get("dp_overhead"), old.get("dp_timing")
    result |= {k: old[k] for k in ("commit", "config", "machine", "date") if k in old}  # replaced by a run
    return result


def record(result: dict[str, Any], dataset: str, eps: str, per_seed: list[dict[str, Any]], extra: dict[str, Any],
           stamp: dict[str, Any]) -> None:
    """Put one (data set, epsilon) entry into ``result``: medians over the seeds for the
    ARI, the most over the seeds for the end-to-end epsilon."""
    result["joint_ari"][dataset][eps] = _median([e.get("joint_ari") for e in per_seed])
    spent = [e["end_to_end_epsilon"] for e in per_seed if e.get("end_to_end_epsilon") is not None]
    result["end_to_end_epsilon"][dataset][eps] = max(spent) if spent else None
    result["runs"][dataset]["epsilons"][eps] = {"overrides": extra, "seeds": per_seed, **stamp}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets on ``result``: value(s), threshold, met (``None``: not measured)."""
    out: dict[str, Any] = {}
    for eps, frac in ARI_TARGETS.items():
        ratios = {}
        for d in CONFIGS:
            a, base = result["joint_ari"][d].get(eps), result["joint_ari"][d].get("inf")
            ratios[d] = None if a is None or not base else a / base
        known = [r for r in ratios.values() if r is not None]
        met = all(r >= frac for r in known) if len(known) == len(ratios) else None
        out[f"joint_ari_eps{eps}"] = {"ratio_to_non_private": ratios, "threshold": frac, "met": met}
    gaps: dict[str, float] = {}
    for d in CONFIGS:
        for eps, entry in result["runs"][d].get("epsilons", {}).items():
            if eps == "inf":
                continue
            for e in entry["seeds"]:
                if e.get("end_to_end_epsilon") is not None and not e.get("sites_without_ledger"):
                    gaps[f"{d}/{eps}/seed{e['seed']}"] = e["end_to_end_epsilon"] / float(eps) - 1
    expected = sum(len(entry["seeds"]) for d in CONFIGS for k, entry in result["runs"][d].get("epsilons", {}).items() if k != "inf")
    out["end_to_end_epsilon"] = {
        "relative_gap": gaps, "threshold": EPSILON_TOLERANCE, "runs_without_epsilon": expected - len(gaps),
        "met": (all(abs(g) <= EPSILON_TOLERANCE for g in gaps.values()) and len(gaps) == expected) if gaps else None,
    }
    o = result.get("dp_overhead")
    out["dp_overhead"] = {"value": o, "threshold": MAX_OVERHEAD, "met": None if o is None else o <= MAX_OVERHEAD}
    return out


# ----------------------------------------------------------------- markdown
def _met(m: bool | None) -> str:
    return "not measured" if m is None else ("**met**" if m else "**missed**")


def _machine(m: dict[str, Any]) -> str:
    return (f"{m.get('system')}, {m.get('cpus')} CPU cores (shared), CPU only, Python {m.get('python')}, "
            f"torch {m.get('torch')}")


def markdown(result: dict[str, Any], total_s: float | None) -> str:
    cfg = {d: load_config(p) for d, p in CONFIGS.items()}
    c = result.get("config", {})
    lines = [
        "# Privacy benchmark: local DP end to end", "",
        "Federated mode only. Each epsilon row is a run with `privacy.local-dp: true` and `privacy.target-epsilon` "
        "set, with the config's other settings except the overrides the local-DP checks require (listed per data "
        "set); the `inf` row is the non-private run with the config's shipped defaults, as a user gets it without "
        "DP. joint ARI: all labelled cells of all sites pooled, exact, from the annotated sections (the run's own "
        "report holds noised label x domain tables under local DP), median over the seeds. End-to-end epsilon: the "
        "largest final epsilon of the sites' privacy ledgers (every release of the run), the most over the seeds; "
        "`null` for `inf`.",
        f"Accountant: {result['accountant']}.",
        f"Privacy settings are the shipped defaults (delta {cfg['demo'].privacy.delta:g}, clipping norm "
        f"{cfg['demo'].privacy.max_grad_norm:g}, feature clip {cfg['demo'].privacy.feature_clip:g}, "
        f"{cfg['demo'].privacy.kmeans_iterations} DP k-means iterations, encoder `{cfg['demo'].model.encoder}`), "
        "set without labels: this benchmark tunes nothing; labels are used only to score.",
        f"Machine: {_machine(result.get('machine') or {})}. Command: `{c.get('command')}` (last invocation; each entry records "
        f"its own commit and date below). Commit `{result.get('commit')}`, {result.get('date')}."
        + (f" Wall time of this invocation: {total_s / 60:.1f} min." if total_s is not None else ""),
        "",
    ]
    for d in CONFIGS:
        runs = result["runs"][d]
        lines += [f"## {TITLES[d]}", ""]
        if runs.get("skipped"):
            lines += [f"Not run: {runs['skipped']}. Its entries are `null`.", ""]
            continue
        if not runs.get("epsilons"):
            lines += ["Not run yet.", ""]
            continue
        k = cfg[d]
        lines.append(
            f"Config `configs/{d}.yaml`: {k.training.num_rounds} rounds x {k.training.local_epochs} local epochs, "
            f"{k.features.n_top_features} features, n-pcs {k.features.n_pcs}, {k.neighbors.n_neighbors} neighbours, "
            f"{k.clustering.n_domains} domains, mixture `{k.clustering.mixture}`, n-init {k.clustering.n_init}.")
        base = result["joint_ari"][d].get("inf")
        lines += ["", "| epsilon | joint ARI (median) | per seed | ratio to non-private | end-to-end epsilon (max over "
                  "sites, seeds) | wall s per run | overrides | commit, date |", "| --- |" + " --- |" * 7]
        for eps in sorted(runs["epsilons"], key=float):
            entry, a = runs["epsilons"][eps], result["joint_ari"][d].get(eps)
            seeds = ", ".join(f"{e['seed']}: " + ("failed" if "error" in e else _fmt(e.get("joint_ari"))) for e in entry["seeds"])
            ratio = _fmt(a / base) if a is not None and base else "-"
            wall = _fmt(_median([e.get("wall_s") for e in entry["seeds"]]), ".0f")
            over = ", ".join(f"`{key}: {v}`" for key, v in entry["overrides"].items() if key != "simulation.modes")
            lines.append(f"| {eps} | {_fmt(a)} | {seeds} | {ratio} | {_fmt(result['end_to_end_epsilon'][d].get(eps))} | "
                         f"{wall} | {over or '-'} | `{entry.get('commit', '?')[:12]}`, {entry.get('date', '?')} |")
        lines.append("")
        failures = [(eps, e) for eps, en in runs["epsilons"].items() for e in en["seeds"] if "error" in e]
        lines += [f"- failed: epsilon {eps}, seed {e['seed']}: {e['error']}" for eps, e in failures]
        lines += [f"- no privacy ledger: epsilon {eps}, seed {e['seed']}: {', '.join(e['sites_without_ledger'])}"
                  for eps, en in runs["epsilons"].items() for e in en["seeds"] if e.get("sites_without_ledger")]
        kinds = sorted({k for en in runs["epsilons"].values() for e in en["seeds"] for s in e.get("sites", {}).values()
                        for k in s.get("releases", {})})
        if kinds:
            lines.append(f"- releases charged to the ledgers: {', '.join(f'`{k}`' for k in kinds)}.")
        lines.append("")
    t = result.get("targets") or targets(result)
    lines += ["## Targets", ""]
    for eps, frac in ARI_TARGETS.items():
        x = t[f"joint_ari_eps{eps}"]
        vals = ", ".join(f"{d} {_fmt(r)}" for d, r in x["ratio_to_non_private"].items())
        lines.append(f"- joint ARI at epsilon {eps} >= {frac} x non-private, both data sets: {vals} ({_met(x['met'])})")
    g = t["end_to_end_epsilon"]
    worst = max(g["relative_gap"].items(), key=lambda kv: abs(kv[1]), default=None)
    lines.append(f"- every release covered, end-to-end epsilon = target within {EPSILON_TOLERANCE:.0%} (every DP run): "
                 + (f"largest gap {worst[1]:+.2%} ({worst[0]})" if worst else "-")
                 + (f", {g['runs_without_epsilon']} DP run(s) failed or without every site's ledger"
                    if g.get("runs_without_epsilon") else "") + f" ({_met(g['met'])})")
    timing = result.get("dp_timing") or {}
    by_engine = ", ".join(f"{k}: {_fmt(v, '.2f')}" for k, v in (timing.get("by_engine") or {}).items())
    lines += [f"- `dp_overhead` <= {MAX_OVERHEAD}: {_fmt(result.get('dp_overhead'), '.2f')} ({_met(t['dp_overhead']['met'])})"
              + (f"; by engine {by_engine}" if by_engine else "")
              + (f"; {_timing_setup(timing['setup'])}" if timing.get("setup") else ""), ""]
    return "\n".join(lines) + "\n"


def _timing_setup(setup: dict[str, Any]) -> str:
    """One sentence on what ``benchmarks/dp_timing.py`` timed (the JSON keeps every field)."""
    steps = setup.get("steps_timed") or {}
    return (f"timed on {setup.get('model', '?')} ({setup.get('n_features')} features, hidden {setup.get('hidden_dim')}, "
            f"latent {setup.get('latent_dim')}), batch {setup.get('batch_size')}, {setup.get('n_cells')} cells, "
            f"{setup.get('threads')} thread(s), each engine in its own process, median step time over "
            f"{setup.get('repeats')} interleaved repeats ({max(steps.values(), default=0)} steps per engine)")


# ----------------------------------------------------------------- main
def timing() -> dict[str, Any]:
    from dp_timing import dp_timing  # type: ignore[import-not-found]  # benchmarks/dp_timing.py

    return dict(dp_timing())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    split = lambda v: [x for x in v.split(",") if x]  # noqa: E731
    parser.add_argument("--datasets", default="demo,dlpfc", type=split)
    parser.add_argument("--epsilons", default=",".join(EPSILONS), type=lambda v: [eps_key(x) for x in split(v)])
    parser.add_argument("--seeds", default="0,1,2", type=lambda v: [int(x) for x in split(v)])
    parser.add_argument("--rounds", type=int, default=0, help="override training.num-rounds (0: the config's)")
    parser.add_argument("--data", default=os.environ.get("FEDSPATIAL_DLPFC", str(ROOT.parent / "shared" / "data" / "dlpfc")),
                        help="folder with 151673-151676.h5ad (or FEDSPATIAL_DLPFC)")
    parser.add_argument("--work", default=str(HERE / ".work" / "privacy"))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--skip-timing", action="store_true", help="keep dp_overhead of an existing privacy.json")
    parser.add_argument("--report-only", action="store_true", help="re-render privacy.md from privacy.json")
    args = parser.parse_args()
    # force: opacus calls logging.basicConfig on import, which would leave ours (INFO) out
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("flwr").propagate = False
    if unknown := set(args.datasets) - set(CONFIGS):
        parser.error(f"--datasets: unknown {sorted(unknown)}; choose from {list(CONFIGS)}")
    out, work = Path(args.out), Path(args.work)
    result = previous(out / "privacy.json")
    if args.report_only:
        result["targets"] = targets(result)
        write_text_atomic(out / "privacy.md", markdown(result, None))
        return 0
    t0 = time.perf_counter()
    command = " ".join(["python", "benchmarks/privacy.py", *sys.argv[1:]])
    stamp = {k: v for k, v in provenance({"command": command}).items() if k in ("commit", "date")}
    stamp["command"] = command
    if not args.skip_timing:
        try:
            measured = timing()
        except ImportError as err:
            logger.error("benchmarks/dp_timing.py not importable (%s): pass --skip-timing", err)
            return 2
        result["dp_overhead"], result["dp_timing"] = measured.get("dp_overhead"), measured
        logger.info("dp_overhead %s", _fmt(result["dp_overhead"], ".2f"))
    failed = 0
    for dataset in args.datasets:
        runs = result["runs"][dataset]
        runs.pop("skipped", None)
        extra_cfg: dict[str, Any] = {}
        if dataset == "dlpfc":
            data = Path(args.data)
            missing = [s for s in FOUR if not (data / f"{s}.h5ad").is_file()]
            if missing:
                runs["skipped"] = f"DLPFC data not found (missing {', '.join(missing)}.h5ad in {portable(str(data.resolve()))})"
                logger.warning("%s: pass --data or set FEDSPATIAL_DLPFC; DLPFC skipped", runs["skipped"])
                runs["epsilons"] = {}
                result["joint_ari"][dataset] = dict.fromkeys(EPSILONS)
                result["end_to_end_epsilon"][dataset] = dict.fromkeys(EPSILONS)
                continue
            extra_cfg["data.manifest"] = str(write_manifest(data, FOUR, work / dataset / "federation.json").resolve())
        for eps in args.epsilons:
            extra = settings(dataset, eps, args.rounds)
            per_seed = []
            for seed in args.seeds:
                folders = {"data.synthetic-dir": str(work / dataset / f"synthetic-seed{seed}")} if dataset == "demo" else {}
                logger.info("%s epsilon %s seed %d: %s", dataset, eps, seed, extra)
                per_seed.append(run_one(dataset, eps, seed, {**extra, **extra_cfg, **folders}, work))
            failed += sum("error" in e for e in per_seed)
            record(result, dataset, eps, per_seed, extra, stamp)
    result["accountant"] = ACCOUNTANT
    result["targets"] = targets(result)
    result |= provenance({"command": command, **vars(args)})
    result = portable(result)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "privacy.json", result)
    total = time.perf_counter() - t0
    write_text_atomic(out / "privacy.md", markdown(result, total))
    logger.info("privacy benchmark: %.1f min, %d failed run(s); wrote %s", total / 60, failed, out / "privacy.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
