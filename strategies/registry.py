"""``training.strategy``: the name in the config -> a Flower strategy with fedspatial's
bookkeeping (:class:`~fedspatial.strategies.fedavg.SpatialFedAvg`).

Each class here is ``SpatialFedAvg`` in front of one of Flower's strategies
(``flwr.serverapp.strategy``): the aggregation math is Flower's; what fedspatial adds is
the per-round history, resumed round numbers, partitioned (per-batch) arrays and seeded
site sampling. What depends on the number of sites (sites drawn per round against
min-nodes, enough sites for the robust rule) is checked by :func:`check_strategy` when
training starts, before the first round; everything else is checked on load
(:func:`fedspatial.shared.config.validate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from fedspatial.shared.config import ConfigError, TrainingConfig
from fedspatial.shared.training.strategy_config import ROBUST_STRATEGIES, STRATEGIES
from fedspatial.strategies.fedavg import SpatialFedAvg

logger = logging.getLogger(__name__)


class SpatialFedProx(SpatialFedAvg, FedProx):
    """FedProx: FedAvg at the server; ``proximal-mu`` goes to the sites in the train config."""


class SpatialFedAdam(SpatialFedAvg, FedAdam):
    """FedAdam: an Adam step at the server on the FedAvg pseudo-gradient."""


class SpatialFedYogi(SpatialFedAvg, FedYogi):
    """FedYogi: a Yogi step at the server on the FedAvg pseudo-gradient."""


class SpatialFedMedian(SpatialFedAvg, FedMedian):
    """Coordinate-wise median of the sites' models."""


class SpatialFedTrimmedAvg(SpatialFedAvg, FedTrimmedAvg):
    """Coordinate-wise mean after cutting ``beta`` of the sites at each end."""


class SpatialKrum(SpatialFedAvg, Krum):
    """Krum: the one site model with the smallest distance to its n - f - 2 nearest."""


class SpatialMultiKrum(SpatialFedAvg, MultiKrum):
    """Multi-Krum: the weighted mean of the best ``num_nodes_to_select`` by Krum's score."""


class SpatialBulyan(SpatialFedAvg, Bulyan):
    """Bulyan: Multi-Krum selection, then a trimmed coordinate-wise mean around the median."""


STRATEGY_CLASSES: dict[str, type[SpatialFedAvg]] = {
    "fedavg": SpatialFedAvg,
    "fedprox": SpatialFedProx,
    "fedadam": SpatialFedAdam,
    "fedyogi": SpatialFedYogi,
    "trimmed-mean": SpatialFedTrimmedAvg,
    "median": SpatialFedMedian,
    "krum": SpatialKrum,
    "multi-krum": SpatialMultiKrum,
    "bulyan": SpatialBulyan,
}
assert tuple(STRATEGY_CLASSES) == STRATEGIES, "shared/training/strategy_config.py's STRATEGIES and the registry differ"


def sites_per_round(n_sites: int, fraction_train: float, min_train: int = 0) -> int:
    """The sites Flower's FedAvg draws in a round: ``max(int(n * fraction), min_train)``."""
    return max(int(n_sites * fraction_train), min_train)


