"""SpatialFedAvg: FedAvg weighting, per-round records, site-partitioned arrays."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedspatial.strategies import SpatialFedAvg


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch):
    # Flower stamps messages with the current run and task; a ServerApp has them set.
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)


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
    global_arrays = ArrayRecord({"w": Array(np.zeros(2)), "per_batch": Array(np.zeros((1, 2)))})
    sent = list(strategy.configure_train(1, global_arrays, ConfigRecord({}), _Grid([1, 2])))
    assert {m.content["config"]["server-round"] for m in sent} == {1}
    to = {m.metadata.dst_node_id: m for m in sent}
    # Site 1 (1 cell) trained batch 0, site 2 (3 cells) trained batch 1.
    replies = [
        _reply(to[1], {"w": np.array([4.0, 0.0]), "per_batch": np.array([[1.0, 0.0]])}, 1),
        _reply(to[2], {"w": np.array([0.0, 4.0]), "per_batch": np.array([[0.0, 2.0]])}, 3),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), [1.0, 3.0])  # weighted by num-examples
    assert np.allclose(arrays["per_batch"].numpy(), [[1.0, 2.0]])  # each owner's update kept whole
    assert metrics["train-loss"] == (1 * 1 + 3 * 3) / 4
    (entry,) = strategy.history
    assert entry["round"] == 1 and entry["n-sites"] == 2 and entry["bytes-sent"] > 0
    assert set(entry["sites"]) == {"1", "2"}


def test_round_offset_on_resume():
    strategy = SpatialFedAvg(round_offset=5, min_available_nodes=1, min_train_nodes=1)
    arrays = ArrayRecord({"w": Array(np.zeros(1))})
    (msg,) = strategy.configure_train(1, arrays, ConfigRecord({}), _Grid([7]))
    assert msg.content["config"]["server-round"] == 6
