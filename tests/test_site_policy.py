"""Site-owned limits (issue 14 item 4, issue 13 hole 3): the site policy file is validated
strictly, and every request that breaks it is refused in the ClientApp's dispatch before
anything is computed, whatever the server's run config asks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from fedspatial.client import site as client_site
from fedspatial.client.app import _handler
from fedspatial.client.data_source import NodeData
from fedspatial.client.site import SiteRuntime
from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation
from fedspatial.shared.privacy.policy import (
    SITE_POLICY_ERROR,
    SitePolicy,
    SitePolicyError,
    load_policy,
    parse_policy,
    refusal,
    withhold_small_tables,
)
from fedspatial.shared.protocol.payload import Payload

STRICT = """
require-local-dp = true
max-epsilon = 4.0
max-delta = 1e-5
allowed-label-keys = ["domain"]
min-cell-count = 10
max-rounds = 20
allow-unnoised-releases = false
"""


# -- validation ------------------------------------------------------------------------------
def test_a_policy_file_is_read_and_every_field_checked(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(STRICT)
    p = load_policy(path)
    assert p == SitePolicy(True, 4.0, 1e-5, ("domain",), 10, 20, False, source=str(path))
    assert "max-epsilon=4" in p.summary() and "allow-unnoised-releases=false" in p.summary()
    # an empty file sets no limit (today's behaviour)
    (tmp_path / "empty.toml").write_text("")
    assert dataclasses.replace(load_policy(tmp_path / "empty.toml"), source="") == SitePolicy()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-epsilom = 4.0", "unknown key 'max-epsilom'. Did you mean 'max-epsilon'?"),
        ('require-local-dp = "yes"', "require-local-dp: expected true or false"),
        ("max-rounds = true", "max-rounds: expected an integer >= 1"),
        ("max-rounds = 0", "max-rounds: expected an integer >= 1"),
        ("min-cell-count = 2.5", "min-cell-count: expected an integer >= 0"),
        ("max-epsilon = -1", "max-epsilon: expected a number > 0"),
        ('max-epsilon = "4"', "max-epsilon: expected a number > 0"),
        ("max-delta = 1.5", "max-delta: must be below 1"),
        ('allowed-label-keys = "domain"', "allowed-label-keys: expected a list"),
        ("allowed-label-keys = [1]", "allowed-label-keys: expected a list"),
        ("max-epsilon = ", "is not valid TOML"),
    ],
)
def test_a_bad_policy_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(SitePolicyError, match=message.replace("(", r"\(").replace("?", r"\?").replace("[", r"\[")):
        load_policy(path)
    assert issubclass(SitePolicyError, ConfigError)  # the CLI prints it as `error: ...`, exit 2


def test_a_missing_policy_file_stops_fedspatial_client_before_it_connects(tmp_path: Path, capsys: Any) -> None:
    from fedspatial.cli import main

    missing = tmp_path / "nope.toml"
    # port 1: nothing listens; the policy is checked before the key, the data or the network
    code = main(["client", "--superlink", "127.0.0.1:1", "--data-path", str(tmp_path), "--ca-cert", str(tmp_path / "ca.crt"),
                 "--auth-key", str(tmp_path / "k.key"), "--policy", str(missing)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"site policy {missing} does not exist" in err and "CA certificate" not in err


# -- enforcement in the ClientApp's dispatch -----------------------------------------------------
@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = dataclasses.replace(SyntheticSpec(seed=3), n_sites=1, sections_per_site=(1,), spots_per_section=(40, 50), n_features=30)
    manifest = write_synthetic_federation(tmp_path_factory.mktemp("data"), spec)
    return Path(json.loads(manifest.read_text())["sites"][0]["data-path"])


def _message(content: RecordDict, query: str) -> Message:
    """A message from the server as the SuperNode hands it to the ClientApp."""
    kind = query if query in ("train", "evaluate") else f"query.{query}"
    return Message(content, metadata=Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                                              group_id="", created_at=0.0, ttl=600.0, message_type=kind))


def _ask(query: str, site_data: Path, tmp_path: Path, policy: str | None, *, run: dict[str, Any] | None = None,
         extra: dict[str, Any] | None = None) -> Message:
    client_site._CACHE.clear()
    node_config: dict[str, Any] = {"data-path": str(site_data), "site-name": "hospital_a", "output-path": str(tmp_path / "out")}
    if policy is not None:
        (tmp_path / "policy.toml").write_text(policy)
        node_config["policy-path"] = str(tmp_path / "policy.toml")
    run_config = {"run-name": "t", **(run or {})}
    config = ConfigRecord({"run-config": json.dumps(run_config), **(extra or {})})
    msg = _message(RecordDict({"config": config}), query)
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return _handler(query)(msg, context)


def _refused(reply: Message, *words: str) -> None:
    """An error reply naming the field; no content sent; the site's data not even loaded."""
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == SITE_POLICY_ERROR
    assert "site hospital_a refuses" in reply.error.reason
    for word in words:
        assert word in reply.error.reason, reply.error.reason
    assert all("sections" not in runtime.__dict__ for runtime in client_site._CACHE.values())


