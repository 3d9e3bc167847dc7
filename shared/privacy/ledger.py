"""A site's privacy ledger: every release, the epsilon it spent, the budget refusal.

No Flower imports: the ClientApp keeps a :class:`PrivacyLedger` in the node's state and
writes it to ``privacy_ledger.json``. The binding epsilon comes from
:func:`fedspatial.shared.privacy.accounting.epsilon_of` (``dp-accounting``'s PLD
accountant); Opacus's RDP value of the previous group reduction is kept beside it as a
cross-check. Ledger files written before the per-sample rate and the degree bound were
recorded still load (:meth:`Release.mechanism`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedspatial.shared.privacy.accounting import (
    ACCOUNTANT,
    RDP_CROSS_CHECK,
    Entry,
    Mechanism,
    NodeBound,
    PrivacyBudgetExceeded,
    epsilon_of,
    rdp_epsilon_of,
)
from fedspatial.shared.storage.atomic import write_json_atomic

logger = logging.getLogger(__name__)

PRIVACY_UNIT = (
    "one cell, added or removed: its expression profile, its label, its position (and so its edges in the "
    "neighbourhood graph); the number of cells of each section is public"
)
SCOPE = (
    "this run: the ledger composes every release of this run at this site; it does not compose with other "
    "runs on the same data (a site that runs several studies on the same cells spends the sum of their "
    "epsilons, or better by composing their ledgers' releases)"
)
LEDGER_FILE = "privacy_ledger.json"
PRIVACY_BUDGET_ERROR = 4001
"""Error code of a train reply a site refused because its privacy budget is spent."""


def guarantee(epsilon: float, delta: float, degree_bound: int) -> str:
    """The one-sentence guarantee a ledger states."""
    if degree_bound == 0:
        sample = "each DP-SGD sample is one cell alone (per-cell encoder; the niche enters after training, at the site)"
    else:
        sample = (
            f"each DP-SGD sample is a cell's niche; removing a cell changes its own sample and those of at most "
            f"{degree_bound} other cells (the kNN bound for planar coordinates)"
        )
    return (
        f"({epsilon:.3g}, {delta:g})-DP with respect to adding or removing one cell, for everything this site "
        "released in this run (feature statistics, model updates, DP k-means statistics, label x domain tables); "
        f"{sample}; epsilon from dp-accounting's PLD accountant over all releases. Not covered: the number of "
        "cells per section (public) and the outputs that never leave the site."
    )


@dataclass
class Release:
    """One entry of the ledger: ``steps`` steps of one mechanism.

    Attributes
    ----------
    noise_multiplier
        DP-SGD: node-level ``sigma_node`` (noise std / ((1 + 2D) C)); other kinds: noise std
        over the release's sensitivity to one cell.
    sample_rate
        DP-SGD: ``1 - (1 - q)^(D + 1)`` (the RDP cross-check's rate); others: Poisson rate.
    degree_bound, ego_sample_rate
        DP-SGD: ``D`` and the per-sample rate ``q`` the PLD accountant uses; ``None`` in
        ledgers written before they were recorded.
    """

    kind: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    degree_bound: int | None = None
    ego_sample_rate: float | None = None
    epsilon_rdp_after: float | None = None

    @property
    def mechanism(self) -> Mechanism:
        """What the PLD accountant charges per step."""
        if self.degree_bound is not None and self.ego_sample_rate is not None:
            return Mechanism(self.noise_multiplier, self.ego_sample_rate, self.degree_bound)
        if self.kind != "dp-sgd":
            return Mechanism(self.noise_multiplier, self.sample_rate)
        # An older entry: recover q (details) and D from the recorded 1 - (1 - q)^(D + 1).
        q = float(self.details.get("sample-rate") or 0.0)
        if 0 < q < 1 and 0 < self.sample_rate < 1:
            d = round(math.log1p(-self.sample_rate) / math.log1p(-q)) - 1
            if d >= 0 and math.isclose(NodeBound(d).sample_rate(q), self.sample_rate, rel_tol=1e-9):
                return Mechanism(self.noise_multiplier, q, d)
        # Not recoverable: no amplification by sampling (the whole sum moves by at most (1 + 2D) C).
        logger.debug("dp-sgd release of round %d lacks q and D: accounted without sampling", self.round)
        return Mechanism(self.noise_multiplier)


@dataclass
class PrivacyLedger:
    """A site's privacy spending over the whole run: the accountant's state.

    The accountant is rebuilt from :attr:`releases` whenever it is needed, so the ledger
    (kept in Flower's ``context.state`` and on disk) *is* the accountant's history: nothing
    spent is ever forgotten between rounds.
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
    def history(self) -> list[tuple[Mechanism, int]]:
        """``(mechanism, steps)`` of every release, for :func:`epsilon_of`."""
        return [(r.mechanism, r.steps) for r in self.releases]

    @property
    def rdp_history(self) -> list[tuple[float, float, int]]:
        """The releases as the RDP cross-check sees them (recorded multiplier and rate)."""
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.releases]

    @property
    def epsilon(self) -> float:
        """Binding epsilon (PLD accountant)."""
        return epsilon_of(self.history, self.delta)

    @property
    def epsilon_rdp(self) -> float:
        """Cross-check: Opacus RDP with the group reduction (looser)."""
        return rdp_epsilon_of(self.rdp_history, self.delta)

    def check(
        self, kind: str, server_round: int, noise_multiplier: float, sample_rate: float, steps: int,
        *, degree_bound: int | None = None, ego_sample_rate: float | None = None, reserve: Sequence[Entry] = (),
    ) -> float:
        """Epsilon after the planned release (fields as in :class:`Release`); raises
        :class:`PrivacyBudgetExceeded` (and records the refusal) past the budget.

        ``reserve``: releases the run still needs after this one (DP k-means and the
        tables after training); the release is refused unless they fit too, so a site
        that stops training early can still cluster and report."""
        planned = Release(kind, server_round, noise_multiplier, sample_rate, steps,
                          degree_bound=degree_bound, ego_sample_rate=ego_sample_rate)
        after = epsilon_of([*self.history, (planned.mechanism, steps)], self.delta)
        total = epsilon_of([*self.history, (planned.mechanism, steps), *reserve], self.delta) if reserve else after
        if total > self.budget_epsilon * (1 + 1e-9):
            kept = f" and {total:.3f} with the releases reserved after it" if reserve else ""
            reason = (
                f"privacy budget exhausted at site {self.site}: {kind} of round {server_round} would raise "
                f"epsilon from {self.epsilon:.3f} to {after:.3f}{kept}, above the site's budget "
                f"{self.budget_epsilon:g} (delta {self.delta:g}); the site refuses"
            )
            if not any(r["round"] == server_round and r["kind"] == kind for r in self.refusals):
                self.refusals.append({"round": server_round, "kind": kind, "reason": reason, "time": time.time()})
            raise PrivacyBudgetExceeded(reason)
        return after

    def record(self, release: Release) -> None:
        self.releases.append(release)
        release.epsilon_after = self.epsilon
        release.epsilon_rdp_after = self.epsilon_rdp

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
        last = train[-1].mechanism if train else None
        return {
            "site": self.site,
            "privacy-unit": PRIVACY_UNIT,
            "scope": SCOPE,
            "guarantee": guarantee(self.epsilon, self.delta, self.degree_bound),
            "accountant": ACCOUNTANT,
            "epsilon": self.epsilon,
            "epsilon-rdp": self.epsilon_rdp,
            "cross-check-accountant": RDP_CROSS_CHECK,
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
            "sampling-rate": last.sample_rate if last is not None and last.degree_bound is not None else None,
            "node-sampling-rate": train[-1].sample_rate if train else None,
            "steps": sum(r.steps for r in train),
            "epsilon-per-round": [
                {"round": r.round, "epsilon": r.epsilon_after, "epsilon-rdp": r.epsilon_rdp_after, "steps": r.steps}
                for r in train
            ],
            "releases": [asdict(r) for r in self.releases],
            "refusals": self.refusals,
        }

    def write(self, folder: str | Path) -> Path:
        return write_json_atomic(Path(folder) / LEDGER_FILE, self.report())
