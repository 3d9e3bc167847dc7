"""Phase ``training``: federated training of the spatial encoder.

Server half: build the model (or load ``model.init-from``, or take it from the checkpoint
of an interrupted run),
run the training rounds through the federation's strategy (FedAvg weighted by cells;
central DP and SecAgg+ wrappers when configured; checkpoint after every round), and
save the final global model. Site half: Flower's ``train`` message (local epochs from
the global weights; DP-SGD charged to the site's ledger under ``privacy.local-dp``; with
``model.fine-tune: last`` only the encoder's last layer trains) and
``evaluate`` (reconstruction loss on the site's cells). The server asks for that loss within
``train`` instead (:data:`~fedspatial.shared.protocol.names.EVALUATE_RECEIVED`): the loss of
the model a round starts from is the previous round's evaluation, so a round is one message,
not two; ``embed`` reports the final model's.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch

import fedspatial.shared.phases.novae_training as novae_training
from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.models import CellAutoencoder, GATAutoencoder, build_model
from fedspatial.shared.models.novae_encoder import NovaeEncoder
from fedspatial.shared.phases.base import Federation, Phase, Run, Site, Weights
from fedspatial.shared.phases.setup import SiteSetup
from fedspatial.shared.privacy.budget import budget_plan
from fedspatial.shared.privacy.dp import (
    NodeBound,
    Release,
    calibrate_noise,
    dp_train_epochs,
    plan_round,
)
from fedspatial.shared.protocol.feature_space import feature_space_to_config
from fedspatial.shared.protocol.names import (
    EVALUATE_RECEIVED,
    NUM_EXAMPLES,
    RECEIVED_EVAL_LOSS,
    Query,
)
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.storage.checkpoint import save_checkpoint
from fedspatial.shared.storage.pretrained import read_pretrained
from fedspatial.shared.training.loop import (
    GraphData,
    TrainResult,
    evaluate_loss,
    per_cell_data,
    train_epochs,
)

logger = logging.getLogger(__name__)


def to_weights(model: torch.nn.Module) -> Weights:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def resolved_encoder(cfg: ExperimentConfig) -> str:
    """``model.encoder`` with ``auto`` resolved: the per-cell encoder under local DP (DP-SGD
    then needs no group factor), the graph-attention encoder otherwise."""
    kind = cfg.model.encoder
    return ("cell" if cfg.privacy.local_dp else "gat") if kind == "auto" else kind


def new_model(cfg: ExperimentConfig, in_dim: int, n_batches: int) -> CellAutoencoder | GATAutoencoder:
    """The run's encoder, freshly initialized (seed it first)."""
    m = cfg.model
    if resolved_encoder(cfg) == "cell":
        return CellAutoencoder(in_dim, m.hidden_dim, m.latent_dim, n_batches=n_batches, dropout=m.dropout)
    return GATAutoencoder(in_dim, m.hidden_dim, m.latent_dim, n_batches=n_batches, dropout=m.dropout)


def training_data(site: Site, setup: SiteSetup) -> GraphData:
    """What the site trains on: each cell alone for the per-cell encoder, its niche otherwise."""
    data = site.graph_data(setup)
    if resolved_encoder(site.cfg) != "cell":
        return data
    return per_cell_data(data)


def pretrained_start(cfg: ExperimentConfig, run: Run) -> tuple[Weights, dict[str, Any]]:
    """The weights and model arguments of ``model.init-from``, checked against the run's
    inputs (the feature phase took its feature space) and batches."""
    pre = read_pretrained(cfg, encoder=resolved_encoder(cfg))
    config = pre.model_config
    if int(config["in_dim"]) != run.in_dim:
        raise ConfigError(f"model.init-from: {pre.path} reads {config['in_dim']} features, this run's inputs have {run.in_dim}")
    if int(config.get("n_batches", 0)) not in (0, len(run.batches)):
        raise ConfigError(
            f"model.init-from: {pre.path} decodes {config['n_batches']} batches, this run has {len(run.batches)}: "
            "set model.batch to match, or start from a model trained with model.batch: none"
        )
    logger.info(
        "starting from %s (%s, hidden %s, latent %s); fine-tuning %s",
        pre.path, config["kind"], config["hidden_dim"], config["latent_dim"], cfg.model.fine_tune,
    )
    run.report.update({"init-from": str(pre.path), "fine-tune": cfg.model.fine_tune})
    return dict(pre.weights), config


