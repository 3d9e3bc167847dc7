"""Federated Harmony over Flower messages: the Harmony phase's server half (through the
run's Flower federation) and site half, state kept only in ``context.state``
(serialized between every message), against the in-memory reference and pooled
harmonypy."""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedspatial.client.site import ContextState
from fedspatial.records import from_recorddict, to_recorddict
from fedspatial.server.federation import FlowerFederation
from fedspatial.server.integration_report import POOLED, SITE_COMPUTABLE, write_integration_report
from fedspatial.server.messaging import SiteError, SiteGroup
from fedspatial.shared.algorithms.harmony import HarmonySite, federated_harmony
from fedspatial.shared.phases.embedding import EMBEDDING_KEY, UNCORRECTED, uncorrected_embedding
from fedspatial.shared.phases.harmony import (
    KIND_KEY,
    STATE_KEY,
    HarmonyPhase,
    cell_batches,
    federated_harmony_rounds,
    harmony_reply,
    has_harmony_site,
    load_harmony_site,
    save_harmony_site,
)
from fedspatial.shared.protocol.names import Query
from fedspatial.shared.protocol.payload import Payload


@pytest.fixture(autouse=True)
def _run_identity(flower_task_identity) -> None:
    """Flower stamps messages with the current run and task; a ServerApp has them set."""


# Fewer rounds than harmonypy's defaults (5 blocks per pass, 3 iterations), same code paths.
FAST: dict[str, Any] = {"block_size": 0.2, "max_iter_harmony": 3}
# Node ids deliberately out of site-name order: the protocol orders sites by name.
NAMES = {30: "hospital_a", 10: "hospital_b", 20: "hospital_c"}
# Per site: (section name, cells); section batches span the three sites' own sections.
SECTIONS = {
    "hospital_a": [("s1", 71), ("s2", 80)],
    "hospital_b": [("s1", 66), ("s2", 71)],
    "hospital_c": [("s1", 122)],
}


def _sections(site: str) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(site=site, key=f"{site}/{name}", adata=SimpleNamespace(n_obs=n))
        for name, n in SECTIONS[site]
    ]


def _embeddings(seed: int = 0, d: int = 8) -> dict[str, np.ndarray]:
    """Three cell types; every section shifted by its own batch effect. float32, as a
    site's embedding is."""
    rng = np.random.default_rng(seed)
    types = rng.normal(size=(3, d)) * 3
    out = {}
    for site, sections in SECTIONS.items():
        parts = []
        for _, n in sections:
            shift = rng.normal(size=d) * 2
            parts.append(types[rng.integers(0, 3, n)] + shift + 0.5 * rng.normal(size=(n, d)))
        out[site] = np.vstack(parts).astype(np.float32)
    return out


class _Grid:
    """Delivers each message to its site's Harmony phase with a real Flower ``Context``
    whose state is serialized (protobuf) after every message and rebuilt before the
    next, so nothing survives between messages but ``context.state``."""

    def __init__(self, embeddings: Mapping[str, np.ndarray]) -> None:
        self.state: dict[int, bytes] = {}
        for node, site in NAMES.items():
            state = RecordDict({EMBEDDING_KEY: ArrayRecord({"z": Array(embeddings[site])})})
            self.state[node] = recorddict_to_proto(state).SerializeToString()
        self.sent: dict[str, Message] = {}
        self.replies: dict[str, Message] = {}
        self.reply_shapes: list[tuple[str, tuple[int, ...]]] = []
        self.fail: set[int] = set()

    def get_node_ids(self) -> list[int]:
        return sorted(NAMES)

    def context(self, node: int) -> Context:
        proto = ProtoRecordDict()
        proto.ParseFromString(self.state[node])
        return Context(run_id=1, node_id=node, node_config={}, state=recorddict_from_proto(proto), run_config={})

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            assert msg.metadata.message_type == "query.harmony"
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent[msg.metadata.message_id] = msg
            context = self.context(node)
            self.replies[msg.metadata.message_id] = self.handle(msg, context, node)
            self.state[node] = recorddict_to_proto(context.state).SerializeToString()
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self.replies.pop(mid) for mid in message_ids if mid in self.replies]

    def handle(self, msg: Message, context: Context, node: int) -> Message:
        """What the ClientApp's ``query.harmony`` handler does."""
        if node in self.fail:
            from flwr.app import Error

            return Message(Error(code=0, reason="site crashed"), reply_to=msg)
        request = from_recorddict(msg.content)
        site = SimpleNamespace(sections=_sections(NAMES[node]), state=ContextState(context.state), n_cells=1)
        reply = HarmonyPhase().answer(site, Query.HARMONY, request)  # type: ignore[arg-type]
        self.reply_shapes += [(request.string(KIND_KEY), np.shape(v)) for v in reply.arrays.values()]
        return Message(content=to_recorddict(reply), reply_to=msg)


