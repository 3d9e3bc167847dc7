"""No cells leave a site: every message of runs that switch every phase on is inspected.

Every array a site sends must have only dimensions the run's settings explain (model
shapes, feature counts, components, domains, Harmony's clusters, batches and blocks);
none may equal a site's or a section's cell count; every config entry must be small and
hold no list as long as a cell count. Two runs cover every phase and every protection:
PCA + a small-panel site + Harmony + a mixture with two starts + SecAgg+, and local DP
(noised feature statistics, DP-SGD) + SecAgg+ with client-side central DP. A third run
pretrains the Novae encoder (``model.encoder: novae``, needs ``fedspatial[fm]``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
from flwr.app import Message

from fedspatial.server import messaging
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation
from fedspatial.shared.evaluation.calibration import TEMPERATURES
from fedspatial.shared.protocol.names import Query, message_type
from fedspatial.simulation import simulate

pytestmark = [pytest.mark.flower, pytest.mark.filterwarnings("ignore:Full backward hook")]

CONFIG_BYTES = 64 * 1024  # per reply: settings, names and a site's report, never cell tables


@pytest.fixture
def messages(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[Message], list[Message]]]:
    """(sent, replies) of every exchange between the server and the sites."""
    seen: list[tuple[list[Message], list[Message]]] = []
    original = messaging.SiteGroup.send_and_receive

    def recording(self: Any, *args: Any, **kwargs: Any) -> list[Message]:
        msgs = list(args[0] if args else kwargs.pop("messages"))  # Flower's strategies pass messages=
        replies = original(self, msgs, **kwargs)
        seen.append((msgs, replies))
        return replies

    monkeypatch.setattr(messaging.SiteGroup, "send_and_receive", recording)
    return seen


def _federation(root: Path, *, small_panel: bool) -> tuple[Path, set[int]]:
    # Sizes chosen so that no cell count collides with a dimension the settings allow.
    spec = dataclasses.replace(SyntheticSpec(seed=7), spots_per_section=(131, 173), n_features=90)
    manifest = write_synthetic_federation(root, spec)
    counts: set[int] = set()
    for site in sorted(p for p in root.iterdir() if p.is_dir()):
        sizes = []
        for path in sorted(site.glob("*.h5ad")):
            a = ad.read_h5ad(path)
            if small_panel and site.name == "hospital_c":
                a = a[:, a.var_names[::3]].copy()  # a 30-gene targeted panel
                a.write_h5ad(path)
            sizes.append(a.n_obs)
        counts |= set(sizes) | {sum(sizes)}
    return manifest, counts


def _config(manifest: Path, results: Path, name: str, **sections: Any) -> ExperimentConfig:
    base: dict[str, Any] = {
        "run-name": name,
        "results-dir": str(results),
        "data": {"manifest": str(manifest)},
        "features": {"n-top-features": 48},
        "model": {"hidden-dim": 16, "latent-dim": 6},
        "training": {"num-rounds": 2, "batch-size": 64, "local-epochs": 1},
        "clustering": {"n-domains": 4},
        "simulation": {"modes": ["federated"]},
    }
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return ExperimentConfig.from_dict(base)


def _allowed_dims(run: Path, cfg: ExperimentConfig, extra: Iterable[int]) -> set[int]:
    """Every array dimension the run's settings explain."""
    model = json.loads((run / "model" / "model.json").read_text())["model"]
    report = json.loads((run / "metrics.json").read_text())
    from fedspatial.shared.storage.checkpoint import load_checkpoint

    weights, _ = load_checkpoint(run / "model")
    dims = {1, cfg.clustering.n_domains, *(model[k] for k in ("in_dim", "hidden_dim", "latent_dim") if k in model)}
    dims |= {d for t in weights.state_dict().values() for d in t.shape}
    dims |= {report["n-features-shared"], report["n-features-selected"]}
    pcs = cfg.features.n_pcs or (model.get("embedding_size", 0) if model.get("kind") == "novae" else 0)
    if pcs:  # PCA's axes and block (with novae: the gene embeddings' start)
        dims |= {pcs, min(report["n-features-selected"], pcs + 10)}
    dims |= {m["n-features-shared"] for m in report["mapped-panels"].values()}
    if "n-genes" in report.get("markers", {}):  # marker sums: domains x genes every section shares
        dims.add(report["markers"]["n-genes"])
    # DP k-means' second release over-clusters by as many groups as the (public) noise allows
    dims |= {int(h["centroids"]) for h in report.get("dp-kmeans-history", [])}
    if "temperature" in report.get("calibration", {}):  # the calibration loss: one sum per candidate temperature
        dims.add(len(TEMPERATURES))
    return dims | set(extra)


