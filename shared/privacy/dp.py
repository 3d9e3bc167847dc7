"""Node-level differential privacy for a site's training (Opacus DP-SGD) and its noisy aggregates.

No Flower imports: the ClientApp keeps a :class:`PrivacyLedger` in the node's state and
calls :func:`dp_train_epochs` for each round.

**Privacy unit: one cell** (its feature vector and its edges in the site's
degree-bounded neighbourhood graph). Training samples are ego neighbourhoods
``[1 + k, F]``; one cell is the centre of its own and, because every cell appears in
at most ``D`` neighbour lists (:func:`fedspatial.shared.graph.neighbors.bound_in_degree`), a
neighbour in at most ``D`` others. Removing a cell removes its own sample (its clipped
gradient moves the sum by at most ``C``) and changes at most ``D`` samples (``2C``
each), so the node-level L2 sensitivity of a step's gradient sum is ``S * C`` with
``S = 1 + 2D`` (Daigavane et al. 2021; Sajadmanesh et al. 2023, GAP).

Each step Poisson-samples ego neighbourhoods at rate ``q``; the optimizer clips each to
``C`` and adds Gaussian noise of std ``sigma_node * S * C``. The accounting of such a step
(which samples a removal can change, each drawn with probability ``q``) is in
:mod:`fedspatial.shared.privacy.accounting`; the ledger in :mod:`fedspatial.shared.privacy.ledger`.
Both are re-exported here for callers of the old paths.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import get_gsm_class
from opacus.optimizers import get_optimizer_class
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from fedspatial.shared.privacy.accounting import (
    ACCOUNTANT,
    Mechanism,
    NodeBound,
    PrivacyBudgetExceeded,
    calibrate_noise,
    epsilon_of,
    rdp_epsilon_of,
)
from fedspatial.shared.privacy.ledger import (
    LEDGER_FILE,
    PRIVACY_BUDGET_ERROR,
    PRIVACY_UNIT,
    PrivacyLedger,
    Release,
    guarantee,
)
from fedspatial.shared.training.loop import GraphData, TrainResult

__all__ = [  # the old import paths keep working
    "ACCOUNTANT", "LEDGER_FILE", "PRIVACY_BUDGET_ERROR", "PRIVACY_UNIT", "DPPlan", "Mechanism", "NodeBound",
    "PrivacyBudgetExceeded", "PrivacyLedger", "Release", "calibrate_noise", "dp_train_epochs", "epsilon_of",
    "feature_stats_bounds", "guarantee", "noisy_feature_stats", "plan_round", "rdp_epsilon_of", "validate_model",
]

# ----------------------------------------------------------------------------- DP-SGD
def validate_model(model: nn.Module) -> None:
    """Raise with Opacus's list of problems when ``model`` cannot be trained with DP-SGD."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError("model is not compatible with Opacus DP-SGD: " + "; ".join(str(e) for e in errors))


@dataclass(frozen=True)
class DPPlan:
    """Per-round DP-SGD settings of a site.

    Attributes
    ----------
    sample_rate
        Poisson rate of a training sample per step (``batch_size / n_cells``).
    steps
        Steps per round (``local_epochs / sample_rate``, as Opacus's DPDataLoader).
    node_noise_multiplier
        ``sigma_node``: noise std / node-level sensitivity.
    """

    sample_rate: float
    steps: int
    node_noise_multiplier: float
    max_grad_norm: float
    bound: NodeBound

    @property
    def noise_multiplier(self) -> float:
        """Noise std over the per-sample clipping norm, as the optimizer applies it."""
        return self.node_noise_multiplier * self.bound.sensitivity

    @property
    def node_sample_rate(self) -> float:
        return self.bound.sample_rate(self.sample_rate)


def plan_round(
    n_cells: int, *, batch_size: int, epochs: int, max_grad_norm: float, bound: NodeBound, node_noise_multiplier: float
) -> DPPlan:
    if n_cells < 1:
        raise ValueError("a site without cells cannot train")
    q = min(1.0, batch_size / n_cells)
    steps = epochs * int(1 / q)
    return DPPlan(q, steps, node_noise_multiplier, max_grad_norm, bound)


class _PerSampleLoss:
    """Criterion for Opacus ghost clipping: the model already returns per-sample losses."""

    reduction = "mean"

    def __call__(self, per_sample: Tensor) -> Tensor:
        return per_sample if self.reduction == "none" else per_sample.mean()