def check_strategy(t: TrainingConfig, *, n_sites: int, min_nodes: int) -> int:
    """Raise :class:`ConfigError` when ``t`` cannot run on ``n_sites`` sites of which
    ``min_nodes`` must take part; returns the sites drawn per round."""
    problems = []
    if t.fraction_train < 1:
        drawn = int(n_sites * t.fraction_train)
        if drawn < max(min_nodes, 1):
            least = max(min_nodes, 1) / n_sites
            problems.append(
                f"training.fraction-train: {t.fraction_train:g} of {n_sites} sites draws {drawn} per round, fewer "
                f"than min-nodes {min_nodes} (min-nodes 0 means every site in a simulation): raise "
                f"fraction-train to at least {least:.3g} or set training.min-nodes to at most {max(drawn, 1)}"
            )
    k = sites_per_round(n_sites, t.fraction_train, min_nodes)
    f = t.byzantine_sites
    if n_sites > 1 and t.strategy in ROBUST_STRATEGIES:  # one site: FedAvg (build_strategy)
        if t.strategy == "median" and k < 3:
            problems.append(f"training.strategy: median of {k} sites is their mean; it needs at least 3 sites per round")
        if t.strategy == "trimmed-mean" and int(t.trim_fraction * k) < 1:
            problems.append(
                f"training.trim-fraction: {t.trim_fraction:g} of {k} sites per round cuts none (a plain mean); "
                f"raise it to at least {1 / k:.3g} (below 0.5) or use median"
            )
        if t.strategy in ("krum", "multi-krum") and k <= 2 * f + 2:
            problems.append(
                f"training.strategy: {t.strategy} tolerates byzantine-sites {f} only with more than "
                f"2 x {f} + 2 = {2 * f + 2} sites per round, got {k}; lower training.byzantine-sites"
            )
        if t.strategy == "multi-krum" and t.krum_select > k - f:
            problems.append(f"training.krum-select: {t.krum_select} exceeds sites per round - byzantine-sites = {k - f}")
        if t.strategy == "bulyan" and k < 4 * f + 3:
            problems.append(
                f"training.strategy: bulyan with byzantine-sites {f} needs 4 x {f} + 3 = {4 * f + 3} sites per "
                f"round, got {k}; lower training.byzantine-sites or use median or trimmed-mean"
            )
    if problems:
        raise ConfigError("invalid configuration for this federation:\n  - " + "\n  - ".join(problems))
    return k


def _parameters(t: TrainingConfig, name: str, k: int) -> dict[str, Any]:
    """The keyword arguments of Flower's strategy ``name``."""
    if name == "fedprox":
        return {"proximal_mu": t.proximal_mu}
    if name in ("fedadam", "fedyogi"):
        # eta_l is only logged by Flower: the sites' learning rate is training.lr
        return {"eta": t.server_lr, "eta_l": t.lr, "beta_1": t.server_beta_1, "beta_2": t.server_beta_2, "tau": t.server_tau}
    if name == "trimmed-mean":
        return {"beta": t.trim_fraction}
    if name in ("krum", "bulyan"):
        return {"num_malicious_nodes": t.byzantine_sites}
    if name == "multi-krum":
        return {"num_malicious_nodes": t.byzantine_sites, "num_nodes_to_select": t.krum_select or k - t.byzantine_sites}
    return {}


def build_strategy(
    t: TrainingConfig,
    *,
    n_sites: int,
    min_nodes: int,
    partitioned_keys: list[str] | None = None,
    partition_owners: Callable[[], Mapping[int, Mapping[str, np.ndarray]]] | None = None,
    **kwargs: Any,
) -> SpatialFedAvg:
    """The strategy ``t.strategy`` names, checked against the federation (:func:`check_strategy`).

    Parameters
    ----------
    t
        The run's training settings.
    n_sites, min_nodes
        Sites taking part, and how many must (the run's SiteGroup).
    partitioned_keys
        Arrays owned part by part by single sites (see :class:`SpatialFedAvg`).
    partition_owners
        Called for robust rules only, when there are partitioned keys: which part each
        site owns. Summing every site's update would let one poisoned site write into
        every other site's part, so robust rules take a part from its owner alone.
    **kwargs
        :class:`SpatialFedAvg` and Flower arguments (``round_offset``, ``sample_seed``,
        ``weighted_by_key``, ``fraction_evaluate``...).
    """
    k = check_strategy(t, n_sites=n_sites, min_nodes=min_nodes)
    name = t.strategy
    if name in ROBUST_STRATEGIES and n_sites == 1:
        logger.info("training.strategy %s: one site, whose update is the aggregate: FedAvg rounds", name)
        name = "fedavg"
    owners = None
    if name in ROBUST_STRATEGIES and partitioned_keys:
        if partition_owners is None:
            raise ValueError(f"{name} with partitioned keys needs partition_owners")
        owners = partition_owners()
    partial = t.fraction_train < 1
    strategy = STRATEGY_CLASSES[name](
        partitioned_keys=partitioned_keys,
        partition_owners=owners,
        fraction_train=t.fraction_train,
        # Flower draws max(int(n * fraction), min_train_nodes) sites: with fraction-train 1
        # every site, as before; below, check_strategy made sure int(n * fraction) >= min-nodes
        min_train_nodes=min_nodes,
        **_parameters(t, name, k),
        **kwargs,
    )
    if partial:
        logger.info("partial participation: %d of %d sites train each round (training.fraction-train %g)", k, n_sites, t.fraction_train)
    return strategy