DP = {"local-dp": True, "target-epsilon": 4.0}


@pytest.mark.parametrize(
    ("policy", "run", "words"),
    [
        ("require-local-dp = true", {}, ["require-local-dp=true", "privacy.local-dp=false"]),
        ("max-epsilon = 4.0", {}, ["max-epsilon=4", "privacy.local-dp=false"]),
        ("max-epsilon = 2.0", DP, ["max-epsilon=2", "privacy.target-epsilon=4"]),
        ("max-epsilon = 4.0", {**DP, "budget-epsilon": 6.0}, ["max-epsilon=4", "privacy.budget-epsilon=6"]),
        ("max-delta = 1e-6", DP, ["max-delta=1e-06", "privacy.delta=1e-05"]),
        ('allowed-label-keys = ["domain"]', {"label-key": "cell_type"}, ["allowed-label-keys=['domain']", "data.label-key='cell_type'"]),
        ("allowed-label-keys = []", {}, ["allowed-label-keys=[]", "data.label-key='domain'"]),
        ("max-rounds = 10", {"num-rounds": 30}, ["max-rounds=10", "training.num-rounds=30"]),
    ],
)
def test_every_query_that_breaks_the_policy_is_refused_at_once(
    site_data: Path, tmp_path: Path, policy: str, run: dict[str, Any], words: list[str]
) -> None:
    _refused(_ask("describe", site_data, tmp_path, policy, run=run), *words)
    # negative control: the same request passes without the policy
    reply = _ask("describe", site_data, tmp_path, None, run=run)
    assert not reply.has_error() and reply.content["config"]["site"] == "hospital_a"


def test_a_request_within_the_policy_passes(site_data: Path, tmp_path: Path) -> None:
    reply = _ask("describe", site_data, tmp_path, STRICT, run={**DP, "num-rounds": 20})
    assert not reply.has_error() and reply.content["config"]["labels"]
    # a run without labels (label-key "") at a site that allows none: no label names leave it
    reply = _ask("describe", site_data, tmp_path, "allowed-label-keys = []", run={"label-key": ""})
    assert not reply.has_error() and not list(reply.content["config"].get("labels", []))


def test_train_of_a_round_past_max_rounds_is_refused(site_data: Path, tmp_path: Path) -> None:
    reply = _ask("train", site_data, tmp_path, "max-rounds = 10", run={**DP, "num-rounds": 10}, extra={"server-round": 11})
    _refused(reply, "max-rounds=10", "round 11")
    assert not reply.has_content()  # no model update arrays


@pytest.mark.parametrize(
    ("query", "run"),
    # under local DP feature_stats, embed and finalize are DP releases (or none): refused without it
    [("evaluate", DP), ("cluster_stats", DP), ("markers", DP), ("calibration", DP),
     ("feature_stats", {}), ("embed", {}), ("finalize", {})],
)
def test_unnoised_releases_are_refused(site_data: Path, tmp_path: Path, query: str, run: dict) -> None:
    policy = "allow-unnoised-releases = false"
    _refused(_ask(query, site_data, tmp_path, policy, run=run), "allow-unnoised-releases=false", query)
    # ... while the metadata the run needs still flows
    assert not _ask("describe", site_data, tmp_path, policy, run=DP).has_error()


def test_which_releases_count_as_noised() -> None:
    policy = SitePolicy(allow_unnoised_releases=False)
    dp = ExperimentConfig.from_run_config({"local-dp": True})
    plain = ExperimentConfig.from_run_config({})
    noisy_stats = ExperimentConfig.from_run_config({"local-dp": True, "feature-stats-noise": 2.0})
    request = Payload()
    assert refusal(policy, "train", dp, request) is None  # DP-SGD updates, charged to the ledger
    assert "allow-unnoised-releases=false" in str(refusal(policy, "train", plain, request))
    assert refusal(policy, "feature_stats", noisy_stats, request) is None
    assert refusal(policy, "feature_stats", dp, request) is None  # always a DP release under local DP
    assert refusal(policy, "feature_stats", plain, request) is not None
    assert refusal(policy, "setup", dp, request) is None and refusal(policy, "describe", plain, request) is None
    assert refusal(policy, "a_new_phases_query", dp, request) is not None  # unknown: un-noised until said otherwise
    # negative control: without the field, nothing is refused
    assert all(refusal(SitePolicy(), q, plain, request) is None for q in ("train", "evaluate", "markers", "feature_stats"))


