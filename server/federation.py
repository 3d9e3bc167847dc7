"""One federated run, as the server drives it.

1. ``describe``: sites report sections, sizes and feature names (no cells).
2. ``feature_stats``: per-feature sums over the shared features -> one feature space
   (highly variable selection and standardization equal to the pooled computation).
   A section with a small panel does not shrink it: it is mapped onto the others'
   model inputs by a federated regression (``features.small-panel-fraction``).
3. Federated training of the encoder with :class:`SpatialFedAvg` (weighted by
   ``num-examples``); the global state is checkpointed after every round.
   (With ``features.n-pcs``, federated PCA first: the model trains on principal components.)
4. Federated k-means on embeddings kept at the sites (server sees cluster sums only),
   optionally refined by a federated Gaussian mixture (``clustering.mixture``).
5. ``finalize``: each site writes its annotated sections and plots at home and returns
   scores and label x domain counts; the server writes the run report.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedspatial.client.payload import (
    arrays_record,
    chain_arrays,
    feature_space_from_config,
    feature_space_to_config,
    record_arrays,
    split_chains,
)
from fedspatial.server.analysis_rounds import (
    federated_feature_stats,
    federated_mixture_rounds,
    federated_panel_rounds,
    federated_pca_rounds,
)
from fedspatial.server.harmony_rounds import federated_harmony_rounds
from fedspatial.server.messaging import SiteGroup, ask, wait_for_nodes
from fedspatial.server.report import write_run_report
from fedspatial.server.run_store import RunStore
from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.algorithms.panels import plan_panels
from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.features.selection import (
    build_feature_space,
)
from fedspatial.shared.models import GATAutoencoder
from fedspatial.shared.storage.checkpoint import save_checkpoint
from fedspatial.strategies import (
    PrivacyBudgetGuard,
    PrivacyBudgetStop,
    SpatialFedAvg,
    central_dp,
    central_dp_epsilon,
)
from fedspatial.strategies.secagg import run_secagg_rounds

logger = logging.getLogger(__name__)


def run_federation(grid: Grid, cfg: ExperimentConfig, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run every phase on the connected sites; returns the run report (also written)."""
    t0 = time.perf_counter()
    store = RunStore(Path(cfg.results_dir) / cfg.run_name, resume=cfg.resume)
    store.open(run_config)
    checkpoint = store.load_round()

    nodes = wait_for_nodes(grid, cfg.training.min_nodes or 1)
    # From here on a site that fails is dropped; the run stops once fewer than min-nodes
    # remain (0: every site that was there at the start; 1 when a site whose privacy
    # budget is spent may leave and the run continue without it).
    leave_ok = cfg.privacy.local_dp and cfg.privacy.on_exhausted == "continue"
    n_min = cfg.training.min_nodes or (1 if leave_ok else len(nodes))
    sites = SiteGroup(
        grid, nodes, min_nodes=n_min,
        hint=f"Finished rounds are checkpointed in {store.checkpoint_dir}: resubmit the run "
        "with run config resume=true to continue from the last one.",
    )
    # Sites read the run's settings from every message, not from their own run config:
    # the server's config is the one source of truth (and simulation carries no other).
    common = {"run-config": json.dumps(run_config)}
    desc = ask(sites, sites.nodes, "describe", config=common)
    names = {n: str(desc[n]["config"]["site"]) for n in desc}
    sites.names.update(names)
    logger.info("sites: %s", ", ".join(f"{names[n]} ({int(desc[n]['metrics']['num-examples'])} cells)" for n in desc))

    # -- harmonized feature space -------------------------------------------------------
    section_features: dict[str, list[str]] = {}
    node_of_section: dict[str, int] = {}
    for n in sites.nodes:
        for key, features in json.loads(str(desc[n]["config"]["section-features"])).items():
            section_features[key] = features
            node_of_section[key] = n
    plan = plan_panels(section_features, min_fraction=cfg.features.small_panel_fraction)
    if plan.mapped and cfg.privacy.local_dp:
        raise ConfigError(
            f"section(s) {', '.join(plan.mapped)} hold a small feature panel, and mapping it onto the "
            "others releases regression sums outside the privacy ledger: set features.small-panel-fraction: 0 "
            "(plain intersection) when privacy.local-dp is on"
        )
    reference_nodes = sorted({node_of_section[k] for k in plan.reference})
    if checkpoint is not None:
        space = feature_space_from_config(checkpoint[2]["feature-space"])
    else:
        stats = federated_feature_stats(
            sites, reference_nodes, names, common, features=plan.shared, target_sum=cfg.features.target_sum,
            sections=plan.reference if plan.mapped else None,
        )
        space = build_feature_space(
            stats,
            n_top_features=cfg.features.n_top_features,
            target_sum=cfg.features.target_sum,
            feature_key=cfg.data.feature_key or None,
        )
        logger.info("feature space: %d shared features, %d selected", len(space.shared), len(space.selected))

    # -- federated training -------------------------------------------------------------
    batches = batch_names(cfg.model.batch, [desc[n]["config"] for n in sites.nodes])
    space_config = feature_space_to_config(space)
    setup = {
        **common, **space_config, **({"batches": batches} if batches else {}), "mapped-sections": json.dumps(plan.mapped)
    }
    ask(sites, sites.nodes, "setup", config=setup, names=names)
    in_dim = len(space.selected)
    if cfg.features.n_pcs:
        # Deterministic (seeded start, sums in site-name order), so a resumed run
        # recomputes the same basis instead of storing it.
        federated_pca_rounds(
            sites, reference_nodes, names, common, n_features=in_dim, n_components=cfg.features.n_pcs, seed=cfg.seed
        )
        in_dim = cfg.features.n_pcs
    panels: dict[str, Any] = {}
    for panel_id, panel in plan.panels.items():  # deterministic too: recomputed on resume
        keys = [k for k, p in plan.mapped.items() if p == panel_id]
        panel_map = federated_panel_rounds(
            sites, reference_nodes, sorted({node_of_section[k] for k in keys}), names, common,
            panel_id=panel_id, panel=panel, reference_sections=plan.reference,
            target_sum=cfg.features.target_sum, feature_key=cfg.data.feature_key or None,
        )
        for key in keys:
            panels[key] = {
                "n-features": len(section_features[key]),
                "n-features-shared": len(panel),
                "r2-mean": float(panel_map.r2.mean()),
                "r2": [round(float(v), 4) for v in panel_map.r2],
            }
    torch.manual_seed(cfg.seed)
    model = GATAutoencoder(
        in_dim,
        cfg.model.hidden_dim,
        cfg.model.latent_dim,
        n_batches=len(batches),
        dropout=cfg.model.dropout,
    )
    base_config: dict[str, Any] = {
        **common,
        "model-config": json.dumps(model.model_config()),
        "seed": cfg.seed,
        "run-name": cfg.run_name,
    }
    done_rounds, arrays, history = 0, ArrayRecord(model.state_dict()), []
    if checkpoint is not None:
        done_rounds, arrays, state = checkpoint
        history = state["history"]
        logger.info("resuming after round %d of %d", done_rounds, cfg.training.num_rounds)
    privacy = cfg.privacy
    strategy = SpatialFedAvg(
        round_offset=done_rounds,
        # each batch's decoder weights are trained only by the site holding that batch
        partitioned_keys=["batch_in.weight"] if batches else [],
        min_train_nodes=n_min,
        min_evaluate_nodes=n_min,
        min_available_nodes=n_min,
        # a loss over all of a site's cells is not privatized: no client evaluation under local DP
        fraction_evaluate=0.0 if privacy.local_dp else 1.0,
        # client-level DP bounds one site's influence on an equally weighted mean
        weighted_by_key="unit-weight" if privacy.central_dp != "none" else "num-examples",
    )
    strategy.history = history
    inner = strategy if privacy.central_dp == "none" else central_dp(
        strategy, privacy.central_dp, noise_multiplier=privacy.central_noise_multiplier,
        clipping_norm=privacy.central_clipping_norm, n_sites=len(sites.nodes),
    )
    guard = PrivacyBudgetGuard(inner, on_exhausted=privacy.on_exhausted)
    last_saved: dict[str, Any] = {"round": done_rounds, "arrays": arrays}

    def save_round(server_round: int, round_arrays: ArrayRecord) -> None:
        if server_round == 0:
            return None
        state = {
            "history": strategy.history,
            "feature-space": space_config,
            "model": model.model_config(),
            "site-names": {str(k): v for k, v in names.items()},
        }
        store.save_round(server_round + done_rounds, round_arrays, state)
        last_saved.update({"round": server_round + done_rounds, "arrays": round_arrays})
        return None

    remaining = cfg.training.num_rounds - done_rounds
    stopped: dict[str, Any] | None = None
    if remaining > 0 and privacy.secagg:
        arrays = run_secagg_rounds(
            sites,
            arrays=arrays,
            num_rounds=remaining,
            round_offset=done_rounds,
            train_config=base_config,
            n_sites=len(sites.nodes),
            # SecAgg+ weights by num-examples (cells), or equally under client-level DP
            max_weight=float(len(sites.nodes) if privacy.central_dp != "none" else sum(int(desc[n]["metrics"]["num-examples"]) for n in sites.nodes)),
            on_round=save_round,
            history=strategy.history,
            central_noise_multiplier=privacy.central_noise_multiplier if privacy.central_dp != "none" else None,
            central_clipping_norm=privacy.central_clipping_norm,
        )
    elif remaining > 0:
        try:
            result = guard.start(
                grid=sites,
                initial_arrays=arrays,
                num_rounds=remaining,
                train_config=ConfigRecord(base_config),
                evaluate_config=ConfigRecord(base_config),
                evaluate_fn=save_round,
            )
            arrays = result.arrays if len(result.arrays) else arrays
        except PrivacyBudgetStop as stop:
            arrays = last_saved["arrays"]
            stopped = {"after-round": last_saved["round"], "refusals": {names.get(n, str(n)): r for n, r in stop.refusals.items()}}
            # The sites only refused to train: they stay for clustering and their outputs.
            for node in stop.refusals:
                sites.dropped.pop(sites.name(node), None)
                if node not in sites.nodes:
                    sites.nodes = sorted([*sites.nodes, node])
            logger.warning(
                "privacy budget spent at %s: training stops after round %d (privacy.on-exhausted=stop); "
                "the model of round %d (checkpoint in %s) goes on to clustering",
                ", ".join(stopped["refusals"]), last_saved["round"], last_saved["round"], store.checkpoint_dir,
            )
    train_seconds = time.perf_counter() - t0
    final_state = arrays.to_torch_state_dict()
    save_checkpoint(
        store.folder / "model",
        final_state,
        {"model": model.model_config(), "feature-space": space_config, "run-config": run_config},
    )

    # -- federated k-means ----------------------------------------------------------------
    k = cfg.clustering.n_domains
    proposals = ask(sites, sites.nodes, "embed", config={**base_config, "n-domains": k}, arrays=arrays, names=names)
    # Sorted by site name so that the initialization does not depend on reply order.
    props = {n: record_arrays(proposals[n]["arrays"]) for n in sorted(proposals, key=names.__getitem__)}
    harmony: dict[str, Any] = {}
    if cfg.clustering.harmony != "none":
        # Correct the embeddings at the sites, then cluster the corrected ones.
        c = cfg.clustering
        harmony = federated_harmony_rounds(
            sites, sites.nodes, names, common,
            batches=batch_names(c.harmony, [desc[n]["config"] for n in sites.nodes]), batch=c.harmony,
            seed=cfg.seed, n_clusters=c.harmony_clusters or None, n_domains=k,
            theta=c.harmony_theta, sigma=c.harmony_sigma, max_iter_harmony=c.harmony_max_iter,
        )
        props = harmony.pop("proposals")
    # Several clustering starts side by side in the same messages (as scikit-learn's
    # n_init). Start 0 is the k-means++ seeding with 10 tries; the others are single
    # k-means++ seedings. Without a mixture each start runs k-means and the lowest inertia
    # is kept; with one, only start 0 runs k-means, every start then runs EM (from its
    # k-means or seeding centroids) and the highest log-likelihood is kept.
    site_centroids = [p["centroids"] for p in props.values()]
    site_counts = [p["counts"] for p in props.values()]
    n_init, mixture = cfg.clustering.n_init, cfg.clustering.mixture
    inits = [
        clustering.init_from_site_centroids(site_centroids, site_counts, k, seed=cfg.seed + i, n_init=10 if i == 0 else 1)
        for i in range(n_init)
    ]
    moments = [
        clustering.FeatureMoments.from_arrays({m: p[f"moments-{m}"] for m in ("count", "mean", "m2")})
        for p in props.values()
    ]
    feature_variance = clustering.pooled_feature_variance_from_sites(moments)
    chains = [
        clustering.FederatedKMeans(max_iter=cfg.clustering.kmeans_max_iter, tol=cfg.clustering.kmeans_tol)
        for _ in (inits if mixture == "none" else inits[:1])
    ]
    for chain, init in zip(chains, inits, strict=False):
        chain.init(init, feature_variance=feature_variance)

    def kmeans_stats(payloads: dict[int, dict[str, np.ndarray]]) -> dict[int, clustering.ClusterStats]:
        replies = ask(sites, sites.nodes, "cluster_stats", config=common, arrays=arrays_record(chain_arrays(payloads)), names=names)
        per_site = [split_chains(record_arrays(r["arrays"])) for r in replies.values()]
        return {i: clustering.merge_cluster_stats([clustering.ClusterStats.from_arrays(site[i]) for site in per_site]) for i in payloads}

    while not all(chain.done for chain in chains):
        payloads: dict[int, dict[str, np.ndarray]] = {}
        for i, chain in enumerate(chains):
            if not chain.done:
                payloads[i] = {"centroids": chain.centroids}
                if chain.previous_centroids is not None:
                    payloads[i]["previous"] = chain.previous_centroids
        for i, merged in kmeans_stats(payloads).items():
            chains[i].step(merged)
    # Confidence uses the spread of the final assignment (one more stats round).
    finals = kmeans_stats({i: {"centroids": chain.centroids} for i, chain in enumerate(chains)})
    best = min(finals, key=lambda i: finals[i].inertia)
    kmeans, final_stats = chains[best], finals[best]
    if len(chains) > 1:
        logger.info(
            "federated k-means: start %d of %d kept (inertia %.6g; all: %s)",
            best + 1, len(chains), final_stats.inertia, ", ".join(f"{finals[i].inertia:.6g}" for i in finals),
        )
    variance = clustering.shared_variance(final_stats, kmeans.centroids.shape[1])
    domain_arrays: dict[str, np.ndarray] = {"centroids": kmeans.centroids}
    mixture_iterations = 0
    mixture_likelihoods: list[float] = []
    if mixture != "none":
        params, ems = federated_mixture_rounds(
            sites, sites.nodes, names, common, centroids=[kmeans.centroids, *inits[1:]],
            covariance_type=mixture, max_iter=cfg.clustering.mixture_max_iter,
        )
        domain_arrays = {"centroids": params.means, **params.to_arrays()}
        mixture_likelihoods = [float(em.lower_bound) for em in ems]
        mixture_iterations = max(em.n_iter for em in ems)

    # -- finalize at the sites and report ------------------------------------------------
    fin = ask(
        sites,
        sites.nodes,
        "finalize",
        config={
            **base_config, "variance": variance, "refine": cfg.clustering.refine, "run-name": cfg.run_name,
            "mixture": cfg.clustering.mixture,
        },
        arrays=arrays_record(domain_arrays),
        names=names,
    )
    site_reports = [json.loads(str(r["config"]["report"])) for r in fin.values()]
    return write_run_report(
        store.folder,
        history=strategy.history,
        site_names={str(k): v for k, v in names.items()},
        site_reports=site_reports,
        extra={
            "n-features-shared": len(space.shared),
            "n-features-selected": len(space.selected),
            "reference-sections": plan.reference,
            "mapped-panels": panels,
            "kmeans-iterations": kmeans.n_iter,
            "mixture": cfg.clustering.mixture,
            "mixture-iterations": mixture_iterations,
            "n-init": cfg.clustering.n_init,
            "kmeans-inertias": [float(finals[i].inertia) for i in finals],
            "mixture-log-likelihoods": mixture_likelihoods,
            "mixture-start-kept": int(np.argmax(mixture_likelihoods)) if mixture_likelihoods else None,
            "harmony": {key: v for key, v in harmony.items() if key != "objective"},
            "n-pcs": cfg.features.n_pcs,
            "kmeans-inertia": final_stats.inertia,
            "train-seconds": train_seconds,
            "wall-seconds": time.perf_counter() - t0,
            "domain-sizes": np.sum([record_arrays(r["arrays"])["domain-counts"] for r in fin.values()], axis=0).astype(int).tolist(),
            "model-parameters": int(sum(np.prod(v.shape) for v in final_state.values())),
            "dropped-sites": sites.dropped,
            "privacy": privacy_summary(cfg, strategy.history, {str(k): v for k, v in names.items()}, stopped, guard.refusals),
        },
    )


def privacy_summary(
    cfg: ExperimentConfig,
    history: list[dict[str, Any]],
    names: dict[str, str],
    stopped: dict[str, Any] | None,
    refusals: dict[int, dict[int, str]],
) -> dict[str, Any]:
    """What the run's report says about privacy: each site's epsilon after its last
    round (its own ledger has the details), central DP's client-level epsilon, SecAgg+."""
    p = cfg.privacy
    out: dict[str, Any] = {"local-dp": p.local_dp, "central-dp": p.central_dp, "secagg": p.secagg}
    if p.local_dp:
        spent: dict[str, Any] = {}
        for entry in history:
            for node, m in entry.get("sites", {}).items():
                if "dp-epsilon" in m:
                    spent[names.get(node, node)] = {"epsilon": m["dp-epsilon"], "delta": m.get("dp-delta"), "after-round": entry["round"]}
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


def batch_names(mode: str, descriptions: list[Any]) -> list[str]:
    """Federation-wide batch names for a batch-aware decoder ([] when disabled)."""
    if mode == "none":
        return []
    if mode == "site":
        return sorted({str(s) for d in descriptions for s in d["section-sites"]})
    return sorted({str(s) for d in descriptions for s in d["sections"]})
