"""Training and inference loops of the Novae encoder (plain PyTorch, no Lightning Trainer).

A round is a fixed number of local steps, each on ``batch_size`` niche pairs of one
section (novae draws every batch from one slide, so that its per-slide prototype queue
is meaningful). The queue is the site's: it is returned to be kept in the site's state,
never sent. Every step is seeded, so a round is reproducible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fedspatial.shared.graph.niches import Niches
from fedspatial.shared.models.novae_encoder import NovaeEncoder
from fedspatial.shared.training.loop import TrainResult, adam

logger = logging.getLogger(__name__)


def novae_lr(lr: float, server_round: int, num_rounds: int, *, warmup_rounds: int = 2) -> float:
    """novae's learning-rate schedule with rounds for epochs: linear warm-up from 0.1 x
    ``lr`` over ``warmup_rounds``, then cosine annealing to 0.01 x ``lr`` at ``num_rounds``
    (``novae.utils.configure_optimizers``: ``LinearLR`` then ``CosineAnnealingLR``)."""
    r = max(server_round - 1, 0)  # rounds count from 1, epochs from 0
    if r < warmup_rounds:
        return lr * (0.1 + 0.9 * r / warmup_rounds)
    span = max(num_rounds - warmup_rounds, 1)
    low = 0.01 * lr
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * min(r - warmup_rounds, span) / span))


@dataclass
class SiteQueue:
    """novae's per-slide prototype queue of one site: ``[n_slides, queue, K]`` and its slides."""

    slides: list[str]
    values: np.ndarray | None = None


def init_queue(model: NovaeEncoder, queue: SiteQueue, min_prototypes_ratio: float = 0.3) -> None:
    """Give ``model`` the site's queue, as ``novae.Novae.init_slide_queue`` does: only for
    a site with two or more sections (one slide uses every prototype)."""
    if len(queue.slides) < 2:
        return
    head = model.swav_head
    head.set_min_prototypes(min_prototypes_ratio)
    head.init_queue(queue.slides)
    if queue.values is not None:
        head.queue.copy_(torch.from_numpy(queue.values))


def _section_batches(
    niches: Niches, sections: list[tuple[str, int, int]], steps: int, batch_size: int, rng: np.random.Generator
) -> list[tuple[str, np.ndarray]]:
    """``steps`` (section, centres) batches; sections drawn in proportion to their trainable cells."""
    valid = niches.has_view()
    pools = [(name, np.flatnonzero(valid[a:b]) + a) for name, a, b in sections]
    pools = [(name, pool) for name, pool in pools if len(pool)]
    if not pools:
        raise ValueError("no cell has a neighbour n-hops-view away: the sections' graphs have no edges")
    sizes = np.array([len(pool) for _, pool in pools], dtype=np.float64)
    picks = rng.choice(len(pools), size=steps, p=sizes / sizes.sum())
    out = []
    for i in picks:
        name, pool = pools[i]
        out.append((name, rng.choice(pool, size=batch_size, replace=len(pool) < batch_size)))
    return out


def train_novae(
    model: NovaeEncoder,
    niches: Niches,
    sections: list[tuple[str, int, int]],
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 5e-4,
    weight_decay: float = 0.0,
    seed: int = 0,
    train_prototypes: bool = True,
    queue: SiteQueue | None = None,
    description: str = "novae train",
    progress: bool = False,
) -> TrainResult:
    """``steps`` SwAV steps in place; ``num_examples`` is the niche pairs seen (``steps *
    batch_size``), what a round's average weights a site by.

    ``train_prototypes`` False freezes the prototypes (novae's first, warm-up epoch).
    ``queue``: the site's per-slide queue, read before and updated after the round.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    rng = np.random.default_rng(seed)
    if queue is not None:
        init_queue(model, queue)
    model.train()
    model.swav_head._prototypes.requires_grad_(train_prototypes)
    optimizer = adam((p for p in model.parameters() if p.requires_grad), lr=lr, weight_decay=weight_decay)
    total = 0.0
    slide_ids = queue is not None and len(queue.slides) >= 2
    with torch.random.fork_rng(devices=[]):  # novae's augmentation draws from torch's global generator
        torch.manual_seed(seed)
        for section, centres in tqdm(_section_batches(niches, sections, steps, batch_size, rng), desc=description,
                                     disable=not progress, leave=False):
            views = niches.draw_views(centres, rng)
            loss = model.swav_loss(niches.gather(centres), niches.gather(views), section if slide_ids else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
    model.swav_head.normalize_prototypes()
    if queue is not None and model.swav_head.queue is not None:
        queue.values = model.swav_head.queue.detach().cpu().numpy().copy()
    mean = total / steps
    if not math.isfinite(mean):
        raise FloatingPointError("novae training loss is not finite: lower training.lr or check the input features")
    return TrainResult(loss=mean, steps=steps, num_examples=steps * batch_size)


@torch.no_grad()
def embed_niches(model: NovaeEncoder, niches: Niches, *, batch_size: int = 512) -> np.ndarray:
    """Representations ``[N, output_size]`` of every cell's niche (no augmentation)."""
    model.eval()
    parts = [model.encode(niches.gather(chunk)) for chunk in np.array_split(np.arange(niches.n_cells),
                                                                              max(1, math.ceil(niches.n_cells / batch_size)))]
    if not parts:
        return np.zeros((0, model.latent_dim), dtype=np.float32)
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


@torch.no_grad()
def evaluate_novae(model: NovaeEncoder, niches: Niches, sections: list[tuple[str, int, int]], *,
                   batch_size: int = 256, steps: int = 4, seed: int = 0) -> float:
    """The SwAV loss on ``steps`` fixed batches of niche pairs, without augmentation and
    without touching the queue (a comparable number from round to round)."""
    model.eval()
    rng = np.random.default_rng(seed)
    losses = [
        float(model.swav_loss(niches.gather(c), niches.gather(niches.draw_views(c, rng)), None))
        for _, c in _section_batches(niches, sections, steps, batch_size, rng)
    ]
    return float(np.mean(losses))
