"""``fedspatial simulate``: one machine, N virtual hospitals, three comparable modes.

All modes run the same ServerApp and ClientApp through Flower's simulation runtime;
only the grouping of sites into SuperNodes differs:

- ``federated``: one SuperNode per site;
- ``local``: each site alone (one simulation per site, domain ids are site-local);
- ``centralized``: one SuperNode holding every site's sections (the pooled upper bound).

Where the simulations compute is not part of the experiment: by default each one starts
its own Ray on this machine; with ``ray_address`` (``fedspatial simulate --ray-address
HOST:PORT``, else Ray's ``RAY_ADDRESS`` variable) they attach to a running Ray cluster,
whose nodes host the sites' ClientApps (:mod:`fedspatial.ray_cluster`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedspatial.ray_cluster import (
    check_ray_cluster,
    check_reachable,
    federation_nodes,
    paths_to_share,
    ray_backend_config,
    ray_target,
    shared_marker,
)
from fedspatial.server import progress
from fedspatial.server.report import contingency_from_json, summarize_sites, write_comparison
from fedspatial.server.run_store import RunExistsError
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.manifest import read_manifest
from fedspatial.shared.evaluation.metrics import (
    ari_from_contingency,
    merge_contingency,
    nmi_from_contingency,
)
from fedspatial.shared.storage.atomic import write_json_atomic, write_text_atomic
from fedspatial.shared.storage.hints import did_you_mean

logger = logging.getLogger(__name__)

LOG_NAME = "log.txt"
"""``fedspatial simulate``'s log of a run, in the run folder (:mod:`fedspatial.console`)."""

# Warnings nobody running a simulation can act on, silenced where they are raised:
# (category, start of the message) for Python's warnings filters in this process ...
_NOISE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # Ray's advice about a future default for GPU visibility (we ask for no GPUs)
    (FutureWarning, "Tip: In future versions of Ray"),
    # torch_geometric scripts two classes at import (torch 2.10+ deprecates torch.jit)
    (DeprecationWarning, "`torch.jit.script` is deprecated"),
)
# ... and in Ray's workers, where the torch one comes once per actor: through
# PYTHONWARNINGS, read when each worker process starts (no ':' in a message part).
_ACTOR_WARNINGS = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


class _DropRunSimulationDeprecation(logging.Filter):
    """Flower's "DEPRECATED FEATURE: run_simulation" notice: the in-process simulation is
    what ``fedspatial simulate`` is, on purpose (one process, no SuperLink)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("DEPRECATED FEATURE" in str(record.msg) and "run_simulation" in record.getMessage())


@contextlib.contextmanager
def _quiet_runtime() -> Iterator[None]:
    """Silence :data:`_NOISE_WARNINGS` and Flower's ``run_simulation`` deprecation for one
    simulation, in this process and in the Ray workers it starts; restored afterwards."""
    flower = logging.getLogger("flwr")
    drop = _DropRunSimulationDeprecation()
    previous = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = f"{previous},{_ACTOR_WARNINGS}" if previous else _ACTOR_WARNINGS
    flower.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for category, text in _NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=re.escape(text), category=category)
            yield
    finally:
        flower.removeFilter(drop)
        if previous is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = previous


def refuse_existing_run(run_dir: Path, *, resume: bool) -> None:
    """Raise :class:`RunExistsError` when ``run_dir`` holds a run and this is no resume
    (a folder holding only a log of an earlier failed start is reused)."""
    if resume or not run_dir.exists():
        return
    if any(p.name != LOG_NAME for p in run_dir.iterdir()):
        raise RunExistsError(
            f"{run_dir} already exists: pick another run-name, delete it, or continue it with "
            f"`fedspatial simulate --resume {run_dir}`"
        )


def ensure_federation(cfg: ExperimentConfig) -> Path:
    """The manifest to use: the configured one, or the built-in synthetic federation
    (generated once into ``data.synthetic-dir``)."""
    if cfg.data.manifest:
        path = Path(cfg.data.manifest)
        if not path.is_file():
            raise FileNotFoundError(
                f"data.manifest: {path} does not exist{did_you_mean(path)}. Fix: point data.manifest at "
                "the federation's manifest, write one with `fedspatial manifest SITE_FOLDER ...`, or give "
                "the sites with `--data`"
            )
        return path.resolve()
    from fedspatial.shared.data.synthetic import write_synthetic_federation

    spec = synthetic_spec(seed=cfg.seed, scale=cfg.data.synthetic_scale)
    root = Path(cfg.data.synthetic_dir)
    manifest = root / "federation.json"
    if manifest.is_file():
        stored = json.loads(manifest.read_text()).get("spec", {})
        if stored == _spec_dict(spec):
            return manifest.resolve()
        raise FileExistsError(
            f"{root} holds a synthetic federation made with other settings: delete it or set "
            "data.synthetic-dir to another folder"
        )
    logger.info("generating the built-in synthetic federation in %s", root)
    return write_synthetic_federation(root, spec).resolve()


def synthetic_spec(*, seed: int = 0, scale: float = 1.0) -> Any:
    """The built-in federation's spec with section sizes multiplied by ``scale``."""
    from fedspatial.shared.data.synthetic import SyntheticSpec

    base = SyntheticSpec(seed=seed)
    low, high = (max(1, round(v * scale)) for v in base.spots_per_section)
    return dataclasses.replace(base, spots_per_section=(low, high))