FINE_TUNED_LAYER = "to_latent"
"""The layer ``model.fine-tune: last`` trains: the encoder's last (both encoders have it)."""


def freeze_for_fine_tuning(model: torch.nn.Module, part: str) -> None:
    """``part`` "last": every parameter but :data:`FINE_TUNED_LAYER`'s stops taking
    gradients (the optimizers and DP-SGD's clipping then skip them); "all": nothing."""
    if part == "all":
        return
    if not any(name.startswith(FINE_TUNED_LAYER + ".") for name, _ in model.named_parameters()):
        raise ValueError(f"{type(model).__name__} has no {FINE_TUNED_LAYER!r} layer to fine-tune")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(FINE_TUNED_LAYER + "."))


def model_from(request: Payload) -> torch.nn.Module:
    """The model a ``train``/``evaluate``/``embed`` message carries (config + weights)."""
    model = build_model(json.loads(request.string("model-config")))
    model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in request.arrays.items()})
    return model


class Training(Phase):
    name = "training"
    queries = (Query.TRAIN, Query.EVALUATE)

    def run(self, fed: Federation, run: Run) -> None:
        cfg = run.cfg
        torch.manual_seed(cfg.seed)
        if cfg.model.init_from:
            initial, run.model_config = pretrained_start(cfg, run)
        else:
            assert run.space is not None
            model = (novae_training.novae_model(cfg, run.space.selected, run.gene_embedding) if resolved_encoder(cfg) == "novae"
                     else new_model(cfg, run.in_dim, len(run.batches)))
            run.model_config = model.model_config()
            initial = to_weights(model)
        done: int = 0
        history: list[Any] = []
        if run.checkpoint is not None:
            initial, done, history = run.checkpoint.weights, run.checkpoint.round, run.checkpoint.state["history"]
            logger.info("resuming after round %d of %d", done, cfg.training.num_rounds)
        outcome = fed.train(run, initial, done_rounds=done, history=history)
        run.training = outcome
        assert run.space is not None
        save_checkpoint(
            run.folder / "model",
            {k: torch.from_numpy(np.array(v, copy=True)) for k, v in outcome.weights.items()},
            {"model": run.model_config, "feature-space": feature_space_to_config(run.space), "run-config": run.run_config},
        )
        if run.model_config.get("kind") == NovaeEncoder.kind:  # the same folder opens with novae.Novae.from_pretrained
            from fedspatial.shared.storage.novae_folder import write_novae_config

            write_novae_config(run.folder / "model", run.model_config)
        run.report["train-seconds"] = time.perf_counter() - run.started  # setup included
        run.report["model-parameters"] = int(sum(np.prod(v.shape) for v in outcome.weights.values()))

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        model = model_from(request)
        if isinstance(model, NovaeEncoder):
            return self._answer_novae(site, query, request, model)
        setup = site.setup()
        if query == Query.EVALUATE:
            if site.cfg.privacy.local_dp:  # the site's own check, whatever the server asks
                raise PermissionError(f"{site.name}: under privacy.local-dp the site does not release an un-noised evaluation loss")
            loss = evaluate_loss(model, training_data(site, setup))
            return Payload(metrics={NUM_EXAMPLES: site.n_cells, "unit-weight": 1.0, "eval-loss": loss})
        start = time.perf_counter()
        received_loss = None
        if request.number(EVALUATE_RECEIVED, 0) and not site.cfg.privacy.local_dp:  # an unprivatized statistic
            received_loss = evaluate_loss(model, training_data(site, setup))  # before training changes the model
        freeze_for_fine_tuning(model, site.cfg.model.fine_tune)
        server_round = int(request.number("server-round", 0))
        seed = site.round_seed(int(request.number("seed", 0)), server_round)
        if site.cfg.privacy.local_dp:
            result = dp_train(site, model, setup, server_round=server_round)
        else:
            t = site.cfg.training
            # Flower's FedProx sends its mu in the train config; other strategies: the run config's
            mu = request.number("proximal-mu", t.proximal_mu)
            result = train_epochs(
                model, training_data(site, setup), epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
                weight_decay=t.weight_decay, proximal_mu=mu, seed=seed, description=f"{site.name} train",
            )
        metrics: dict[str, int | float] = {
            NUM_EXAMPLES: result.num_examples,
            "unit-weight": 1.0,  # uniform weights for central DP (sensitivity C / n_sites)
            "train-steps": result.steps,
        }
        if site.cfg.privacy.local_dp:
            # The DP-SGD loss and the round's time are statistics of the cells outside the ledger:
            # report the privacy spent instead (the steps follow from public counts).
            ledger = site.ledger()
            metrics.update({"dp-epsilon": ledger.epsilon, "dp-delta": ledger.delta, "dp-budget": ledger.budget_epsilon})
        else:
            metrics.update({"train-loss": result.loss, "train-seconds": time.perf_counter() - start})
        if received_loss is not None:
            metrics[RECEIVED_EVAL_LOSS] = received_loss
        return Payload(arrays=to_weights(model), metrics=metrics)

    def _answer_novae(self, site: Site, query: str, request: Payload, model: NovaeEncoder) -> Payload:
        if site.cfg.privacy.local_dp:  # the site's own check: config validation refuses this combination too
            raise PermissionError(f"{site.name}: model.encoder 'novae' has no DP training; the site runs privacy.local-dp")
        if query == Query.EVALUATE:
            loss = novae_training.eval_loss(site, model)
            return Payload(metrics={NUM_EXAMPLES: site.n_cells, "unit-weight": 1.0, "eval-loss": loss})
        server_round = int(request.number("server-round", 0))
        return novae_training.train_answer(
            site, model, server_round=server_round, seed=site.round_seed(int(request.number("seed", 0)), server_round),
            evaluate_first=bool(request.number(EVALUATE_RECEIVED, 0)),
        )


