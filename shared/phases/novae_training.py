"""The training phase with ``model.encoder: novae``: building the model at the server, and
a site's train / evaluate / embed answers (:mod:`fedspatial.shared.phases.training`
dispatches here).

The vocabulary is the federation's model inputs, the selected features in the order
every site standardizes them (one gene-embedding row per input). What travels is every
weight but novae's per-slide prototype queue, which stays in the site's state
(:data:`~fedspatial.shared.models.novae_encoder.LOCAL_STATE`); a round is a fixed number
of SwAV steps per site, and the replies are weighted by the niche pairs each site trained.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.graph.niches import Niches, build_niches
from fedspatial.shared.model_config import novae_embedding_size
from fedspatial.shared.models.novae_encoder import PRESETS, NovaeEncoder
from fedspatial.shared.protocol.names import NUM_EXAMPLES, RECEIVED_EVAL_LOSS
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.training.novae_loop import (
    SiteQueue,
    embed_niches,
    evaluate_novae,
    novae_lr,
    train_novae,
)

if TYPE_CHECKING:
    from fedspatial.shared.phases.base import Site
    from fedspatial.shared.phases.setup import SiteSetup

logger = logging.getLogger(__name__)

QUEUE_KEY = "fedspatial-novae-queue"
"""Site state holding novae's per-slide queue between rounds."""


def novae_model(cfg: ExperimentConfig, features: list[str], gene_embedding: np.ndarray | None = None) -> NovaeEncoder:
    """A fresh Novae encoder over ``features`` with the config's preset (seed first); its
    gene embeddings start from ``gene_embedding`` ``(features, E)`` when given."""
    n = cfg.novae
    arch = dict(PRESETS[n.novae_preset])
    if n.novae_prototypes:
        arch["num_prototypes"] = n.novae_prototypes
    arch["embedding_size"] = novae_embedding_size(cfg)
    model = NovaeEncoder(features, **arch, temperature=n.novae_temperature, panel_subset_size=n.novae_panel_subset)
    if gene_embedding is not None:
        weight = model.cell_embedder.embedding.weight
        if tuple(gene_embedding.shape) != tuple(weight.shape):
            raise ValueError(f"gene embedding start of shape {gene_embedding.shape}, the model's is {tuple(weight.shape)}")
        weight.data.copy_(torch.from_numpy(np.asarray(gene_embedding, dtype=np.float32)))
    return model


def site_niches(site: Site, setup: SiteSetup) -> tuple[Niches, list[tuple[str, int, int]]]:
    """The site's niches (from its model inputs, kNN graph and coordinates) and sections."""
    data = site.graph_data(setup)
    if data.coords is None:
        raise RuntimeError(f"{site.name}: the model inputs carry no coordinates for novae's niches")
    n = site.cfg.novae
    niches = build_niches(
        data.x, data.neighbors.numpy(), data.coords.numpy(), data.sections,
        n_hops_local=n.novae_hops_local, n_hops_view=n.novae_hops_view,
    )
    return niches, data.sections


def _queue(site: Site, sections: list[tuple[str, int, int]]) -> SiteQueue:
    stored = site.state.get(QUEUE_KEY)
    queue = SiteQueue([name for name, _, _ in sections])
    if stored is not None and "queue" in stored.arrays:
        queue.values = stored.array("queue")
    return queue


def train_answer(site: Site, model: NovaeEncoder, *, server_round: int, seed: int, evaluate_first: bool) -> Payload:
    """One round of SwAV steps at the site; the reply carries the shared weights."""
    setup = site.setup()
    niches, sections = site_niches(site, setup)
    received = _fixed_loss(site, model, niches, sections) if evaluate_first else None  # before training changes it
    n, t = site.cfg.novae, site.cfg.training
    queue = _queue(site, sections)
    start = time.perf_counter()
    steps = n.novae_local_steps or max(1, math.ceil(int(niches.has_view().sum()) / n.novae_batch_size))
    result = train_novae(
        model, niches, sections, steps=steps, batch_size=n.novae_batch_size,
        lr=novae_lr(n.novae_lr, server_round, t.num_rounds),
        weight_decay=t.weight_decay, seed=seed, train_prototypes=server_round > n.novae_warmup_rounds,
        queue=queue, description=f"{site.name} novae",
    )
    if queue.values is not None:
        site.state.put(QUEUE_KEY, Payload(arrays={"queue": queue.values}))
    metrics: dict[str, int | float] = {
        NUM_EXAMPLES: result.num_examples, "unit-weight": 1.0, "train-steps": result.steps,
        "train-loss": result.loss, "train-seconds": time.perf_counter() - start,
    }
    if received is not None:
        metrics[RECEIVED_EVAL_LOSS] = received
    arrays = {k: v.detach().cpu().numpy() for k, v in model.shared_state().items()}
    return Payload(arrays=arrays, metrics=metrics)


def _fixed_loss(site: Site, model: NovaeEncoder, niches: Niches, sections: list[tuple[str, int, int]]) -> float:
    """The SwAV loss on the same niche pairs every time (the run's seed, no augmentation)."""
    return evaluate_novae(model, niches, sections, seed=site.cfg.seed)


def eval_loss(site: Site, model: NovaeEncoder) -> float:
    """The SwAV loss of ``model`` on fixed niche pairs of the site (no augmentation)."""
    return _fixed_loss(site, model, *site_niches(site, site.setup()))


def embed_answer(site: Site, model: NovaeEncoder, *, evaluate: bool) -> tuple[np.ndarray, float | None]:
    """Every cell's niche representation ``[N, output_size]``, scaled to unit length (SwAV
    compares directions only, cosine to the prototypes: the length carries nothing the
    training shaped and would only weigh on k-means distances), and with ``evaluate`` the
    loss of :func:`eval_loss`, from one build of the niches."""
    niches, sections = site_niches(site, site.setup())
    loss = _fixed_loss(site, model, niches, sections) if evaluate else None
    z = embed_niches(model, niches)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12), loss