def _inspect(exchanges: list[tuple[list[Message], list[Message]]], cells: set[int], allowed: set[int]) -> set[str]:
    assert not cells & allowed, "pick other cell counts: they collide with allowed dimensions"
    types = set()
    for sent, replies in exchanges:
        for msg in sent:  # the server's requests: bounded settings, whatever it sends
            for record in msg.content.config_records.values():
                assert len(json.dumps({k: str(v) for k, v in record.items()})) < 4 * CONFIG_BYTES
        for reply in replies:
            if reply.has_error():
                continue
            kind = reply.metadata.message_type
            types.add(kind)
            for record in reply.content.array_records.values():
                for key, array in record.items():
                    shape = array.numpy().shape
                    assert set(shape) <= allowed and not set(shape) & cells, (kind, key, shape)
            for record in reply.content.metric_records.values():
                assert all(isinstance(v, int | float) and math.isfinite(v) for v in record.values()), (kind, record)
            for record in reply.content.config_records.values():
                size = 0
                for key, value in record.items():
                    size += len(value) if isinstance(value, str | bytes) else 8 * (len(value) if isinstance(value, list) else 1)
                    if isinstance(value, list):
                        assert len(value) not in cells, (kind, key, len(value))
                    if isinstance(value, str) and value[:1] in "[{":
                        _walk(json.loads(value), cells, (kind, key))
                assert size < CONFIG_BYTES, (kind, size)
    return types


def _walk(node: Any, cells: set[int], where: tuple[str, str]) -> None:
    if isinstance(node, list):
        assert len(node) not in cells, where
        for v in node:
            _walk(v, cells, where)
    elif isinstance(node, dict):
        assert len(node) not in cells, where
        for v in node.values():
            _walk(v, cells, where)