def _site_order() -> list[str]:
    return sorted(NAMES.values())


def _section_batches() -> tuple[list[str], dict[str, np.ndarray]]:
    names = sorted(s.key for site in SECTIONS for s in _sections(site))
    return names, {site: cell_batches(_sections(site), "section", names) for site in SECTIONS}


def _run(grid: _Grid, **kwargs: Any) -> dict[str, Any]:
    batches, _ = _section_batches()
    group = SiteGroup(grid, sorted(NAMES), min_nodes=1)  # type: ignore[arg-type]
    group.names.update(NAMES)
    fed = FlowerFederation(group, {})
    return federated_harmony_rounds(fed, batches=batches, batch="section", **kwargs)


def _state_of(grid: _Grid, site: str) -> Context:
    node = next(n for n, s in NAMES.items() if s == site)
    return grid.context(node)


def test_flower_rounds_equal_the_in_memory_reference() -> None:
    Z = _embeddings()
    grid = _Grid(Z)
    info = _run(grid, seed=3, n_clusters=6, n_domains=3, **FAST)
    _, codes = _section_batches()
    expected = federated_harmony(
        [Z[s].astype(np.float64) for s in _site_order()],
        [codes[s] for s in _site_order()],
        n_batches=5, nclust=6, random_state=3, **FAST,
    )
    for site, want in zip(_site_order(), expected, strict=True):
        context = _state_of(grid, site)
        record = context.state.array_records[EMBEDDING_KEY]
        assert np.abs(record["z"].numpy() - want).max() < 1e-6
        # The uncorrected embedding is kept beside it; the Harmony state is gone.
        np.testing.assert_array_equal(uncorrected_embedding(ContextState(context.state)), Z[site])
        np.testing.assert_array_equal(record[UNCORRECTED].numpy(), Z[site])
        assert not has_harmony_site(ContextState(context.state))
        assert np.abs(want - Z[site]).max() > 0.1  # it did correct something
    assert info["iterations"] >= 1 and info["rounds"] > 10 and info["n_clusters"] == 6
    # Domain proposals of the corrected embeddings, one per site in name order.
    assert list(info["proposals"]) == _site_order()
    assert all(p["centroids"].shape == (3, 8) for p in info["proposals"].values())
    # Replies are cluster-level: no reply has a dimension of a site's cell count.
    sizes = {n for secs in SECTIONS.values() for n in (sum(c for _, c in secs),)}
    assert not [(k, s) for k, s in grid.reply_shapes if set(s) & sizes and k != "load"]


def test_flower_rounds_equal_pooled_harmonypy_given_its_initialization() -> None:
    hm = pytest.importorskip("harmonypy")
    import pandas as pd

    Z = _embeddings(seed=1)
    batches, codes = _section_batches()
    pooled = np.vstack([Z[s] for s in _site_order()]).astype(np.float64)
    meta = pd.DataFrame({"batch": [batches[c] for s in _site_order() for c in codes[s]]})
    params = {"nclust": 5, "random_state": 2, "block_size": FAST["block_size"]}
    init = hm.run_harmony(pooled, meta, "batch", verbose=False, max_iter_harmony=0, **params)
    expected = hm.run_harmony(pooled, meta, "batch", verbose=False, max_iter_harmony=3, **params).Z_corr
    grid = _Grid(Z)
    _run(grid, seed=2, init_centroids=np.asarray(init.Y).T, max_iter_harmony=3, block_size=FAST["block_size"])
    got = np.vstack([_state_of(grid, s).state.array_records[EMBEDDING_KEY]["z"].numpy() for s in _site_order()])
    assert np.abs(got - np.asarray(expected)).max() < 1e-5  # the README states 1e-5


def test_a_second_run_starts_from_the_uncorrected_embedding() -> None:
    grid = _Grid(_embeddings())
    _run(grid, seed=0, n_clusters=4, **FAST)
    first = {s: _state_of(grid, s).state.array_records[EMBEDDING_KEY]["z"].numpy() for s in _site_order()}
    _run(grid, seed=0, n_clusters=4, **FAST)
    for site in _site_order():
        np.testing.assert_array_equal(_state_of(grid, site).state.array_records[EMBEDDING_KEY]["z"].numpy(), first[site])


