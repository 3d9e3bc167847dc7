"""Privacy around a strategy: Flower's central-DP wrappers, and sites refusing to train
once their privacy budget is spent."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from opacus.accountants import RDPAccountant

from fedspatial.shared.privacy.dp import PRIVACY_BUDGET_ERROR

logger = logging.getLogger(__name__)



class PrivacyBudgetStop(RuntimeError):
    """A site refused to train (budget spent) and the run is set to stop training."""

    def __init__(self, server_round: int, refusals: dict[int, str]) -> None:
        self.server_round = server_round
        self.refusals = refusals
        super().__init__("; ".join(refusals.values()))


def central_dp(strategy: Strategy, mode: str, *, noise_multiplier: float, clipping_norm: float, n_sites: int) -> Strategy:
    """Wrap ``strategy`` with Flower's client-level DP wrapper for ``mode``
    (``server-fixed``, ``client-fixed``, ``server-adaptive``, ``client-adaptive``).

    With adaptive clipping, the clipped-count noise gets the same multiplier, so that
    the update noise is ``(z^-2 - (2z)^-2)^-1/2`` and the whole round is a Gaussian
    mechanism with multiplier ``z`` (Andrew et al. 2021).
    """
    if mode == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clipping_norm, n_sites)
    if mode == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier, clipping_norm, n_sites)
    adaptive = {"server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
                "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping}
    if mode in adaptive:
        return adaptive[mode](
            strategy, noise_multiplier, n_sites, initial_clipping_norm=clipping_norm,
            clipped_count_stddev=noise_multiplier,
        )
    raise ValueError(f"unknown central-dp mode {mode!r}")


def central_dp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Client-level epsilon after ``rounds`` rounds in which every site takes part and
    the server averages clipped updates with equal weights (Opacus RDP accountant)."""
    if rounds <= 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, 1.0, rounds)]
    return float(accountant.get_epsilon(delta=delta))


class PrivacyBudgetGuard(Strategy):
    """Forwards to ``strategy``; looks at train replies first for sites that refused
    because their privacy budget is spent.

    ``on_exhausted="stop"`` raises :class:`PrivacyBudgetStop` before the round is
    aggregated (the previous round's model stands); ``"continue"`` drops the refusals
    and aggregates the other sites' updates.
    """

    def __init__(self, strategy: Strategy, *, on_exhausted: str = "stop") -> None:
        super().__init__()
        if on_exhausted not in ("stop", "continue"):
            raise ValueError("on_exhausted must be 'stop' or 'continue'")
        self.strategy = strategy
        self.on_exhausted = on_exhausted
        self.refusals: dict[int, dict[int, str]] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        refused = {
            m.metadata.src_node_id: m.error.reason or "privacy budget exhausted"
            for m in replies
            if m.has_error() and m.error.code == PRIVACY_BUDGET_ERROR
        }
        if refused:
            self.refusals[server_round] = refused
            for reason in refused.values():
                logger.warning("round %d: %s (on-exhausted=%s)", server_round, reason, self.on_exhausted)
            if self.on_exhausted == "stop":
                raise PrivacyBudgetStop(server_round, refused)
            replies = [m for m in replies if not (m.has_error() and m.error.code == PRIVACY_BUDGET_ERROR)]
            if hasattr(self.strategy, "num_sampled_clients"):
                # central DP noise is calibrated to the number of sites that take part
                self.strategy.num_sampled_clients = sum(1 for m in replies if not m.has_error())
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
