"""The phase registry, the protocol vocabulary, the one codec and the fan-out order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedspatial.client.app import app as client_app
from fedspatial.client.site import ContextState
from fedspatial.records import from_recorddict, to_recorddict
from fedspatial.server.federation import FlowerFederation
from fedspatial.server.messaging import SiteGroup
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.phases import PHASES, all_queries, phase_for
from fedspatial.shared.phases.base import (
    Federation,
    MemoryState,
    Phase,
    Run,
    Site,
    TrainOutcome,
    Weights,
)
from fedspatial.shared.protocol.names import Query, message_type
from fedspatial.shared.protocol.payload import Payload, PayloadError


@pytest.fixture
def _run_identity(flower_task_identity) -> None:
    """Flower stamps messages with the current run and task; a ServerApp has them set."""


def test_phases_run_in_the_documented_order() -> None:
    assert [p.name for p in PHASES] == [
        "describe", "feature space", "PCA", "small-panel mapping", "training",
        "embedding", "Harmony", "k-means", "dp k-means", "mixture", "finalize", "calibration", "markers",
    ]


def test_every_query_belongs_to_one_phase_and_the_client_answers_it() -> None:
    assert sorted(all_queries()) == sorted(Query)  # no query without a phase, none twice
    for query in Query:
        assert query in phase_for(query).queries
    # The ClientApp registers one handler per query, under its Flower message type.
    registered = set(client_app._registered_funcs)
    expected = {f"{message_type(q)}.default" if q in (Query.TRAIN, Query.EVALUATE) else message_type(q) for q in Query}
    assert registered == expected
    with pytest.raises(LookupError, match="exactly one"):
        phase_for("no_such_query")


def test_payload_round_trips_through_flower_records() -> None:
    payload = Payload(
        arrays={"centroids@0": np.arange(6, dtype=np.float64).reshape(2, 3), "n": np.array([4], dtype=np.int64)},
        config={"stage": "power", "features": ["a", "b"], "empty": [], "seed": 3, "refine": True},
        metrics={"num-examples": 12, "loss": 0.5},
    )
    back = from_recorddict(to_recorddict(payload))
    assert sorted(back.arrays) == sorted(payload.arrays)
    for key, value in payload.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], value)
        assert back.arrays[key].dtype == value.dtype
    # Flower cannot carry an empty list: it is left out, and read back as empty.
    assert "empty" not in back.config and back.strings("empty") == []
    assert back.strings("features") == ["a", "b"] and back.number("seed") == 3 and back.flag("refine")
    assert back.metrics == {"num-examples": 12, "loss": 0.5}
    with pytest.raises(PayloadError, match="'stage' must be a number"):
        back.number("stage")
    with pytest.raises(PayloadError, match="has no array 'basis'"):
        back.array("basis")


def test_site_state_keeps_payloads_in_flower_records() -> None:
    records = RecordDict()
    state = ContextState(records)
    state.put("k", Payload(arrays={"z": np.ones((2, 2))}, config={"names": ["x"], "none": []}))
    assert "k" in records and "k.config" in records
    got = state.get("k")
    assert got is not None and got.strings("names") == ["x"] and got.array("z").shape == (2, 2)
    state.put("k", Payload(config={"only": 1}))  # replacing drops the old arrays
    assert state.get("k") == Payload(config={"only": 1})
    state.delete("k")
    assert state.get("k") is None and not records


class _ReversedGrid:
    """Answers every ``query.describe`` at once, replies in reverse order of sending."""

    def __init__(self, names: Mapping[int, str]) -> None:
        self.names = names
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.names)

    def push_messages(self, messages: Sequence[Message]) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            site = self.names[msg.metadata.dst_node_id]
            reply = RecordDict({"config": ConfigRecord({"site": site}), **to_recorddict(Payload(metrics={"num-examples": 1}))})
            self.replies.append(Message(reply, reply_to=msg))
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: Sequence[str]) -> list[Message]:
        out, self.replies = list(reversed(self.replies)), []
        return out


@pytest.mark.usefixtures("_run_identity")
def test_federation_names_sites_and_returns_replies_in_site_name_order() -> None:
    names = {30: "hospital_a", 10: "hospital_c", 20: "hospital_b"}
    group = SiteGroup(_ReversedGrid(names), sorted(names), min_nodes=3)  # type: ignore[arg-type]
    fed = FlowerFederation(group, {"seed": 1})
    assert fed.sites == ["node 10", "node 20", "node 30"]
    replies = fed.ask(Query.DESCRIBE)
    fed.rename({key: reply.string("site") for key, reply in replies.items()})
    assert fed.sites == ["hospital_a", "hospital_b", "hospital_c"]
    assert list(fed.ask(Query.DESCRIBE)) == ["hospital_a", "hospital_b", "hospital_c"]
    assert list(fed.ask(Query.DESCRIBE, sites=["hospital_c", "hospital_a"])) == ["hospital_a", "hospital_c"]


# ------------------------------------------------------------------ adding a phase
class SectionSizes(Phase):
    """The smallest real phase: cells per section, summed over the federation (the
    README's "Adding a phase" example)."""

    name = "section sizes"
    queries = ("section_sizes",)

    def run(self, fed: Federation, run: Run) -> None:
        replies = fed.ask("section_sizes")
        run.report["cells"] = int(sum(r.metrics["cells"] for r in replies.values()))

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        return Payload(metrics={"cells": sum(s.adata.n_obs for s in site.sections)})


class LocalFederation:
    """Routes each query straight to the owning phase's site half (no Flower)."""

    def __init__(self, sites: Mapping[str, Any], phases: tuple[Phase, ...]) -> None:
        self._sites, self.phases = dict(sites), phases

    @property
    def sites(self) -> list[str]:
        return sorted(self._sites)

    def ask(self, query: str, payload: Any = None, *, sites: Sequence[str] | None = None, require_all: bool = False) -> dict[str, Payload]:
        phase = phase_for(query, self.phases)
        return {name: phase.answer(self._sites[name], query, payload or Payload()) for name in sorted(sites or self.sites)}

    def rename(self, names: Mapping[str, str]) -> None:
        raise NotImplementedError

    def train(self, run: Run, initial: Weights, *, done_rounds: int, history: list[dict[str, Any]]) -> TrainOutcome:
        raise NotImplementedError


def test_a_new_phase_is_one_class_and_one_registry_entry(tmp_path: Path) -> None:
    phases = (*PHASES, SectionSizes())
    assert phase_for("section_sizes", phases).name == "section sizes"

    def site(*sizes: int) -> SimpleNamespace:
        return SimpleNamespace(sections=[SimpleNamespace(adata=SimpleNamespace(n_obs=n)) for n in sizes], state=MemoryState())

    fed = LocalFederation({"a": site(3, 4), "b": site(5)}, phases)
    run = Run(ExperimentConfig(), {}, tmp_path)
    SectionSizes().run(fed, run)
    assert run.report["cells"] == 12