def _spec_dict(spec: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def check_site_policies(manifest: dict[str, Any]) -> None:
    """Validate every site's ``policy`` entry before anything runs (as ``fedspatial client
    --policy`` does at start-up) and log what each site enforces."""
    from fedspatial.shared.privacy.policy import policy_from_entry

    sites = [s for node in manifest["nodes"] for s in node["sites"]]
    for site in sites:
        if site.get("policy") is not None:
            logger.info("site policy of %s: %s", site["name"], policy_from_entry(site["policy"]).summary())
    if not any(s.get("policy") is not None for s in sites):
        logger.info("no site policies in the manifest: the run config decides at every simulated site")


def node_groups(manifest: dict[str, Any], mode: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[(simulation name, nodes)]`` for a mode; each node is ``{"name", "sites"}``."""
    sites = [s for node in manifest["nodes"] for s in node["sites"]]
    if mode == "federated":
        return [("federated", [{"name": s["name"], "sites": [s]} for s in sites])]
    if mode == "centralized":
        return [("centralized", [{"name": "pooled", "sites": sites}])]
    if mode == "local":
        return [(f"local/{s['name']}", [{"name": s["name"], "sites": [s]}]) for s in sites]
    raise ValueError(f"unknown mode {mode!r}")


def run_one(
    cfg: ExperimentConfig,
    run_dir: Path,
    sim_name: str,
    nodes: list[dict[str, Any]],
    *,
    resume: bool,
    client_app: Any = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """One Flower simulation; returns the run report (metrics.json).

    ``client_app``: a :class:`flwr.clientapp.ClientApp` to run instead of fedspatial's
    (benchmarks and tests wrap it to make one site misbehave). ``ray_address``: a running
    Ray cluster to attach to (see :func:`ray_target`; :func:`simulate` checks it first),
    else a Ray started on this machine with ``simulation.num-cpus``."""
    from flwr.simulation import run_simulation

    from fedspatial.server.app import make_server_app

    if client_app is None:
        from fedspatial.client.app import app as client_app

    sim_dir = run_dir / sim_name
    manifest_path = sim_dir / "nodes.json"
    write_json_atomic(manifest_path, {"nodes": nodes})
    run_config = cfg.to_run_config()
    run_config.update(
        {
            # A run name has no '/': "local/hospital_a" is run "hospital_a" under "local".
            "results-dir": str(sim_dir.parent),
            "run-name": sim_dir.name,
            "manifest": str(manifest_path),
            # every simulated site must answer, unless the config's min-nodes allows fewer
            "min-nodes": min(cfg.training.min_nodes, len(nodes)) or len(nodes),
            "resume": resume,
            "simulated-mode": sim_name.split("/")[0],  # what the sites record in their h5ad
            "simulated-run": cfg.run_name,
            # all of them exist from the start: the run must not begin with the first min-nodes
            "simulated-nodes": len(nodes),
        }
    )
    backend_config = ray_backend_config(cfg, ray_target(ray_address))
    t0 = time.perf_counter()
    with _quiet_runtime():
        run_simulation(
            server_app=make_server_app(run_config),
            client_app=client_app,
            num_supernodes=len(nodes),
            backend_config=backend_config,  # type: ignore[arg-type]
        )
    metrics_path = sim_dir / "metrics.json"
    if not metrics_path.exists():
        raise RuntimeError(
            f"the {sim_name} simulation ended without results ({metrics_path} missing); "
            "the run's log shows the failing step"
        )
    report = json.loads(metrics_path.read_text())
    report["simulation-wall-seconds"] = time.perf_counter() - t0
    return report


def _joint_ari(report: dict[str, Any]) -> float:
    """A simulation's joint ARI from its report (NaN without labels)."""
    value = report.get("joint", {}).get("ari")
    try:
        return float(value) if value is not None and math.isfinite(float(value)) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _mode_result(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores of a mode from its simulations (several for local-only)."""
    site_reports = [
        {"sections": r["sections"], "contingency": {}} for r in reports
    ]
    summary = summarize_sites(site_reports)
    tables = [
        contingency_from_json(t) for r in reports for t in r.get("contingency_tables", [])
    ]
    merged = merge_contingency(tables) if tables else None
    rounds = [x for r in reports for x in r["rounds"]]
    seconds = [x["seconds"] for x in rounds if "seconds" in x]
    sent = [x.get("bytes-sent", 0) + x.get("bytes-received", 0) for x in rounds]
    return {
        "joint_ari": ari_from_contingency(merged) if merged else float("nan"),
        "joint_nmi": nmi_from_contingency(merged) if merged else float("nan"),
        "mean_section_ari": summary["mean_section_ari"],
        "median_section_ari": summary["median_section_ari"],
        "section_ari": {k: v.get("ari") for k, v in summary["sections"].items()},
        "wall_s": sum(r["simulation-wall-seconds"] for r in reports),
        "seconds_per_round": float(sum(seconds) / len(seconds)) if seconds else float("nan"),
        "bytes_per_round": float(sum(sent) / max(len({x["round"] for x in rounds}), 1)),
    }


def simulate(
    cfg: ExperimentConfig,
    *,
    modes: list[str] | None = None,
    resume: bool = False,
    integration_report: bool = True,
    federation: dict[str, Any] | None = None,
    client_app: Any = None,
    ray_address: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the configured modes; writes ``<results-dir>/<run-name>/summary.md`` and, unless
    ``integration_report`` is False, each joint mode's ``integration.md|json`` and plot.

    ``federation``: a manifest (``{"sites": [...]}``, absolute data paths) to run instead of
    ``data.manifest``; it is written to ``<run>/federation.json`` and recorded as the run's
    ``data.manifest`` (so ``--resume`` finds it). ``fedspatial simulate`` checks the data
    (:mod:`fedspatial.own_data`) before calling this. ``client_app``: see :func:`run_one`.

    ``ray_address``: run on this running Ray cluster (``HOST:PORT`` of its head, ``auto``;
    ``local``: this machine); None: ``$RAY_ADDRESS`` if set, else this machine. A cluster is
    checked before anything else (:class:`RayClusterError`): reachable at once, then, before
    the run folder is made, a node with ``simulation.cpus-per-client`` CPUs and every node
    importing fedspatial and seeing the sites' data and ``results-dir`` at the same paths."""
    target = check_reachable(ray_target(ray_address))
    logger.info("Ray: %s", target.describe())
    if target.address is not None:
        logger.info("simulation.num-cpus (%d) does not apply on a cluster: its nodes' CPUs do", cfg.simulation.num_cpus)
    modes = modes or cfg.simulation.modes
    run_dir = (Path(cfg.results_dir) / cfg.run_name).resolve()
    refuse_existing_run(run_dir, resume=resume)
    if cfg.model.init_from:  # a missing or unfit model stops the run before anything starts
        from fedspatial.shared.phases.training import resolved_encoder
        from fedspatial.shared.storage.pretrained import read_pretrained

        read_pretrained(cfg, encoder=resolved_encoder(cfg))
    manifest_path = ensure_federation(cfg) if federation is None else None
    if target.address is not None:
        nodes = read_manifest(manifest_path)["nodes"] if manifest_path is not None else federation_nodes(federation)
        with shared_marker(run_dir.parent) as marker:  # the nodes must see this very file
            check_ray_cluster(target, cpus_per_client=cfg.simulation.cpus_per_client,
                              paths=paths_to_share(nodes, marker))
    run_dir.mkdir(parents=True, exist_ok=True)
    if federation is not None:
        manifest_path = run_dir / "federation.json"
        write_json_atomic(manifest_path, federation)
        cfg = ExperimentConfig.from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "manifest": str(manifest_path)}})
    assert manifest_path is not None
    manifest = read_manifest(manifest_path)
    check_site_policies(manifest)
    import yaml

    # the modes this run runs are part of its record: --resume continues these, not the config's
    record = cfg.to_dict()
    record["simulation"] = {**record["simulation"], "modes": list(modes)}
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(record, sort_keys=False))
    results: dict[str, dict[str, Any]] = {}
    plan = [(mode, node_groups(manifest, mode)) for mode in modes]
    count = sum(len(groups) for _, groups in plan)
    n_sites = sum(len(node["sites"]) for node in manifest["nodes"])
    progress.run_started(list(modes), simulations=count, sites=n_sites, num_rounds=cfg.training.num_rounds)
    index = 0
    for mode_index, (mode, groups) in enumerate(plan, start=1):
        reports = []
        for part, (sim_name, nodes) in enumerate(groups, start=1):
            index += 1
            progress.simulation_started(
                sim_name, mode=mode, mode_index=mode_index, mode_count=len(plan), index=index, count=count,
                part=part, parts=len(groups), nodes=[n["name"] for n in nodes],
                sites=sum(len(n["sites"]) for n in nodes),
            )
            done = run_dir / sim_name / "metrics.json"
            reused = resume and done.exists()
            if reused:
                logger.info("%s: already finished, reusing %s", sim_name, done)
                report = json.loads(done.read_text())
                report.setdefault("simulation-wall-seconds", report.get("wall-seconds", float("nan")))
            else:
                report = run_one(cfg, run_dir, sim_name, nodes, resume=resume, client_app=client_app,
                                 ray_address=target.address or "local")
            progress.simulation_done(sim_name, seconds=float(report["simulation-wall-seconds"]),
                                     ari=_joint_ari(report), reused=reused)
            reports.append(report)
        results[mode] = _mode_result(reports)
        if mode != "local" and integration_report:  # local runs have no joint embedding to assess
            from fedspatial.server.integration_report import write_integration_report

            progress.phase_started("integration report")
            c = cfg.clustering
            write_integration_report(
                run_dir / mode, batch_key=c.harmony if c.harmony != "none" else "site",
                label_key=cfg.data.label_key, seed=cfg.seed, layout="pca",
            )
        progress.mode_done(mode, mode_index=mode_index, mode_count=len(plan), seconds=results[mode]["wall_s"],
                           ari=float(results[mode]["joint_ari"]))
    write_comparison(run_dir, results)
    return results
