"""A site's name is self-declared (node config ``site-name``): the run binds it to the
name its key was registered with and refuses a second node claiming the same site
(issue 14, item 7)."""

from __future__ import annotations

import pytest
from fake_grid import FakeGrid
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from fedspatial.server.federation import FlowerFederation
from fedspatial.server.messaging import SiteError, SiteGroup
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.phases.base import Run
from fedspatial.shared.phases.describe import Describe

FIX = "flwr supernode register KEY.pub CONNECTION --name SITE"


class _Grid(FakeGrid):
    """Each node answers describe as the site it claims; ``registered``: names of the keys."""

    def __init__(self, claims: dict[int, str], registered: dict[int, str]) -> None:
        super().__init__(claims)
        self.claims, self.registered = claims, registered

    def get_nodes(self):
        return [NodeInfo(node_id=n, name=self.registered.get(n, "")) for n in sorted(self.claims)]

    def answer(self, message: Message) -> Message:
        site = self.claims[message.metadata.dst_node_id]
        node = message.metadata.dst_node_id
        config = {"site": site, "sections": [f"{site}/s{node}"], "section-sites": [site],
                  "section-sizes": [10 + node], "section-features": "{}", "labels": ["x"]}
        content = RecordDict({"config": ConfigRecord(config), "metrics": MetricRecord({"num-examples": 10 + node})})
        return Message(content, reply_to=message)


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity) -> None:
    """Every test here builds server messages."""


def _describe(claims: dict[int, str], registered: dict[int, str], min_nodes: int = 1) -> tuple[SiteGroup, Run]:
    group = SiteGroup(_Grid(claims, registered), sorted(claims), min_nodes=min_nodes)  # type: ignore[arg-type]
    run = Run(ExperimentConfig(), {}, None, started=0.0)  # type: ignore[arg-type]
    Describe().run(FlowerFederation(group, {}), run)
    return group, run


def test_registered_names_bind_the_sites() -> None:
    """Negative control: each node says the name its key was registered with."""
    group, run = _describe({1: "hospital_a", 2: "hospital_b"}, {1: "hospital_a", 2: "hospital_b"})
    assert sorted(run.sites) == ["hospital_a", "hospital_b"] and group.dropped == {}


def test_a_node_claiming_another_sites_name_is_dropped() -> None:
    # node 3's key was registered as 'intruder'; it says it is hospital_a (and answers first)
    group, run = _describe({1: "hospital_a", 2: "hospital_b", 3: "hospital_a"},
                           {1: "hospital_a", 2: "hospital_b", 3: "intruder"})
    assert sorted(run.sites) == ["hospital_a", "hospital_b"]
    assert run.sites["hospital_a"].n_cells == 11  # node 1's description, not the impostor's
    assert group.nodes == [1, 2]
    # named after its key's registration, not its claim or a bare node id
    assert group.dropped == {"intruder (registered key; node 3)": f"describe: says it is site 'hospital_a' but its key is registered as 'intruder'; "
                                       f"the center registers each hospital's key with its site name: `{FIX}`"}


def test_duplicate_site_names_without_registered_names_are_all_refused() -> None:
    group, run = _describe({1: "hospital_a", 2: "hospital_a", 3: "hospital_b"}, {})
    assert list(run.sites) == ["hospital_b"] and group.nodes == [3]
    assert all("2 nodes say they are site 'hospital_a'" in why for why in group.dropped.values())
    # ... and the run stops when that leaves fewer than min-nodes
    with pytest.raises(SiteError, match="fewer than min-nodes=2"):
        _describe({1: "hospital_a", 2: "hospital_a"}, {}, min_nodes=2)