def test_site_batches_by_site_and_errors() -> None:
    secs = _sections("hospital_a")
    np.testing.assert_array_equal(cell_batches(secs, "site", ["hospital_a", "hospital_b"]), np.zeros(151))
    by_section = cell_batches(secs, "section", ["hospital_a/s1", "hospital_a/s2"])
    assert by_section[:71].max() == 0 and by_section[71:].min() == 1
    with pytest.raises(ValueError, match="not among the federation's batches"):
        cell_batches(secs, "section", ["hospital_a/s1"])
    with pytest.raises(ValueError, match="must be one of"):
        cell_batches(secs, "donor", ["hospital_a"])


def test_state_round_trip_and_missing_state() -> None:
    rng = np.random.default_rng(0)
    site = HarmonySite(rng.normal(size=(20, 3)), rng.integers(0, 2, 20))
    site.handle({"kind": "counts", "n_batches": 2})
    site.handle({"kind": "assign", "centroids": rng.normal(size=(4, 3)), "sigma": np.full(4, 0.1)})
    records = RecordDict()
    state = ContextState(records)
    with pytest.raises(RuntimeError, match="no federated Harmony state"):
        load_harmony_site(state)
    save_harmony_site(state, site)
    back = load_harmony_site(state)
    for name in ("Z_orig", "batches", "corrected", "_R", "_dist", "_sigma"):
        np.testing.assert_array_equal(getattr(back, name), getattr(site, name))
    assert back._n_batches == 2 and STATE_KEY in records
    # Without an embedding the site says what is missing.
    with pytest.raises(RuntimeError, match=r"query\.embed"):
        harmony_reply([], ContextState(RecordDict()), Payload(config={KIND_KEY: "load"}))


def test_a_lost_site_stops_the_protocol_with_its_name() -> None:
    grid = _Grid(_embeddings())
    grid.fail = {20}
    with pytest.raises(SiteError, match="hospital_c"):
        _run(grid, seed=0, n_clusters=4)


# ----------------------------------------------------------------------------- report
def _annotated(tmp_path: Any, corrected: bool) -> Any:
    """Two sites' annotated sections as a simulation writes them: sites apart before
    correction, mixed after; two labelled types, a few unlabelled cells."""
    rng = np.random.default_rng(0)
    mode = tmp_path / "federated"
    for s, site in enumerate(("hospital_a", "hospital_b")):
        for section in ("s1", "s2"):
            n = 60
            kind = rng.integers(0, 2, n)
            after = np.eye(4)[kind] * 4 + 0.3 * rng.normal(size=(n, 4))
            labels = pd.Series(np.where(kind == 0, "L0", "L1"), dtype=object)
            labels[:3] = np.nan
            adata = ad.AnnData(
                np.zeros((n, 1), dtype=np.float32),
                obs=pd.DataFrame(
                    {"domain": labels.to_numpy(), "fedspatial_domain": pd.Categorical(kind.astype(str))},
                    index=[f"{site}{section}{i}" for i in range(n)],
                ),
            )
            adata.obsm["X_fedspatial"] = after
            if corrected:
                adata.obsm["X_fedspatial_uncorrected"] = after + 6.0 * s
            folder = mode / "sites" / site
            folder.mkdir(parents=True, exist_ok=True)
            adata.write_h5ad(folder / f"{site}__{section}.h5ad")
    return mode


def test_integration_report_before_and_after(tmp_path: Any) -> None:
    mode = _annotated(tmp_path, corrected=True)
    summary = write_integration_report(mode, batch_key="site", layout="pca")
    pooled = summary[POOLED]
    assert pooled["before"]["ilisi"] < 0.1 < 0.5 < pooled["after"]["ilisi"]
    assert pooled["after"]["ari"] > 0.9 and summary["n_labelled"] == 4 * 57
    # Domains are the types: exact ARI from the summed count tables (site-computable).
    assert summary[SITE_COMPUTABLE]["domains"]["ari"] == pytest.approx(1.0)
    assert json.loads((mode / "integration.json").read_text())["corrected"] is True
    assert (mode / "embedding_before_after.png").stat().st_size > 1000
    assert "pooled (simulation only)" in (mode / "integration.md").read_text()


def test_integration_report_without_correction(tmp_path: Any) -> None:
    mode = _annotated(tmp_path, corrected=False)
    summary = write_integration_report(mode, batch_key="section", layout="pca")
    assert set(summary[POOLED]) == {"after"} and not summary["corrected"]
    assert summary["n_batches"] == 4
    with pytest.raises(ValueError, match="batch_key"):
        write_integration_report(mode, batch_key="donor", layout="pca")
