"""Federated training rounds over Flower: the server side of the training phase.

The rounds run through Flower's strategies: the one ``training.strategy`` names
(:mod:`fedspatial.strategies.registry`; default :class:`SpatialFedAvg`, weighted by
``num-examples``), on all sites or a drawn ``training.fraction-train`` of them each round,
wrapped for client-level central DP when configured and guarded by the sites' privacy
budgets, or SecAgg+ through Flower's legacy workflow. The global state is checkpointed
after every round, so an interrupted run resumes from its last finished round.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from fedspatial.records import arrays_record
from fedspatial.server.messaging import SiteGroup
from fedspatial.server.run_store import RunStore
from fedspatial.shared.phases.base import Run, TrainOutcome, Weights
from fedspatial.shared.protocol.feature_space import feature_space_to_config
from fedspatial.shared.protocol.names import EVALUATE_RECEIVED
from fedspatial.strategies import PrivacyBudgetGuard, PrivacyBudgetStop, central_dp
from fedspatial.strategies.registry import build_strategy, sites_per_round
from fedspatial.strategies.secagg import run_secagg_rounds

logger = logging.getLogger(__name__)


BATCH_KEY = "batch_in.weight"
"""The batch-aware decoder's per-batch weights (``[hidden, n_batches]``, one column per batch)."""


def batch_owners(run: Run, names: dict[int, str], shape: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
    """Which columns of :data:`BATCH_KEY` each site (node id) owns: those of the batches
    (sections, or source sites with ``model.batch: site``) among its own sections."""
    owners = {}
    for node, name in names.items():
        site = run.sites.get(name)
        held = set() if site is None else set(site.section_sites if run.cfg.model.batch == "site" else site.sections)
        mask = np.zeros(shape, dtype=bool)
        mask[:, [j for j, batch in enumerate(run.batches) if batch in held]] = True
        owners[node] = {BATCH_KEY: mask}
    return owners


def train_rounds(
    sites: SiteGroup,
    run: Run,
    store: RunStore,
    initial: Weights,
    *,
    done_rounds: int,
    history: list[dict[str, Any]],
    common: dict[str, Any],
) -> TrainOutcome:
    """The training rounds left after ``done_rounds``; ``history`` holds the earlier ones."""
    t0 = time.perf_counter()
    cfg, privacy = run.cfg, run.cfg.privacy
    assert run.space is not None
    n_min = sites.min_nodes
    strategy = build_strategy(
        cfg.training,
        n_sites=len(sites.nodes),
        min_nodes=n_min,
        round_offset=done_rounds,
        # each batch's decoder weights are trained only by the site holding that batch
        partitioned_keys=[BATCH_KEY] if run.batches else [],
        partition_owners=lambda: batch_owners(run, sites.names, initial[BATCH_KEY].shape),
        sample_seed=cfg.seed,
        node_order=sites.name,  # the same sites drawn for the same seed, whatever their node ids
        min_evaluate_nodes=n_min,
        min_available_nodes=n_min,
        # No evaluate messages: each train message measures the model it brings first (the
        # previous round's evaluation, EVALUATE_RECEIVED), the embed message the final one.
        fraction_evaluate=0.0,
        # client-level DP bounds one site's influence on an equally weighted mean
        weighted_by_key="unit-weight" if privacy.central_dp != "none" else "num-examples",
    )
    strategy.history = history
    inner = strategy if privacy.central_dp == "none" else central_dp(
        strategy, privacy.central_dp, noise_multiplier=privacy.central_noise_multiplier,
        clipping_norm=privacy.central_clipping_norm,
        # the noise is calibrated to the sites averaged in a round: those drawn
        n_sites=sites_per_round(len(sites.nodes), cfg.training.fraction_train, n_min),
    )
    guard = PrivacyBudgetGuard(inner, on_exhausted=privacy.on_exhausted)
    # A loss over all of a site's cells is not privatized: not asked for under local DP.
    config = {**common, **run.message_config(), EVALUATE_RECEIVED: int(not privacy.local_dp)}
    arrays = arrays_record(initial)
    last_saved: dict[str, Any] = {"round": done_rounds, "arrays": arrays}
    checkpoint_state = {
        "feature-space": feature_space_to_config(run.space),
        "model": run.model_config,
        "site-names": {str(node): name for node, name in sites.names.items()},
    }

    def save_round(server_round: int, round_arrays: ArrayRecord) -> None:
        if server_round == 0:
            return None
        store.save_round(server_round + done_rounds, round_arrays, {"history": strategy.history, **checkpoint_state})
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
            train_config=config,
            n_sites=len(sites.nodes),
            # SecAgg+ weights by num-examples (cells), or equally under client-level DP
            max_weight=float(len(sites.nodes) if privacy.central_dp != "none" else sum(d.n_cells for d in run.sites.values())),
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
                train_config=ConfigRecord(config),
                evaluate_config=ConfigRecord(config),
                evaluate_fn=save_round,
                timeout=sites.message_timeout,  # Flower's default: an hour per round
            )
            arrays = result.arrays if len(result.arrays) else arrays
        except PrivacyBudgetStop as stop:
            arrays = last_saved["arrays"]
            stopped = {"after-round": last_saved["round"], "refusals": {sites.name(n): r for n, r in stop.refusals.items()}}
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
    weights = {k: v.numpy() for k, v in arrays.items()}
    return TrainOutcome(weights, strategy.history, time.perf_counter() - t0, stopped, guard.refusals)

