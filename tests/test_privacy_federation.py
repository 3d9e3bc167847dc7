"""Differential privacy through Flower's simulation runtime: local DP-SGD with a ledger
per site, a budget that runs out mid-run, message inspection, central DP."""

from __future__ import annotations

import dataclasses
import json

import anndata as ad
import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedspatial.server import messaging
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation
from fedspatial.shared.privacy.budget import budget_plan
from fedspatial.shared.privacy.dp import (
    Mechanism,
    NodeBound,
    calibrate_noise,
    epsilon_of,
    plan_round,
)
from fedspatial.simulation import simulate

pytestmark = [pytest.mark.flower, pytest.mark.filterwarnings("ignore:Full backward hook")]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-federation")
    spec = dataclasses.replace(SyntheticSpec(seed=5), spots_per_section=(120, 160), n_features=60)
    return write_synthetic_federation(root / "data", spec)


def _config(manifest, results, name, *, rounds=3, privacy=None, **extra):
    return ExperimentConfig.from_dict(
        {
            "run-name": name,
            "results-dir": str(results),
            "data": {"manifest": str(manifest)},
            "features": {"n-top-features": 40},
            "model": {"hidden-dim": 16, "latent-dim": 4},
            "training": {"num-rounds": rounds, "batch-size": 64, "local-epochs": 1},
            "clustering": {"n-domains": 3},
            "privacy": privacy or {},
            "simulation": {"modes": ["federated"]},
            **extra,
        }
    )


def _site_cells(manifest):
    """Cells per site, read from the site's .h5ad files (a file or a folder of them)."""
    out = {}
    for site in json.loads(manifest.read_text())["sites"]:
        path = manifest.parent / site["data-path"]
        files = sorted(path.glob("*.h5ad")) if path.is_dir() else [path]
        out[site["name"]] = sum(ad.read_h5ad(f, backed="r").n_obs for f in files)
    return out


@pytest.fixture
def spy(monkeypatch):
    """Every reply a site sends, as the server receives it."""
    seen = []
    original = messaging.SiteGroup.send_and_receive

    def recording(self, messages, *, timeout=None):
        replies = original(self, messages, timeout=timeout)
        seen.extend(replies)
        return replies

    monkeypatch.setattr(messaging.SiteGroup, "send_and_receive", recording)
    return seen


def _assert_no_per_cell_data(replies, sizes):
    """Model arrays, aggregates and metrics only: no array, list or table as long as a
    site's or section's number of cells, no cell identifiers."""
    assert replies
    forbidden = set(sizes)
    for msg in replies:
        if msg.has_error():
            continue
        content = msg.content
        for record in content.array_records.values():
            for key, arr in record.items():
                shape = arr.numpy().shape
                assert not shape or shape[0] not in forbidden, (msg.metadata.message_type, key, shape)
        for record in content.metric_records.values():
            assert all(isinstance(v, int | float) for v in record.values())
        for record in content.config_records.values():
            for key, value in record.items():
                if isinstance(value, list):
                    assert len(value) not in forbidden, (key, len(value))
                if key == "report":
                    _walk(json.loads(str(value)), forbidden)


def _walk(node, forbidden):
    if isinstance(node, list):
        assert len(node) not in forbidden
        for v in node:
            _walk(v, forbidden)
    elif isinstance(node, dict):
        for v in node.values():
            _walk(v, forbidden)


def test_local_dp_ledgers_compose_over_rounds_and_messages_carry_no_cells(federation, tmp_path, spy):
    cfg = _config(federation, tmp_path, "dp", privacy={"local-dp": True, "target-epsilon": 6.0, "feature-stats-noise": 5.0})
    simulate(cfg)
    run = tmp_path / "dp" / "federated"
    report = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r.get("eval-loss") is None for r in report["rounds"])  # no unprivatized evaluation
    cells = _site_cells(federation)
    for site, n in cells.items():
        ledger = json.loads((run / "sites" / site / "privacy_ledger.json").read_text())
        per_round = [r["epsilon"] for r in ledger["epsilon-per-round"]]
        assert per_round[0] < per_round[1] < per_round[2] <= 6.0 * 1.0001
        # One accountant over all of the site's releases: feature statistics, 3 rounds of
        # per-cell DP-SGD (the default encoder under local DP: degree bound 0), then DP
        # k-means and the DP label x domain table.
        (stats,) = [r for r in ledger["releases"] if r["kind"] == "feature-stats"]
        plan = plan_round(n, batch_size=64, epochs=1, max_grad_norm=1.0, bound=NodeBound(0), node_noise_multiplier=1.0)
        sigma = ledger["node-noise-multiplier"]
        history = [(Mechanism(stats["noise_multiplier"]), 1), (Mechanism(sigma, plan.sample_rate, 0), 3 * plan.steps)]
        assert per_round[2] == pytest.approx(epsilon_of(history, 1e-5), rel=1e-6)
        after = [r for r in ledger["releases"] if r["kind"] in ("dp-kmeans", "dp-table")]
        assert {r["kind"] for r in after} == {"dp-kmeans", "dp-table"}
        assert all(r["sample_rate"] == 1.0 for r in after)
        history += [(Mechanism(r["noise_multiplier"]), r["steps"]) for r in after]
        # The whole run's epsilon is every release's, and the plan spends the target (1%).
        assert ledger["epsilon"] == pytest.approx(epsilon_of(history, 1e-5), rel=1e-6)
        assert 6.0 * 0.99 <= ledger["epsilon"] <= 6.0 * 1.0001
        # The RDP cross-check (group reduction) over the same releases, independently.
        one = RDPAccountant()
        one.history = [(stats["noise_multiplier"], 1.0, 1), (sigma, plan.node_sample_rate, 3 * plan.steps)]
        one.history += [(r["noise_multiplier"], 1.0, r["steps"]) for r in after]
        assert ledger["epsilon-rdp"] == pytest.approx(one.get_epsilon(delta=1e-5), rel=0.02)
        assert ledger["epsilon-rdp"] > ledger["epsilon"]
        assert ledger["steps"] == 3 * plan.steps and ledger["degree-bound"] == 0
        assert ledger["status"] == "within budget" and "cell" in ledger["guarantee"]
        assert report["privacy"]["site-epsilon"][site]["epsilon"] == pytest.approx(ledger["epsilon"])
    sizes = list(cells.values()) + [int(s["n_cells"]) for s in report["sections"].values()]
    _assert_no_per_cell_data(spy, sizes)
    types = {m.metadata.message_type for m in spy}
    assert {"train", "query.feature_stats", "query.dp_cluster_stats", "query.finalize"} <= types
    assert not types & {"evaluate", "query.kmeans", "query.cluster_stats", "query.mixture"}


