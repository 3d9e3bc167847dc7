"""Node-level differential privacy for a site's training (Opacus), and its ledger.

No Flower imports: the ClientApp keeps a :class:`PrivacyLedger` in the node's state and
calls :func:`dp_train_epochs` for each round.

**Privacy unit: one cell** (its feature vector and its edges in the site's
degree-bounded neighbourhood graph). Training samples are ego neighbourhoods
``[1 + k, F]``; one cell is the centre of its own and, because every cell appears in
at most ``D`` neighbour lists (:func:`fedspatial.shared.graph.neighbors.bound_in_degree`), a
neighbour in at most ``D`` others. Removing a cell removes its own sample (its clipped
gradient moves the sum by at most ``C``) and changes at most ``D`` samples (``2C``
each), so the node-level L2 sensitivity of a step's gradient sum is
``S * C`` with ``S = 1 + 2D`` (Daigavane et al. 2021; Sajadmanesh et al. 2023, GAP).

Each step Poisson-samples ego neighbourhoods at rate ``q``; the optimizer clips each to
``C`` and adds Gaussian noise of std ``sigma_node * S * C``. A cell influences the step
only when one of its ``D + 1`` samples is drawn, which happens with probability
``q_node = 1 - (1 - q)^(D + 1)``. We account each step as the sampled Gaussian mechanism
with rate ``q_node`` and noise multiplier ``sigma_node`` and let Opacus's RDP
accountant compose every step of every round. (The changed neighbour samples keep their
own sampling coins in both datasets; counting their change as part of one add/remove event
of size ``S * C`` is the conservative reading, checked numerically against the shared-coin
substitution pair, not proven here.) This group reduction is looser than the
node-level amplification bound derived by Daigavane et al. (which needs a custom
accountant) but uses Opacus's accountant unchanged.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.grad_sample import get_gsm_class
from opacus.optimizers import get_optimizer_class
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from fedspatial.shared.storage.atomic import write_json_atomic
from fedspatial.shared.training.loop import GraphData, TrainResult

logger = logging.getLogger(__name__)

ACCOUNTANT = "Opacus RDPAccountant (sampled Gaussian mechanism, RDP composition)"
PRIVACY_UNIT = "one cell: its feature vector and its edges in the site's degree-bounded neighbourhood graph"
LEDGER_FILE = "privacy_ledger.json"
PRIVACY_BUDGET_ERROR = 4001
"""Error code of a train reply a site refused because its privacy budget is spent."""


class PrivacyBudgetExceeded(RuntimeError):
    """The next release would spend more than the site's privacy budget."""


def guarantee(epsilon: float, delta: float, degree_bound: int) -> str:
    """The one-sentence guarantee a ledger states."""
    return (
        f"({epsilon:.3g}, {delta:g})-DP for what this site released under this ledger (model updates; "
        "harmonization aggregates when noised), with respect to "
        f"adding or removing one cell (its features and its edges in the neighbourhood graph whose "
        f"in-degree is capped at {degree_bound}); the graph is built from cell coordinates without "
        "noise, and cell counts, clustering statistics and scores released after training are not covered."
    )


# ----------------------------------------------------------------------------- bound
@dataclass(frozen=True)
class NodeBound:
    """How far one cell reaches into a step's gradient sum.

    Attributes
    ----------
    degree_bound
        ``D``: most neighbour lists a cell appears in.
    """

    degree_bound: int

    def __post_init__(self) -> None:
        if self.degree_bound < 0:
            raise ValueError("degree_bound must be >= 0")

    @property
    def samples_per_cell(self) -> int:
        """``D + 1`` training samples can contain one cell."""
        return self.degree_bound + 1

    @property
    def sensitivity(self) -> int:
        """Node-level sensitivity in units of the clipping norm: ``1 + 2D``."""
        return 1 + 2 * self.degree_bound

    def sample_rate(self, q: float) -> float:
        """Probability that a step draws at least one of a cell's samples."""
        return 1.0 - (1.0 - q) ** self.samples_per_cell


