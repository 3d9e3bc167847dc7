"""A hung site (its SuperNode is connected but never answers) is dropped after the run
config's ``message-timeout`` instead of holding the run for an hour (issue 14, item 8)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fake_grid import FakeGrid
from flwr.app import Message, RecordDict

from fedspatial.server import federation
from fedspatial.server.messaging import SiteError, SiteGroup, ask
from fedspatial.shared.config import ConfigError, ExperimentConfig


class _HungGrid(FakeGrid):
    """Nodes in ``hung`` never reply; the others reply at once."""

    def __init__(self, online: set[int], hung: set[int]) -> None:
        super().__init__(online)
        self.hung = hung

    def answer(self, message: Message) -> Message | None:
        return None if message.metadata.dst_node_id in self.hung else super().answer(message)


def test_hung_site_is_dropped_after_the_message_timeout(flower_task_identity) -> None:
    sites = SiteGroup(_HungGrid({1, 2, 3}, hung={3}), [1, 2, 3], min_nodes=2, message_timeout=0.3)
    sites.names = {1: "a", 2: "b", 3: "c"}
    start = time.monotonic()
    # a caller asking for an hour (Flower's strategies do) still waits message_timeout only
    replies = sites.send_and_receive(
        [Message(RecordDict(), dst_node_id=n, message_type="train") for n in sites.nodes], timeout=3600)
    assert time.monotonic() - start < 3
    assert len(replies) == 2 and sites.nodes == [1, 2]
    assert sites.dropped == {"c": "train: no reply within 0.3 s (message-timeout)"}
    # ... and by ask(), whose default is the group's timeout; min-nodes then stops the run
    sites._grid.hung = {2}  # type: ignore[attr-defined]
    start = time.monotonic()
    with pytest.raises(SiteError, match=r"only 1 site\(s\) left, fewer than min-nodes=2(.|\n)*- b: query.describe: no reply within 0.3 s"):
        ask(sites, sites.nodes, "describe")
    assert time.monotonic() - start < 3


class _ReversedGrid(_HungGrid):
    """Replies arrive in the reverse of the order the messages were sent."""

    def pull_messages(self, ids):
        return list(reversed(super().pull_messages(ids)))


def test_replies_come_back_in_site_name_order_whatever_the_arrival_order(flower_task_identity) -> None:
    # Flower's FedAvg sums replies in list order: arrival order would make float sums,
    # hence the model, depend on which site answered first.
    sites = SiteGroup(_ReversedGrid({1, 2, 3}, hung=set()), [1, 2, 3], min_nodes=3)
    sites.names = {1: "zurich", 2: "basel", 3: "geneva"}
    replies = sites.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)])
    assert [sites.name(sites.node_of(r)) for r in replies] == ["basel", "geneva", "zurich"]
    # the grid really delivered them in another order (the check above is not vacuous)
    raw = sites._grid.pull_messages(list(sites._grid.sent))  # type: ignore[attr-defined]
    assert [sites.node_of(r) for r in raw] == [3, 2, 1]


def test_sites_that_answer_in_time_stay(flower_task_identity) -> None:
    """Negative control: nobody hung, nobody dropped."""
    sites = SiteGroup(_HungGrid({1, 2}, hung=set()), [1, 2], min_nodes=2, message_timeout=0.3)
    assert sorted(ask(sites, sites.nodes, "describe")) == [1, 2]
    assert sites.dropped == {}


def test_run_config_message_timeout_reaches_the_sites_group(tmp_path: Path, monkeypatch) -> None:
    """`message-timeout` from the run config is the group's timeout (default 600 s)."""
    assert ExperimentConfig().training.message_timeout == 600.0
    with pytest.raises(ConfigError, match="message-timeout: must be > 0"):
        ExperimentConfig.from_run_config({"message-timeout": 0.0})
    seen: dict[str, float] = {}

    class Stop(Exception):
        pass

    def group(*args, **kwargs):
        seen["timeout"] = kwargs["message_timeout"]
        raise Stop

    monkeypatch.setattr(federation, "wait_for_nodes", lambda grid, n: [1, 2])
    monkeypatch.setattr(federation, "SiteGroup", group)
    cfg = ExperimentConfig.from_run_config({"message-timeout": 42.5, "results-dir": str(tmp_path), "run-name": "t"})
    with pytest.raises(Stop):
        federation.run_federation(None, cfg, cfg.to_run_config())  # type: ignore[arg-type]
    assert seen == {"timeout": 42.5}