def dp_train_epochs(
    model: nn.Module,
    data: GraphData,
    plan: DPPlan,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    grad_sample_mode: str = "ghost",
    seed: int | None = None,
    on_step: Any = None,
) -> TrainResult:
    """One round of DP-SGD (Adam on privatized gradients) on ``data``, in place.

    Poisson sampling (Opacus's ``UniformWithReplacementSampler``), per-sample clipping to
    ``plan.max_grad_norm`` and Gaussian noise of std ``plan.noise_multiplier *
    max_grad_norm`` (Opacus's ``DPOptimizer``). Sampling and noise draw from a secret
    seed unless ``seed`` is given (tests). The caller accounts the round
    (``plan.steps`` steps) in its :class:`PrivacyLedger`.
    """
    validate_model(model)
    secret = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
    sampling = torch.Generator().manual_seed(secret)
    noise = torch.Generator().manual_seed(secret ^ 0x5EED)
    options: dict[str, Any] = {"batch_first": True, "loss_reduction": "mean"}
    if grad_sample_mode == "functorch":
        options["force_functorch"] = True
    if grad_sample_mode == "ghost":
        options["max_grad_norm"] = plan.max_grad_norm
    gsm = get_gsm_class(grad_sample_mode)(model, **options)
    optimizer = get_optimizer_class("flat", False, grad_sample_mode)(
        torch.optim.Adam(gsm.parameters(), lr=lr, weight_decay=weight_decay),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=max(1, int(data.n_cells * plan.sample_rate)),
        loss_reduction="mean",
        generator=noise,
    )
    criterion = None
    if grad_sample_mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        criterion = DPLossFastGradientClipping(gsm, optimizer, _PerSampleLoss(), "mean")
    sampler = UniformWithReplacementSampler(
        num_samples=data.n_cells, sample_rate=plan.sample_rate, generator=sampling, steps=plan.steps
    )
    gsm.train()
    total, seen, steps = 0.0, 0, 0
    with warnings.catch_warnings():
        # Opacus's hooks fire on module outputs because the inputs need no gradient: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for indices in sampler:
            total, seen, steps = _dp_step(model, data, indices, optimizer, criterion, (total, seen, steps))
            if on_step is not None:
                on_step(optimizer)
    gsm.to_standard_module()
    mean_loss = total / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise FloatingPointError("DP training loss is not finite: lower `lr` or `privacy.max-grad-norm`")
    return TrainResult(loss=mean_loss, steps=steps, num_examples=data.n_cells)


def _dp_step(
    model: nn.Module, data: GraphData, indices: list[int], optimizer: Any, criterion: Any, acc: tuple[float, int, int]
) -> tuple[float, int, int]:
    total, seen, steps = acc
    index = torch.as_tensor(indices, dtype=torch.int64)
    x, mask = data.ego(index)
    batch = data.batch[index] if data.batch is not None else None
    optimizer.zero_grad(set_to_none=True)
    per_sample = model.loss(x, mask, batch)  # type: ignore[operator]
    if criterion is not None:
        criterion(per_sample).backward()
    else:  # an empty Poisson batch still takes a (pure noise) step
        (per_sample.mean() if len(index) else per_sample.sum()).backward()
    optimizer.step()
    return total + float(per_sample.detach().sum()), seen + len(index), steps + 1


# ------------------------------------------------------------------ feature aggregates
def feature_stats_bounds(n_features: int, target_sum: float) -> dict[str, float]:
    """Largest L2 norm one cell can add to each harmonization aggregate.

    A cell's normalized values ``x`` are >= 0 and sum to ``T = target_sum``, so
    ``||x|| <= T``, ``||x^2|| <= T^2``; ``sum_i log1p(x_i) <= F log1p(T / F)`` (concavity)
    and ``log1p(x_i) <= log1p(T)`` bound the log blocks; detection flags are 0/1.
    """
    t, f = float(target_sum), float(max(n_features, 1))
    log_total = f * math.log1p(t / f)
    return {
        "n_cells": 1.0,
        "sum_norm": t,
        "sumsq_norm": t**2,
        "sum_log": math.sqrt(math.log1p(t) * log_total),
        "sumsq_log": math.sqrt(math.log1p(t) ** 3 * log_total),
        "n_detected": math.sqrt(f),
    }


def noisy_feature_stats(
    n_cells: int, arrays: dict[str, np.ndarray], *, target_sum: float, noise_multiplier: float, seed: int | None = None
) -> tuple[int, dict[str, np.ndarray], float]:
    """Gaussian mechanism on the harmonization aggregates (node-level: one cell).

    Each of the six blocks (cell count and five per-feature sums) gets noise of std
    ``noise_multiplier x`` its per-cell L2 bound (:func:`feature_stats_bounds`); six
    such releases compose exactly (PLD and RDP alike) as one Gaussian mechanism with noise multiplier
    ``noise_multiplier / sqrt(6)``, which is returned for the ledger. The noisy values
    are then made consistent (non-negative, ``sumsq >= sum^2 / n``): post-processing.
    """
    if noise_multiplier <= 0:
        raise ValueError("noise_multiplier must be > 0")
    n_features = len(next(iter(arrays.values())))
    bounds = feature_stats_bounds(n_features, target_sum)
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    n = max(1, round(n_cells + rng.normal(0.0, noise_multiplier * bounds["n_cells"])))
    out = {
        k: np.maximum(np.asarray(v, dtype=np.float64) + rng.normal(0.0, noise_multiplier * bounds[k], size=np.shape(v)), 0.0)
        for k, v in arrays.items()
    }
    out["n_detected"] = np.minimum(out["n_detected"], n)
    for s, sq in (("sum_norm", "sumsq_norm"), ("sum_log", "sumsq_log")):
        out[sq] = np.maximum(out[sq], out[s] ** 2 / n)
    return n, out, noise_multiplier / math.sqrt(len(bounds))