# --------------------------------------------------------------------------- accountant
@dataclass
class Release:
    """One entry of the ledger: a private release accounted as ``steps`` sampled
    Gaussian mechanisms of node-level ``noise_multiplier`` at node-level ``sample_rate``."""

    kind: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composition, as Opacus's ``RDPAccountant`` computes it (same orders,
    same RDP of the sampled Gaussian, same conversion), with the per-step RDP of each
    distinct mechanism cached: a ledger asks this many times per round."""
    if not history:
        return 0.0
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    rdp = sum(n * _rdp_per_step(q, sigma) for (sigma, q), n in steps.items())
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(q: float, sigma: float) -> np.ndarray:
    return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[tuple[float, float, int]] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest node-level noise multiplier (within ``tolerance``) such that ``prior``
    followed by ``steps`` steps at ``sample_rate`` spends at most ``target_epsilon``
    (bisection over Opacus's accountant, as ``opacus.accountants.utils.get_noise_multiplier``,
    with earlier releases included)."""
    if epsilon_of(prior, delta) >= target_epsilon:
        raise PrivacyBudgetExceeded(
            f"earlier releases already spent epsilon {epsilon_of(prior, delta):.3f} >= target {target_epsilon}"
        )
    low, high = 0.0, 10.0
    while epsilon_of([*prior, (high, sample_rate, steps)], delta) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError("no noise multiplier reaches the target epsilon: raise privacy.target-epsilon")
    while high - low > tolerance:
        mid = (low + high) / 2
        if epsilon_of([*prior, (mid, sample_rate, steps)], delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


@dataclass
class PrivacyLedger:
    """A site's privacy spending over the whole run: the accountant's state.

    The Opacus accountant is rebuilt from :attr:`releases` whenever it is needed, so
    the ledger (kept in Flower's ``context.state`` and on disk) *is* the accountant's
    history: nothing spent is ever forgotten between rounds.
    """

    site: str
    delta: float
    budget_epsilon: float
    target_epsilon: float = 0.0
    max_grad_norm: float = 1.0
    degree_bound: int = 0
    node_noise_multiplier: float = 0.0
    """Calibrated once (first training round) and kept for the whole run."""
    releases: list[Release] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.releases]

    def accountant(self) -> RDPAccountant:
        acc = RDPAccountant()
        acc.history = self.history
        return acc

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return epsilon_of([*self.history, (noise_multiplier, sample_rate, steps)], self.delta)

    def check(self, kind: str, server_round: int, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after the planned release; raises :class:`PrivacyBudgetExceeded`
        (and records the refusal) when it would exceed the budget."""
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if after > self.budget_epsilon * (1 + 1e-9):
            reason = (
                f"privacy budget exhausted at site {self.site}: {kind} of round {server_round} would raise "
                f"epsilon from {self.epsilon:.3f} to {after:.3f}, above the site's budget "
                f"{self.budget_epsilon:g} (delta {self.delta:g}); the site refuses"
            )
            if not any(r["round"] == server_round and r["kind"] == kind for r in self.refusals):
                self.refusals.append({"round": server_round, "kind": kind, "reason": reason, "time": time.time()})
            raise PrivacyBudgetExceeded(reason)
        return after

    def record(self, release: Release) -> None:
        self.releases.append(release)
        release.epsilon_after = self.epsilon

    # -- persistence ------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        raw = json.loads(text)
        raw["releases"] = [Release(**r) for r in raw.get("releases", [])]
        return cls(**raw)

    def report(self) -> dict[str, Any]:
        """The ledger file's content: settings, guarantee, and epsilon after each release."""
        bound = NodeBound(self.degree_bound)
        train = [r for r in self.releases if r.kind == "dp-sgd"]
        last = train[-1].details if train else {}
        return {
            "site": self.site,
            "privacy-unit": PRIVACY_UNIT,
            "guarantee": guarantee(self.epsilon, self.delta, self.degree_bound),
            "accountant": ACCOUNTANT,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "budget-epsilon": self.budget_epsilon,
            "target-epsilon": self.target_epsilon,
            "status": "exhausted" if self.refusals else "within budget",
            "max-grad-norm": self.max_grad_norm,
            "degree-bound": self.degree_bound,
            "samples-per-cell": bound.samples_per_cell,
            "node-sensitivity": f"{bound.sensitivity} x max-grad-norm (1 + 2 x degree-bound)",
            "node-noise-multiplier": self.node_noise_multiplier,
            "noise-multiplier": self.node_noise_multiplier * bound.sensitivity,
            "sampling-rate": last.get("sample-rate"),
            "node-sampling-rate": train[-1].sample_rate if train else None,
            "steps": sum(r.steps for r in train),
            "epsilon-per-round": [
                {"round": r.round, "epsilon": r.epsilon_after, "steps": r.steps} for r in train
            ],
            "releases": [asdict(r) for r in self.releases],
            "refusals": self.refusals,
        }

    def write(self, folder: str | Path) -> Path:
        return write_json_atomic(Path(folder) / LEDGER_FILE, self.report())


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
    such releases compose (RDP) like one Gaussian mechanism with noise multiplier
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
