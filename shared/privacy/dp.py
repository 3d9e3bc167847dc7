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

With the per-cell encoder (:class:`~fedspatial.shared.models.CellAutoencoder` on
:func:`~fedspatial.shared.training.loop.per_cell_data`, neighbours ``[N, 0]``) a sample is
one cell: ``D = 0``, sensitivity ``C``, no group factor (:func:`check_degree_bound`
refuses data whose neighbour lists exceed the plan's ``D``).

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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus.grad_sample import get_gsm_class
from opacus.optimizers import get_optimizer_class
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
from fedspatial.shared.training.loop import GraphData, TrainResult, adam

__all__ = [  # the old import paths keep working
    "ACCOUNTANT", "GRAD_SAMPLE_MODES", "LEDGER_FILE", "PRIVACY_BUDGET_ERROR", "PRIVACY_UNIT", "DPPlan",
    "LinearGhostClipping", "Mechanism", "NodeBound", "PrivacyBudgetExceeded", "PrivacyLedger", "Release",
    "calibrate_noise", "check_degree_bound", "dp_train_epochs", "epsilon_of", "guarantee",
    "plan_round", "poisson_batches", "rdp_epsilon_of", "validate_model",
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
    """DP-SGD settings of one round: Poisson rate ``batch_size / n_cells``, ``epochs / rate`` steps.

    ``bound`` is the data's: ``NodeBound(0)`` for per-cell samples
    (:func:`~fedspatial.shared.training.loop.per_cell_data`), whose sensitivity is ``C``.
    """
    if n_cells < 1:
        raise ValueError("a site without cells cannot train")
    q = min(1.0, batch_size / n_cells)
    steps = epochs * int(1 / q)
    return DPPlan(q, steps, node_noise_multiplier, max_grad_norm, bound)


GRAD_SAMPLE_MODES = ("ghost", "opacus-ghost", "hooks", "functorch")
"""``ghost``: ghost clipping, in one backward pass (:class:`LinearGhostClipping`) when every
trainable parameter lives in an ``nn.Linear``, else Opacus's; ``opacus-ghost``: always Opacus's
(two backward passes); ``hooks`` / ``functorch``: Opacus's per-sample gradients."""


class LinearGhostClipping:
    """DP-SGD steps with ghost clipping in a single backward pass.

    For models whose trainable parameters all live in ``nn.Linear`` layers (each called at
    most once per forward pass, inputs ``[B, ..., in]``). Forward hooks keep each layer's
    input ``a [B, T, in]``; one ``autograd.grad`` of the summed per-sample losses gives each
    layer's output gradient ``g [B, T, out]`` without forming any weight gradient. Then,
    as Opacus's ghost clipping (Li et al. 2022) but without its second backward pass
    (book-keeping, Bu et al. 2023):

    - per-sample gradient norms in closed form: ``||sum_t g_t a_t^T||^2 = sum_{t,s}
      (g_t . g_s)(a_t . a_s)`` (``T = 1``: ``|g|^2 |a|^2``), bias ``||sum_t g_t||^2``;
    - clipping factors ``c = min(1, C / (norm + 1e-6))`` (Opacus's);
    - the clipped sum ``sum_b c_b g_b^T a_b`` by one matrix product per layer, added to
      Gaussian noise of std ``sigma C`` drawn straight into the gradient buffer, all over
      ``expected_batch_size`` (Opacus's ``loss_reduction="mean"``); then the optimizer steps.

    Attributes ``noise_multiplier``, ``max_grad_norm`` and ``expected_batch_size`` are
    those of the step, as on Opacus's ``DPOptimizer``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator,
    ) -> None:
        if not self.supports(model):
            raise ValueError("single-pass ghost clipping needs every trainable parameter in one nn.Linear")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.optimizer = optimizer
        self.generator = generator
        self.layers = [m for m in model.modules() if _trainable(m)]
        params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        # One flat gradient buffer: the noise is drawn into it in one call, each layer's
        # clipped sum is added in place, and the optimizer reads its views as p.grad.
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        for p, view in zip(params, self.flat.split([p.numel() for p in params]), strict=True):
            p.grad = view.view_as(p)
        self._params = params
        # Each layer's gradient views (None: frozen), looked up once per step, not per use
        self._grads: dict[nn.Module, tuple[Tensor | None, Tensor | None]] = {}
        for m in self.layers:
            w, b = (p.grad if isinstance(p, Tensor) and p.requires_grad else None for p in (m.weight, m.bias))
            self._grads[m] = (w, b)
        self._records: list[tuple[nn.Linear, Tensor, Tensor]] = []
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether every trainable parameter belongs to exactly one plain ``nn.Linear``."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        in_linear = [p for m in model.modules() if _trainable(m) for p in m.parameters(recurse=False) if p.requires_grad]
        return bool(trainable) and len(in_linear) == len({id(p) for p in in_linear}) == len(trainable) and all(
            type(m) is nn.Linear for m in model.modules() if _trainable(m)
        )

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            self._records.append((module, inputs[0].detach(), output))  # type: ignore[arg-type]

    def step(self, per_sample: Tensor) -> None:
        """Clip, sum and noise the gradients of the losses ``[B]`` of the last forward pass; step.

        An empty ``[0]`` batch (Poisson sampling) steps on noise alone.
        """
        records, self._records = self._records, []
        if len({id(layer) for layer, _, _ in records}) != len(records):
            raise NotImplementedError("ghost clipping: a Linear layer ran twice in one forward pass (tied weights)")
        scale = 1.0 / self.expected_batch_size
        self.flat.normal_(0.0, self.noise_multiplier * self.max_grad_norm * scale, generator=self.generator)
        if records and per_sample.requires_grad:
            self._add_clipped_sum(records, per_sample, scale)
        self.optimizer.step()

    def _add_clipped_sum(self, records: list[tuple[nn.Linear, Tensor, Tensor]], per_sample: Tensor, scale: float) -> None:
        n = len(per_sample)
        grads = torch.autograd.grad(per_sample.sum(), [out for _, _, out in records], allow_unused=True)
        terms = []  # (weight grad, bias grad, a [B * T, in], g [B * T, out], T)
        sq_norms = per_sample.new_zeros(n)  # [B] squared per-sample gradient norms
        for (layer, a, _), g in zip(records, grads, strict=True):
            if g is None:  # output unused by the loss: no gradient
                continue
            if a.ndim < 2 or a.shape[0] != n:
                raise ValueError(f"ghost clipping: {layer} input {tuple(a.shape)} is not batch-first [{n}, ..., in]")
            w, b = self._grads[layer]
            if a.ndim == 2:  # one row per sample: ||g a^T||^2 = |a|^2 |g|^2, bias |g|^2
                g_sq = torch.linalg.vecdot(g, g)
                if w is None:
                    sq_norms.add_(g_sq)
                else:
                    a_sq = torch.linalg.vecdot(a, a)
                    sq_norms.addcmul_(a_sq if b is None else a_sq.add_(1.0), g_sq)
                terms.append((w, b, a, g, 1))
            else:
                t = math.prod(a.shape[1:-1])  # positions per sample (explicit: B may be 0)
                a3, g3 = a.reshape(n, t, a.shape[-1]), g.reshape(n, t, g.shape[-1])
                sq_norms.add_(_sq_grad_norms(a3, g3, weight=w is not None, bias=b is not None))
                terms.append((w, b, a3.reshape(n * t, a.shape[-1]), g3.reshape(n * t, g.shape[-1]), t))
        coef = (self.max_grad_norm / (sq_norms.sqrt_() + 1e-6)).clamp_(max=1.0).mul_(scale)  # [B]
        column = coef[:, None]
        for w, b, a2, g2, t in terms:
            rows = coef if t == 1 else coef.repeat_interleave(t)  # [B * T]
            g_t = g2.T
            if w is not None:  # sum_b c_b g_b^T a_b, scaling the narrower factor
                if a2.shape[1] <= g2.shape[1]:
                    w.addmm_(g_t, a2 * (column if t == 1 else rows[:, None]))
                else:
                    w.addmm_((g2 * (column if t == 1 else rows[:, None])).T, a2)
            if b is not None:
                b.addmv_(g_t, rows)

    def close(self) -> None:
        """Remove the hooks and the gradient buffer."""
        for handle in self._handles:
            handle.remove()
        for p in self._params:
            p.grad = None


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _sq_grad_norms(a: Tensor, g: Tensor, *, weight: bool, bias: bool) -> Tensor:
    """Squared per-sample gradient norms ``[B]`` of a Linear layer applied at ``T`` positions,
    from its input ``a [B, T, in]`` and output gradient ``g [B, T, out]`` (of the weight and
    the bias, where trainable): ``sum_{t,s} (g_t . g_s)(a_t . a_s)`` without forming
    ``sum_t g_t a_t^T``, and ``|sum_t g_t|^2``."""
    out = g.new_zeros(g.shape[0])
    if weight:
        out += (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2)).clamp(min=0)
    if bias:
        out += g.sum(dim=1).square().sum(dim=1)
    return out


class _OpacusEngine:
    """Opacus's engines (ghost clipping in two backward passes, or per-sample gradients)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mode: str, plan: DPPlan, expected_batch_size: int, generator: torch.Generator) -> None:
        self.mode = "ghost" if mode == "opacus-ghost" else mode
        options: dict[str, Any] = {"batch_first": True, "loss_reduction": "mean"}
        if self.mode == "functorch":
            options["force_functorch"] = True
        if self.mode == "ghost":
            options["max_grad_norm"] = plan.max_grad_norm
        self.gsm = get_gsm_class(self.mode)(model, **options)
        self.optimizer = get_optimizer_class("flat", False, self.mode)(
            optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator,
        )
        self.criterion = None
        if self.mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            self.criterion = DPLossFastGradientClipping(self.gsm, self.optimizer, _PerSampleLoss(), "mean")

    def step(self, per_sample: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.criterion is not None:
            self.criterion(per_sample).backward()
        else:  # an empty Poisson batch still takes a (pure noise) step
            (per_sample.mean() if len(per_sample) else per_sample.sum()).backward()
        self.optimizer.step()

    def close(self) -> None:
        self.gsm.to_standard_module()


class _PerSampleLoss:
    """Criterion for Opacus ghost clipping: the model already returns per-sample losses."""

    reduction = "mean"

    def __call__(self, per_sample: Tensor) -> Tensor:
        return per_sample if self.reduction == "none" else per_sample.mean()


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """``steps`` Poisson samples of ``range(n)``: each index independently with ``sample_rate``.

    Yields sorted int64 index tensors ``[B]`` (``B`` varies, may be 0). The same
    distribution as Opacus's ``UniformWithReplacementSampler`` (``rand(n) < q``), drawn
    as the gaps between successive picks of the Bernoulli process (``Geometric(q)``
    trials each): ``O(B)`` random numbers a step instead of ``O(n)`` (0.1 ms a step at
    20,000 cells, growing with the site), and no round trip through Python lists.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    mean = n * sample_rate
    chunk = int(mean + 6 * math.sqrt(mean) + 16)  # nearly always one draw covers range(n)
    for _ in range(steps):
        if sample_rate == 1:
            yield torch.arange(n)
            continue
        # 1-based positions of the picks: running sums of the gaps, exact in float64
        pos = torch.empty(chunk, dtype=torch.float64).geometric_(sample_rate, generator=generator).cumsum_(0)
        while float(pos[-1]) <= n:  # the process has not yet passed the last index
            more = torch.empty(chunk, dtype=torch.float64).geometric_(sample_rate, generator=generator).cumsum_(0)
            pos = torch.cat([pos, pos[-1] + more])
        yield pos[: int(torch.searchsorted(pos, n, right=True))].to(torch.int64) - 1


def check_degree_bound(data: GraphData, bound: NodeBound) -> None:
    """Refuse data whose cells appear in more neighbour lists than the bound the noise assumes."""
    if data.width == 0:
        return  # per-cell samples: each holds one cell, whatever the bound
    nb = data.neighbors[data.neighbors >= 0]
    worst = int(torch.bincount(nb, minlength=data.n_cells).max()) if nb.numel() else 0
    if worst > bound.degree_bound:
        raise ValueError(
            f"a cell appears in {worst} neighbour lists, more than the degree bound {bound.degree_bound} "
            "that sets the noise: bound the in-degree (graph.neighbors.bound_in_degree) first"
        )


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

    Poisson sampling at ``plan.sample_rate`` (:func:`poisson_batches`), per-sample clipping
    to ``plan.max_grad_norm`` and Gaussian noise of std ``plan.noise_multiplier *
    max_grad_norm`` on the sum, over the expected batch size (``grad_sample_mode``, one
    of :data:`GRAD_SAMPLE_MODES`). Sampling and noise draw from a secret seed unless
    ``seed`` is given (tests). ``on_step(engine)`` runs after each step (the engine has
    ``noise_multiplier`` and ``max_grad_norm``). The caller accounts the round
    (``plan.steps`` steps) in its :class:`PrivacyLedger`.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"unknown grad_sample_mode {grad_sample_mode!r}; available: {GRAD_SAMPLE_MODES}")
    validate_model(model)
    check_degree_bound(data, plan.bound)
    secret = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
    sampling = torch.Generator().manual_seed(secret)
    noise = torch.Generator().manual_seed(secret ^ 0x5EED)
    expected = max(1, int(data.n_cells * plan.sample_rate))
    optimizer = adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    engine: LinearGhostClipping | _OpacusEngine
    if grad_sample_mode == "ghost" and LinearGhostClipping.supports(model):
        engine = LinearGhostClipping(
            model, optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            expected_batch_size=expected, generator=noise,
        )
    else:
        engine = _OpacusEngine(model, optimizer, grad_sample_mode, plan, expected, noise)
    model.train()
    total, seen, steps = torch.zeros((), dtype=torch.float64), 0, 0
    try:
        with warnings.catch_warnings():
            # Opacus's hooks fire on module outputs because the inputs need no gradient: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for index in poisson_batches(data.n_cells, plan.sample_rate, plan.steps, sampling):
                x, mask = data.ego(index)
                per_sample = model.loss(x, mask, data.batch[index] if data.batch is not None else None)  # type: ignore[operator]
                engine.step(per_sample)
                total += per_sample.detach().sum()
                seen += len(index)
                steps += 1
                if on_step is not None:
                    on_step(engine if isinstance(engine, LinearGhostClipping) else engine.optimizer)
    finally:
        engine.close()
    mean_loss = float(total) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise FloatingPointError("DP training loss is not finite: lower `lr` or `privacy.max-grad-norm`")
    return TrainResult(loss=mean_loss, steps=steps, num_examples=data.n_cells)