def test_budget_exhausted_mid_run_stops_cleanly(federation, tmp_path):
    cells = _site_cells(federation)
    # hospital_b holds itself to a budget between what rounds 1 and 2 would spend, each with
    # the DP k-means and table releases that must still follow training reserved.
    n = cells["hospital_b"]
    privacy = {"local-dp": True, "target-epsilon": 6.0}
    budget = budget_plan(_config(federation, tmp_path, "plan", privacy=privacy).privacy)
    before, after = budget.before_training(), budget.after_training()
    plan = plan_round(n, batch_size=64, epochs=1, max_grad_norm=1.0, bound=NodeBound(0), node_noise_multiplier=1.0)
    sigma = calibrate_noise(target_epsilon=6.0, delta=1e-5, sample_rate=plan.sample_rate, degree_bound=0,
                            steps=3 * plan.steps, prior=before, after=after)
    e1, e2 = (epsilon_of([*before, (Mechanism(sigma, plan.sample_rate, 0), r * plan.steps), *after], 1e-5) for r in (1, 2))
    raw = json.loads(federation.read_text())
    for site in raw["sites"]:
        if site["name"] == "hospital_b":
            site["privacy-budget"] = (e1 + e2) / 2
        site["data-path"] = str((federation.parent / site["data-path"]).resolve())
    manifest = tmp_path / "federation.json"
    manifest.write_text(json.dumps(raw))
    cfg = _config(manifest, tmp_path, "budget", privacy=privacy)
    simulate(cfg)
    run = tmp_path / "budget" / "federated"
    report = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["round"] == 1
    stopped = report["privacy"]["stopped"]
    assert stopped["after-round"] == 1
    assert "privacy budget exhausted at site hospital_b: dp-sgd of round 2" in stopped["refusals"]["hospital_b"]
    ledger = json.loads((run / "sites" / "hospital_b" / "privacy_ledger.json").read_text())
    assert ledger["status"] == "exhausted" and ledger["refusals"][0]["round"] == 2
    assert [r["round"] for r in ledger["epsilon-per-round"]] == [1] and ledger["epsilon"] <= ledger["budget-epsilon"]
    # ... and the budget it kept back paid for its clustering and tables: nothing refused after training.
    assert {r["kind"] for r in ledger["releases"]} == {"feature-stats", "dp-sgd", "dp-kmeans", "dp-table"}
    assert [r["kind"] for r in ledger["refusals"]] == ["dp-sgd"]
    # Every site still clustered and wrote its sections with the round-1 model.
    assert set(report["sites"]) == {"hospital_a", "hospital_b", "hospital_c"} and not report["dropped-sites"]
    assert (run / "model" / "model.safetensors").is_file()
    assert np.isfinite(report["joint"]["ari"])


@pytest.mark.parametrize("mode", ["client-fixed", pytest.param("server-adaptive", marks=pytest.mark.slow)])
def test_central_dp_run_completes(federation, tmp_path, mode):
    cfg = _config(federation, tmp_path, f"central-{mode}", rounds=2,
                  privacy={"central-dp": mode, "central-noise-multiplier": 0.5, "central-clipping-norm": 2.0})
    simulate(cfg)
    report = json.loads((tmp_path / f"central-{mode}" / "federated" / "metrics.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2] and all(r["n-sites"] == 3 for r in report["rounds"])
    central = report["privacy"]["central"]
    assert central["rounds"] == 2 and central["client-level-epsilon"] > 0


@pytest.mark.parametrize("central", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["secagg", "secagg+client-fixed-dp"])
def test_secagg_run_completes(federation, tmp_path, spy, central):
    privacy = {"secagg": True, **({"central-dp": "client-fixed", "central-noise-multiplier": 0.3, "central-clipping-norm": 5.0} if central else {})}
    cfg = _config(federation, tmp_path, "secagg", rounds=2, privacy=privacy)
    simulate(cfg)
    run = tmp_path / "secagg" / "federated"
    report = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2] and all(r["n-sites"] == 3 and r["secagg"] for r in report["rounds"])
    assert json.loads((run / "checkpoint" / "state.json").read_text())["round"] == 2
    assert np.isfinite(report["joint"]["ari"]) and report["privacy"]["secagg"]
    # The server never received a site's model: masked train replies carry no model arrays.
    masked = [m for m in spy if m.metadata.message_type == "train" and not m.has_error()]
    assert masked and all(
        not any(len(r) for r in m.content.array_records.values()) for m in masked
    )