def test_the_inspection_catches_cells(flower_task_identity) -> None:
    """The check can fail: an array or a config list as long as a section is caught."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    request = Message(RecordDict(), dst_node_id=1, message_type="query.embed")
    request.metadata.__dict__["_message_id"] = "m1"

    def reply(content: RecordDict) -> Message:
        return Message(content, reply_to=request)

    ok = reply(RecordDict({"arrays": ArrayRecord({"centroids": Array(np.zeros((4, 6)))})}))
    assert _inspect([([request], [ok])], {131}, {4, 6}) == {"query.embed"}
    leaky = reply(RecordDict({"arrays": ArrayRecord({"z": Array(np.zeros((6, 131)))})}))
    with pytest.raises(AssertionError):
        _inspect([([request], [leaky])], {131}, {4, 6})
    unexplained = reply(RecordDict({"arrays": ArrayRecord({"z": Array(np.zeros((4, 7)))})}))
    with pytest.raises(AssertionError):
        _inspect([([request], [unexplained])], {131}, {4, 6})
    table = reply(RecordDict({"config": ConfigRecord({"report": json.dumps({"cells": list(range(131))})})}))
    with pytest.raises(AssertionError):
        _inspect([([request], [table])], {131}, {4, 6})


def test_every_phase_with_secure_aggregation(tmp_path: Path, messages: list) -> None:
    manifest, cells = _federation(tmp_path / "data", small_panel=True)
    cfg = _config(
        manifest, tmp_path, "all",
        features={"n-pcs": 8},
        clustering={"mixture": "tied", "n-init": 2, "harmony": "section", "harmony-clusters": 5, "harmony-max-iter": 2},
        privacy={"secagg": True},
    )
    simulate(cfg)
    run = tmp_path / "all" / "federated"
    n_sections = len(json.loads((run / "metrics.json").read_text())["sections"])
    blocks = math.ceil(1 / 0.05)  # Harmony's block_size default
    allowed = _allowed_dims(run, cfg, [5, n_sections, blocks])
    types = _inspect(messages, cells, allowed)
    # Every non-private phase's queries really ran (training went through SecAgg+'s train
    # messages); DP k-means runs only under local DP (the next test).
    assert {message_type(q) for q in Query if q not in (Query.EVALUATE, Query.DP_CLUSTER_STATS)} <= types
    assert message_type(Query.DP_CLUSTER_STATS) not in types


def test_local_dp_with_secure_aggregation_and_client_side_dp(tmp_path: Path, messages: list) -> None:
    manifest, cells = _federation(tmp_path / "data", small_panel=False)
    cfg = _config(
        manifest, tmp_path, "private",
        privacy={
            "local-dp": True, "target-epsilon": 8.0, "feature-stats-noise": 5.0, "secagg": True,
            "central-dp": "client-fixed", "central-noise-multiplier": 0.3, "central-clipping-norm": 5.0,
        },
    )
    simulate(cfg)
    run = tmp_path / "private" / "federated"
    report = json.loads((run / "metrics.json").read_text())
    assert report["privacy"]["secagg"] and report["privacy"]["central"]["mode"] == "client-fixed"
    for ledger_file in sorted((run / "sites").glob("*/privacy_ledger.json")):
        ledger = json.loads(ledger_file.read_text())
        kinds = {r["kind"] for r in ledger["releases"]}
        # Every release is on the ledger: feature statistics, DP-SGD, DP k-means, DP tables.
        assert kinds == {"feature-stats", "dp-sgd", "dp-kmeans", "dp-table"}
        assert ledger["epsilon"] <= 8.0 * 1.0001
    types = _inspect(messages, cells, _allowed_dims(run, cfg, []))
    assert {"train", "query.feature_stats", "query.dp_cluster_stats", "query.finalize"} <= types
    # No exact clustering statistics and no un-noised evaluation loss left any site.
    assert not types & {"query.kmeans", "query.mixture", "evaluate", "query.evaluate"}
    # Marker genes and the confidence's temperature are refused under local DP: no marker
    # statistics or calibration losses left any site.
    assert "query.markers" not in types and "privacy.local-dp" in report["markers"]["skipped"]
    assert "query.calibration" not in types and "temperature" not in report.get("calibration", {})
    # ... and finalize sent no per-confidence-bin tables (finer than the contingency table).
    assert "before" not in report.get("calibration", {})
    assert not (run / "markers.csv").exists()


@pytest.mark.skipif(importlib.util.find_spec("novae") is None, reason="needs novae (pip install 'fedspatial[fm]')")
def test_novae_pretraining(tmp_path: Path, messages: list) -> None:
    """Three hospitals pretrain a small Novae encoder: the replies hold model weights of the
    model's own shapes and never novae's per-slide queue, the rounds weigh the sites by
    the niche pairs they trained, and the model folder opens with novae itself."""
    import novae
    from safetensors.numpy import load_file

    manifest, cells = _federation(tmp_path / "data", small_panel=False)
    cfg = _config(
        manifest, tmp_path, "fm", model={"encoder": "novae"},
        novae={"novae-local-steps": 2, "novae-batch-size": 24, "novae-prototypes": 20, "novae-embedding-size": 16},
    )
    simulate(cfg)
    run = tmp_path / "fm" / "federated"
    types = _inspect(messages, cells, _allowed_dims(run, cfg, []))
    assert {"train", "query.pca", "query.embed", "query.finalize"} <= types  # PCA starts the gene embeddings
    sent_keys = {key for _, replies in messages for r in replies if not r.has_error()
                 for record in r.content.array_records.values() for key in record}
    assert "encoder.gnn.convs.0.att" in sent_keys and "swav_head.queue" not in sent_keys
    report = json.loads((run / "metrics.json").read_text())
    assert all(site["num-examples"] == 2 * 24 and site["train-steps"] == 2
               for record in report["rounds"] for site in record["sites"].values())
    assert 0 <= report["joint"]["ari"] <= 1
    saved = json.loads((run / "model" / "model.json").read_text())["model"]
    assert saved["kind"] == "novae" and len(saved["genes"]) == report["n-features-selected"] == 48
    assert "swav_head.queue" not in load_file(str(run / "model" / "model.safetensors"))
    opened = novae.Novae.from_pretrained(str(run / "model"))
    assert opened.cell_embedder.gene_names == saved["genes"] and opened.hparams.num_prototypes == 20