def test_a_policy_file_that_goes_missing_refuses_everything(site_data: Path, tmp_path: Path) -> None:
    client_site._CACHE.clear()
    node_config = {"data-path": str(site_data), "site-name": "hospital_a", "policy-path": str(tmp_path / "gone.toml")}
    msg = _message(RecordDict({"config": ConfigRecord({"run-config": "{}"})}), "describe")
    reply = _handler("describe")(msg, Context(1, 1, node_config, RecordDict(), {}))
    assert reply.has_error() and reply.error.code == SITE_POLICY_ERROR and "does not exist" in reply.error.reason


def test_max_epsilon_caps_the_ledger_budget(site_data: Path) -> None:
    cfg = ExperimentConfig.from_run_config({"local-dp": True, "target-epsilon": 8.0})
    node = NodeData("a", (), Path("."), None, SitePolicy(max_epsilon=2.0))
    assert SiteRuntime(node, cfg).budget == 2.0
    assert SiteRuntime(dataclasses.replace(node, policy=None), cfg).budget == 8.0  # negative control


def test_label_tables_with_a_small_cell_are_withheld_whole() -> None:
    report = {
        "site": "a",
        "contingency": {"a": {"labels": ["x", "y"], "domains": [0, 1], "counts": [[40, 0], [3, 50]]},
                        "b": {"labels": ["x"], "domains": [0, 1], "counts": [[40, 12]]}},
        "calibration": {"a": {"labels": ["x"], "domains": [0], "counts": [[[1]]], "confidence": [0.5]}},
    }
    reply = Payload(arrays={}, config={"report": json.dumps(report)})
    out, withheld = withhold_small_tables(SitePolicy(min_cell_count=10), reply)
    kept = json.loads(str(out.config["report"]))
    assert withheld == ["contingency a", "calibration a"]
    assert list(kept["contingency"]) == ["b"] and kept["calibration"] == {}  # zeros are no small cells
    assert kept["withheld-tables"]["min-cell-count"] == 10
    tables = Payload(config={"calibration": json.dumps({"a": {"counts": [[[4]]]}})})
    assert json.loads(str(withhold_small_tables(SitePolicy(min_cell_count=5), tables)[0].config["calibration"])) == {}
    # negative control: without min-cell-count the reply is untouched
    assert withhold_small_tables(SitePolicy(), reply) == (reply, [])


def test_a_node_serving_several_sites_obeys_the_strictest() -> None:
    a = parse_policy({"max-epsilon": 4.0, "allowed-label-keys": ["domain", "layer"], "min-cell-count": 5}, "a")
    b = parse_policy({"max-epsilon": 2.0, "allowed-label-keys": ["layer"], "require-local-dp": True}, "b")
    both = SitePolicy.strictest([a, b])
    assert both is not None and both.max_epsilon == 2.0 and both.allowed_label_keys == ("layer",)
    assert both.require_local_dp and both.min_cell_count == 5
    assert SitePolicy.strictest([]) is None


# -- a Flower simulation: one site's policy refuses; min-nodes decides --------------------------
@pytest.mark.flower
def test_a_refusing_site_is_dropped_and_min_nodes_decides(tmp_path: Path) -> None:
    from fedspatial.simulation import simulate

    spec = dataclasses.replace(SyntheticSpec(seed=5), sections_per_site=(1, 1, 1), spots_per_section=(60, 80), n_features=40)
    manifest = write_synthetic_federation(tmp_path / "data", spec)
    raw = json.loads(manifest.read_text())
    refusing = raw["sites"][1]["name"]
    (tmp_path / "data" / "strict.toml").write_text("require-local-dp = true\n")
    raw["sites"][1]["policy"] = "strict.toml"  # relative to the manifest, like data-path
    manifest.write_text(json.dumps(raw))

    def config(name: str, min_nodes: int) -> ExperimentConfig:
        return ExperimentConfig.from_dict({
            "run-name": name, "results-dir": str(tmp_path / "results"), "data": {"manifest": str(manifest)},
            "features": {"n-top-features": 30}, "model": {"hidden-dim": 16, "latent-dim": 4},
            "training": {"num-rounds": 1, "batch-size": 64, "min-nodes": min_nodes},
            "clustering": {"n-domains": 3}, "markers": {"marker-genes": False}, "simulation": {"modes": ["federated"]},
        })

    simulate(config("goes-on", 2), integration_report=False)
    report = json.loads((tmp_path / "results" / "goes-on" / "federated" / "metrics.json").read_text())
    (why,) = report["dropped-sites"].values()
    assert f"site {refusing} refuses query.describe by its site policy: require-local-dp=true" in why
    assert refusing not in report["sites"] and len(report["sites"]) == 2
    # min-nodes 0 (every site): the same refusal stops the run
    with pytest.raises(Exception, match=r"fewer than min-nodes=3; the run stops(.|\n)*require-local-dp=true"):
        simulate(config("stops", 0), integration_report=False)
