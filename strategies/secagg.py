"""Training rounds under secure aggregation (Flower SecAgg+).

Flower 1.42 offers SecAgg+ only through its legacy workflow API
(``flwr.server.workflow.SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the
client): rounds run as a legacy ``DefaultWorkflow`` with a legacy ``FedAvg``, on the same
Grid as the rest of the run. What that means for a run:

- the server only ever sees the weighted *sum* of the sites' models (masked, quantized
  to ``2**22`` levels over ``[-8, 8]``), never one site's model;
- per-round bookkeeping is thinner (no bytes or per-site seconds in the history) and a
  site that fails mid-protocol is handled by SecAgg+'s dropout recovery, not by
  ``min-nodes``;
- a site that refuses to train (privacy budget) makes the round fail;
- client-level central DP combines with it only with client-side clipping (the server
  cannot clip what it cannot see): ``central-dp = "client-fixed"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import Array, ArrayRecord, Context, RecordDict
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)

MAIN_PARAMS_RECORD = "parameters"  # where the legacy workflow keeps the global model


def secagg_plus(n_sites: int, max_weight: float) -> SecAggPlusWorkflow:
    """SecAgg+ where every site shares its key with all others and a majority can unmask."""
    if n_sites < 2:
        raise ValueError("secure aggregation needs at least 2 sites")
    shares: int | float = n_sites if n_sites > 2 else 1.0
    threshold: int | float = max(2, n_sites // 2 + 1) if n_sites > 2 else 1.0
    return SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, max_weight=max_weight)


def run_secagg_rounds(
    grid: Grid,
    *,
    arrays: ArrayRecord,
    num_rounds: int,
    round_offset: int,
    train_config: dict[str, Any],
    n_sites: int,
    max_weight: float,
    on_round: Callable[[int, ArrayRecord], None],
    history: list[dict[str, Any]],
    central_noise_multiplier: float | None = None,
    central_clipping_norm: float = 1.0,
) -> ArrayRecord:
    """Run ``num_rounds`` FedAvg rounds with SecAgg+; returns the final global arrays.

    ``on_round(round, arrays)`` is called after each round (checkpoint); ``history``
    gets one entry per round. With ``central_noise_multiplier``, Flower's legacy
    client-side fixed clipping wrapper adds client-level DP noise to the sum.
    """
    names = list(arrays.keys())

    def named(parameters: Parameters | list[Any]) -> ArrayRecord:
        values = parameters_to_ndarrays(parameters) if isinstance(parameters, Parameters) else parameters
        return ArrayRecord({n: Array(v) for n, v in zip(names, values, strict=True)})

    done = {"round": 0}

    def fit_config(server_round: int) -> dict[str, Any]:
        done["round"] = server_round
        return {**train_config, "server-round": server_round + round_offset}

    def fit_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        history.append({
            "round": done["round"] + round_offset,
            "n-sites": len(results),
            "secagg": True,
            "sites": {str(i): {k: float(v) for k, v in m.items() if isinstance(v, int | float)} for i, (_, m) in enumerate(results)},
        })
        return {}

    def evaluate(server_round: int, ndarrays: list[Any], _config: dict[str, Any]) -> None:
        if server_round > 0:
            on_round(server_round, named(ndarrays))

    strategy: Any = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n_sites,
        min_available_clients=n_sites,
        initial_parameters=ndarrays_to_parameters(arrays.to_numpy_ndarrays()),
        on_fit_config_fn=fit_config,
        evaluate_fn=evaluate,  # type: ignore[arg-type]
        fit_metrics_aggregation_fn=fit_metrics,
    )
    if central_noise_multiplier is not None:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, central_noise_multiplier, central_clipping_norm, n_sites
        )
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=num_rounds),
        strategy=strategy,
    )
    DefaultWorkflow(fit_workflow=secagg_plus(n_sites, max_weight))(grid, context)
    final = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    logger.info("secure aggregation: %d round(s) done", num_rounds)
    return named(final)
