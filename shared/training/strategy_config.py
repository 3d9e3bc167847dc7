"""The ``training.strategy`` choices and their checks (the schema is in shared/config.py).

How the server combines the sites' models (Flower's strategies, built by
``fedspatial.strategies.registry``):

- ``fedavg``: mean weighted by cells (equal weights under central DP);
- ``fedprox``: FedAvg at the server, the proximal term ``proximal-mu / 2 ||w - w_global||^2``
  in every site's local loss (needs ``proximal-mu`` > 0; the term applies with any strategy);
- ``fedadam``, ``fedyogi``: the FedAvg mean taken as a pseudo-gradient for a server Adam /
  Yogi step (``server-lr``, ``server-beta-1``, ``server-beta-2``, ``server-tau``; the
  moments restart when a run is resumed);
- robust to poisoned updates, all unweighted (a site's cells buy it no influence):
  ``median`` (coordinate-wise), ``trimmed-mean`` (coordinate-wise, ``trim-fraction`` of the
  sites cut at each end), ``krum`` (the one site model closest to its n - f - 2 nearest),
  ``multi-krum`` (mean of the ``krum-select`` best by Krum's score) and ``bulyan``
  (Multi-Krum, then a trimmed coordinate-wise mean; needs 4 x ``byzantine-sites`` + 3 sites
  per round). They rank single updates, so they are refused with secure aggregation (which
  hides them) and with central DP (whose noise is calibrated to a mean of clipped updates).
  With a batch-aware decoder (``model.batch``) each batch's decoder weights are taken from
  the site that holds the batch only, not voted on. With one site (the local and
  centralized modes) a robust rule is the identity: FedAvg runs. Which one: the median
  and the trimmed mean need no count of attackers, but one sign-flipped site pulls every
  coordinate towards a smaller step (slower training); Multi-Krum averages the honest
  sites when ``byzantine-sites`` is at least their real number
  (benchmarks/results/scale.md, section "Poisoned").

``fraction-train`` < 1 is partial participation (Flower's ``fraction_train``): that fraction
of the connected sites, drawn afresh each round (seeded by ``seed``), trains; every site
still evaluates. The number drawn must not fall below ``min-nodes``.

FedBN (normalization layers kept local) has nothing to act on: the model has no
normalization layers; the site-local normalization is the per-section standardization of
the inputs (``features.scale: section``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from fedspatial.shared.config import ExperimentConfig

StrategyName = Literal[
    "fedavg", "fedprox", "fedadam", "fedyogi", "trimmed-mean", "median", "krum", "multi-krum", "bulyan"
]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
ROBUST_STRATEGIES = ("trimmed-mean", "median", "krum", "multi-krum", "bulyan")
"""Byzantine-robust rules: they need each site's update, unmasked and unclipped."""
SERVER_OPTIMIZERS = ("fedadam", "fedyogi")


def strategy_checks(cfg: ExperimentConfig) -> list[tuple[bool, str]]:
    """``(ok, message)`` for ``training.strategy`` and partial participation, against each
    other and privacy. Counts that depend on the number of sites are checked when training
    starts (``fedspatial.strategies.registry.check_strategy``)."""
    t, p = cfg.training, cfg.privacy
    robust = t.strategy in ROBUST_STRATEGIES
    return [
        (0 < t.fraction_train <= 1, "training.fraction-train: must be in (0, 1]"),
        (
            t.strategy != "fedprox" or t.proximal_mu > 0,
            "training.strategy: 'fedprox' needs training.proximal-mu > 0 (with 0 it is fedavg)",
        ),
        (t.server_lr > 0, "training.server-lr: must be > 0"),
        (0 <= t.server_beta_1 < 1, "training.server-beta-1: must be in [0, 1)"),
        (0 <= t.server_beta_2 < 1, "training.server-beta-2: must be in [0, 1)"),
        (t.server_tau > 0, "training.server-tau: must be > 0"),
        (0 <= t.trim_fraction < 0.5, "training.trim-fraction: must be in [0, 0.5)"),
        (t.byzantine_sites >= 0, "training.byzantine-sites: must be >= 0"),
        (t.krum_select >= 0, "training.krum-select: must be >= 0 (0 = sites per round - byzantine-sites)"),
        (
            not (robust and p.secagg),
            f"training.strategy: {t.strategy!r} ranks single site updates, which secure aggregation "
            "hides from the server (privacy.secagg); use fedavg or fedprox with it",
        ),
        (
            not p.secagg or robust or t.strategy in ("fedavg", "fedprox"),
            f"training.strategy: privacy.secagg runs fedavg rounds only (fedprox too: its proximal term "
            f"is the sites'); {t.strategy!r} is not available with it",
        ),
        (
            not p.secagg or t.fraction_train == 1,
            "training.fraction-train: privacy.secagg needs every site in every round (1.0)",
        ),
        (
            not (robust and p.central_dp != "none"),
            f"training.strategy: {t.strategy!r} does not combine with privacy.central-dp (its noise is "
            "calibrated to a mean of clipped updates, not to a median or a selection); use fedavg or fedprox",
        ),
        (
            not (t.strategy in SERVER_OPTIMIZERS and p.central_dp != "none"),
            f"training.strategy: {t.strategy!r} does not combine with privacy.central-dp (the server "
            "optimizer's step is not the noised mean the privacy accounting covers); use fedavg or fedprox",
        ),
    ]