def dp_train(site: Site, model: torch.nn.Module, setup: SiteSetup, *, server_round: int) -> TrainResult:
    """One round of node-level DP-SGD, checked against and charged to the site's ledger
    (refused with :class:`~fedspatial.shared.privacy.dp.PrivacyBudgetExceeded` past the budget)."""
    p, t = site.cfg.privacy, site.cfg.training
    cell = resolved_encoder(site.cfg) == "cell"
    data = training_data(site, setup) if cell else site.dp_graph_data(setup)
    ledger = site.ledger()
    bound = NodeBound(0 if cell else ledger.degree_bound)  # a cell's own sample only, or its niche's reach
    plan_args: dict[str, Any] = {"batch_size": t.batch_size, "epochs": t.local_epochs, "max_grad_norm": p.max_grad_norm, "bound": bound}
    plan = plan_round(data.n_cells, **plan_args, node_noise_multiplier=ledger.node_noise_multiplier or p.noise_multiplier)
    if plan.node_noise_multiplier <= 0:  # calibrate once, for the whole run
        sigma = calibrate_noise(
            target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=plan.sample_rate,
            degree_bound=bound.degree_bound, steps=plan.steps * t.num_rounds, prior=ledger.history,
            after=budget_plan(p).after_training(),  # the clustering and tables this run releases later
        )
        plan = plan_round(data.n_cells, **plan_args, node_noise_multiplier=sigma)
        logger.info("%s: node-level noise multiplier %.3f for epsilon %g over %d rounds", site.name, sigma, p.target_epsilon, t.num_rounds)
    ledger.node_noise_multiplier = plan.node_noise_multiplier
    try:
        ledger.check("dp-sgd", server_round, plan.node_noise_multiplier, plan.node_sample_rate, plan.steps,
                     degree_bound=bound.degree_bound, ego_sample_rate=plan.sample_rate,
                     reserve=budget_plan(p).after_training())
    finally:
        site.save_ledger(ledger)
    result = dp_train_epochs(model, data, plan, lr=t.lr, weight_decay=t.weight_decay, grad_sample_mode=p.grad_sample_mode)
    ledger.record(
        Release(
            "dp-sgd", server_round, plan.node_noise_multiplier, plan.node_sample_rate, plan.steps,
            details={"sample-rate": plan.sample_rate, "noise-multiplier": plan.noise_multiplier, "max-grad-norm": p.max_grad_norm},
            degree_bound=bound.degree_bound, ego_sample_rate=plan.sample_rate,
        )
    )
    site.save_ledger(ledger)
    logger.info("%s: round %d DP-SGD, epsilon %.3f of %g", site.name, server_round, ledger.epsilon, ledger.budget_epsilon)
    return result
