"""SpatialFedAvg: FedAvg weighting, per-round records, site-partitioned arrays."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedspatial.strategies import SpatialFedAvg


@pytest.fixture(autouse=True)
def _run_identity(flower_task_identity) -> None:
    """Flower stamps messages with the current run and task; a ServerApp has them set."""


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _reply(request, arrays, n):
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": float(n)}),
        }
    )
    return Message(content=content, reply_to=request)


def test_weighted_average_and_summed_partitioned_updates():
    strategy = SpatialFedAvg(partitioned_keys=["per_batch"], min_available_nodes=2, min_train_nodes=2)
    # A non-zero global model: "global + summed updates" differs from "sum of replies".
    global_arrays = ArrayRecord({"w": Array(np.zeros(2)), "per_batch": Array(np.array([[10.0, 20.0]]))})
    sent = list(strategy.configure_train(1, global_arrays, ConfigRecord({}), _Grid([1, 2])))
    assert {m.content["config"]["server-round"] for m in sent} == {1}
    to = {m.metadata.dst_node_id: m for m in sent}
    # Site 1 (1 cell) trained batch 0, site 2 (3 cells) trained batch 1.
    replies = [
        _reply(to[1], {"w": np.array([4.0, 0.0]), "per_batch": np.array([[11.0, 20.0]])}, 1),
        _reply(to[2], {"w": np.array([0.0, 4.0]), "per_batch": np.array([[10.0, 22.0]])}, 3),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), [1.0, 3.0])  # weighted by num-examples
    # each owner's update kept whole: global + (1, 0) + (0, 2); a weighted mean would give
    # (10.25, 21.5) and a plain sum of replies (21, 42)
    assert np.allclose(arrays["per_batch"].numpy(), [[11.0, 22.0]])
    assert metrics["train-loss"] == (1 * 1 + 3 * 3) / 4
    (entry,) = strategy.history
    assert entry["round"] == 1 and entry["n-sites"] == 2 and entry["bytes-sent"] > 0
    assert set(entry["sites"]) == {"1", "2"}


def test_round_offset_on_resume():
    strategy = SpatialFedAvg(round_offset=5, min_available_nodes=1, min_train_nodes=1)
    arrays = ArrayRecord({"w": Array(np.zeros(1))})
    (msg,) = strategy.configure_train(1, arrays, ConfigRecord({}), _Grid([7]))
    assert msg.content["config"]["server-round"] == 6


def _refusal(request, reason):
    from flwr.app import Error

    from fedspatial.shared.privacy.dp import PRIVACY_BUDGET_ERROR

    return Message(Error(code=PRIVACY_BUDGET_ERROR, reason=reason), reply_to=request)


def test_budget_guard_stops_or_continues_without_the_refusing_site():
    from fedspatial.strategies import PrivacyBudgetGuard, PrivacyBudgetStop

    arrays = ArrayRecord({"w": Array(np.zeros(2))})
    for mode in ("stop", "continue"):
        inner = SpatialFedAvg(min_available_nodes=2, min_train_nodes=2)
        guard = PrivacyBudgetGuard(inner, on_exhausted=mode)
        sent = {m.metadata.dst_node_id: m for m in guard.configure_train(1, arrays, ConfigRecord({}), _Grid([1, 2]))}
        replies = [_reply(sent[1], {"w": np.array([2.0, 2.0])}, 1), _refusal(sent[2], "privacy budget exhausted at site b")]
        if mode == "stop":
            with pytest.raises(PrivacyBudgetStop, match="site b") as err:
                guard.aggregate_train(1, replies)
            assert err.value.server_round == 1 and not inner.history  # the round is not aggregated
        else:
            out, _ = guard.aggregate_train(1, replies)
            assert np.allclose(out["w"].numpy(), [2.0, 2.0]) and inner.history[0]["n-sites"] == 1
        assert list(guard.refusals[1].values()) == ["privacy budget exhausted at site b"]


def test_central_dp_wrappers_and_client_level_epsilon():
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideAdaptiveClipping

    from fedspatial.strategies import central_dp, central_dp_epsilon

    wrapped = central_dp(SpatialFedAvg(), "client-adaptive", noise_multiplier=1.0, clipping_norm=0.5, n_sites=3)
    assert isinstance(wrapped, DifferentialPrivacyClientSideAdaptiveClipping) and wrapped.clipping_norm == 0.5
    with pytest.raises(ValueError, match="unknown central-dp"):
        central_dp(SpatialFedAvg(), "local", noise_multiplier=1.0, clipping_norm=1.0, n_sites=3)
    assert 0 < central_dp_epsilon(1.0, 10, 1e-5) < central_dp_epsilon(1.0, 30, 1e-5)
