"""How a site splits its run's epsilon between the releases of a locally private run.

Under ``privacy.local-dp`` a site releases, in order: its feature statistics (one
Gaussian mechanism over per-section sums, ``feature-stats``), the DP-SGD rounds
(``dp-sgd``), the DP k-means iterations (``dp-kmeans``, one Gaussian mechanism each) and
the label x domain tables of the evaluation (``dp-table``, one). Everything but DP-SGD
gets a fixed share of the target epsilon (each share spent by that release alone, at the
run's delta); DP-SGD's noise is then calibrated so that the composition of **all** of
them (``dp-accounting`` PLD) is the target: the ledger's final epsilon is the run's
end-to-end epsilon.

The shares are fixed in advance, from no data (a label-free rule): the one-shot
statistics need little budget because they sum over many cells; the model is what most
of the budget buys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedspatial.shared.privacy.accounting import Entry, Mechanism, calibrate_noise

if TYPE_CHECKING:
    from fedspatial.shared.config import PrivacyConfig

__all__ = [
    "CLUSTER_SHARE",
    "FEATURE_SHARE",
    "KMEANS_INIT_ITERATIONS",
    "TABLE_SHARE",
    "BudgetPlan",
    "budget_plan",
    "plan_budget",
]

FEATURE_SHARE = 0.10
"""Epsilon share of the feature statistics (highly variable genes, standardization)."""
CLUSTER_SHARE = 0.15
"""Epsilon share of all DP k-means iterations together."""
TABLE_SHARE = 0.05
"""Epsilon share of the evaluation's label x domain tables."""
KMEANS_INIT_ITERATIONS = 2
"""DP Lloyd iterations of the over-clustered start, before ``privacy.kmeans-iterations``."""


@dataclass(frozen=True)
class BudgetPlan:
    """Noise multipliers of a locally private run's fixed releases.

    Each is the noise std over the release's L2 sensitivity to adding or removing one cell.

    Attributes
    ----------
    feature_noise
        The feature statistics (one release).
    cluster_noise
        One DP k-means iteration.
    cluster_releases
        DP k-means iterations in all (the start's and ``privacy.kmeans-iterations``).
    table_noise
        The label x domain tables (one release).
    """

    feature_noise: float
    cluster_noise: float
    cluster_releases: int
    table_noise: float

    def after_training(self) -> list[Entry]:
        """The releases that follow DP-SGD, as the accountant composes them."""
        return [(Mechanism(self.cluster_noise), self.cluster_releases), (Mechanism(self.table_noise), 1)]

    def before_training(self) -> list[Entry]:
        """The releases that precede DP-SGD."""
        return [(Mechanism(self.feature_noise), 1)]


@functools.lru_cache(maxsize=64)
def plan_budget(target_epsilon: float, delta: float, kmeans_iterations: int) -> BudgetPlan:
    """The :class:`BudgetPlan` for a run that spends ``target_epsilon`` at ``delta``."""

    def sigma(share: float, releases: int) -> float:
        return calibrate_noise(
            target_epsilon=share * target_epsilon, delta=delta, sample_rate=1.0, steps=releases, tolerance=0.001
        )

    releases = KMEANS_INIT_ITERATIONS + kmeans_iterations
    return BudgetPlan(
        feature_noise=sigma(FEATURE_SHARE, 1),
        cluster_noise=sigma(CLUSTER_SHARE, releases),
        cluster_releases=releases,
        table_noise=sigma(TABLE_SHARE, 1),
    )


def budget_plan(privacy: PrivacyConfig) -> BudgetPlan:
    """The plan of a run's privacy settings (``privacy.feature-stats-noise`` > 0 fixes
    the feature statistics' noise instead of the share)."""
    plan = plan_budget(float(privacy.target_epsilon), float(privacy.delta), int(privacy.kmeans_iterations))
    if privacy.feature_stats_noise > 0:
        plan = BudgetPlan(privacy.feature_stats_noise, plan.cluster_noise, plan.cluster_releases, plan.table_noise)
    return plan
