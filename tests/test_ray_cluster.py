"""The simulation on an existing Ray cluster (issue 17, "Beyond one machine").

A Ray head and a worker node, one CPU each, are started on this machine by the test
(``ray start --block``, each in its own process group, every port and the temp folder
their own, so that they cannot meet another Ray on a shared machine);
:func:`fedspatial.simulation.simulate` attaches to them with ``ray_address`` and the
sites' ClientApps run on both nodes. Both nodes are stopped through their process groups
(SIGTERM, then SIGKILL) and the test checks that none of their processes is left. The
other tests need no cluster: an unreachable address fails at once, with no run folder,
through the API, the CLI flag and ``RAY_ADDRESS``; and the Ray backend config of both
paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import descendants

from fedspatial.ray_cluster import (
    RAY_ADDRESS_ENV,
    RayClusterError,
    RayTarget,
    check_reachable,
    ray_backend_config,
    ray_cluster_nodes,
    ray_target,
)
from fedspatial.shared.config import ExperimentConfig
from fedspatial.simulation import simulate

pytestmark = pytest.mark.flower

RAY = Path(sys.executable).with_name("ray")
STARTUP_S = 120.0
STOP_S = 30.0


# ------------------------------------------------------------------ a cluster on 127.0.0.1

def _bindable(port: int) -> bool:
    """Nothing listens on ``port`` (Ray binds its ports on every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_block(size: int) -> int:
    """The first of ``size`` consecutive free ports, below Linux's ephemeral range (32768+)
    so that no outgoing connection takes one before Ray binds it."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(20000, 32000 - size)
        if all(_bindable(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports between 20000 and 32000")


@dataclasses.dataclass
class Cluster:
    address: str
    temp_dir: Path
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    node_ids: set[str] = dataclasses.field(default_factory=set)

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs if p.exists())


def _ports(base: int, names: list[str]) -> list[str]:
    return [f"--{name}={base + i}" for i, name in enumerate(names)]


def _start_node(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != RAY_ADDRESS_ENV}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    with open(log, "wb") as out:
        return subprocess.Popen([str(RAY), "start", "--block", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_node(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the node's process group (``ray start --block`` stops its processes), then
    SIGKILL to what is left after :data:`STOP_S`."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group's id
    for sig, wait in ((signal.SIGTERM, STOP_S), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader: a zombie still counts as a member of the group
            if not _group_alive(pgid):
                return
            time.sleep(0.2)


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in args:
                found.append(f"{entry.name}: {args[:200]}")
    return found


def _wait_for(cluster: Cluster, cpus: float) -> None:
    """Until the cluster's live nodes have ``cpus`` CPUs in all (fails if a node exits)."""
    host, port = cluster.address.rsplit(":", 1)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        for proc in cluster.procs:
            if proc.poll() is not None:
                pytest.fail(f"a Ray node exited with status {proc.returncode}:\n{cluster.output()}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=2):
            try:
                nodes = ray_cluster_nodes(cluster.address, node_checks=False, timeout=30)
            except RayClusterError:
                nodes = []
            if sum(n.cpus for n in nodes) == cpus:
                cluster.node_ids = {n.node_id for n in nodes if n.cpus > 0}
                return
        time.sleep(1)
    pytest.fail(f"the Ray cluster did not show {cpus:g} CPUs within {STARTUP_S:g} s:\n{cluster.output()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Ray head and one worker node on 127.0.0.1, one CPU each."""
    logs = tmp_path_factory.mktemp("ray-logs")
    # Ray's unix sockets live under the temp folder, whose path must stay short (107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="fsray", dir="/tmp"))
    base = _free_block(200)
    gcs = base
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
              "--object-store-memory=100000000"]
    head_args = ["--head", f"--port={gcs}", "--include-dashboard=false", f"--temp-dir={temp_dir}", *common,
                 *_ports(base + 1, ["node-manager-port", "object-manager-port", "ray-client-server-port",
                                    "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                    "runtime-env-agent-port", "metrics-export-port"]),
                 f"--min-worker-port={base + 20}", f"--max-worker-port={base + 99}"]
    worker_args = [f"--address=127.0.0.1:{gcs}", *common,
                   *_ports(base + 10, ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]),
                   f"--min-worker-port={base + 100}", f"--max-worker-port={base + 199}"]
    found = Cluster(address=f"127.0.0.1:{gcs}", temp_dir=temp_dir, procs=[], logs=[logs / "head.log", logs / "worker.log"])
    try:
        found.procs.append(_start_node(head_args, found.logs[0]))
        _wait_for(found, 1)
        found.procs.append(_start_node(worker_args, found.logs[1]))
        _wait_for(found, 2)
        yield found
    finally:
        for proc in reversed(found.procs):  # the worker node first, then the head
            _stop_node(proc)
        left = [proc.pid for proc in found.procs if _group_alive(proc.pid)]
        stray = _processes_mentioning(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"process groups of the Ray nodes still alive: {left}"
        assert not stray, f"processes of the Ray nodes left: {stray}"


def _local_ray_processes() -> set[int]:
    """Ray processes among this test process's descendants (a local Ray, not the cluster's)."""
    return descendants(markers=("raylet", "gcs_server"))


# ------------------------------------------------------------------ a run on it

def _config(tmp_path: Path, **simulation: Any) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "run-name": "on-cluster",
        "results-dir": str(tmp_path / "results"),
        "data": {"synthetic-dir": str(tmp_path / "data"), "synthetic-scale": 0.2},
        "features": {"n-top-features": 80},
        "model": {"hidden-dim": 32, "latent-dim": 8},
        "training": {"num-rounds": 1, "batch-size": 64},
        "markers": {"marker-genes": False},
        "simulation": {"modes": ["federated"], **simulation},
    })


def _recording_client_app(folder: Path) -> Any:
    """fedspatial's ClientApp, noting for each message the Ray node (and process) it ran on."""
    from flwr.clientapp import ClientApp

    from fedspatial.client.app import app as honest
    from fedspatial.shared.phases import all_queries
    from fedspatial.shared.protocol.names import Query

    where = str(folder)
    wrapped = ClientApp()

    def handle(msg: Any, context: Any) -> Any:
        import ray

        Path(where, f"{ray.get_runtime_context().get_node_id()}.{os.getpid()}").touch()
        return honest(msg, context)

    for query in all_queries():
        if query == Query.TRAIN:
            wrapped.train()(handle)
        elif query == Query.EVALUATE:
            wrapped.evaluate()(handle)
        else:
            wrapped.query(str(query))(handle)
    return wrapped


def test_simulation_runs_on_both_nodes_of_a_ray_cluster(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="fedspatial.simulation")
    caplog.set_level(logging.INFO, logger="fedspatial.ray_cluster")
    calls = tmp_path / "calls"
    calls.mkdir()
    before = _local_ray_processes()
    results = simulate(_config(tmp_path), modes=["federated"], integration_report=False,
                       client_app=_recording_client_app(calls), ray_address=cluster.address)

    run = tmp_path / "results" / "on-cluster"
    report = json.loads((run / "federated" / "metrics.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1]
    assert set(report["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert math.isfinite(results["federated"]["joint_ari"])
    assert (run / "summary.md").is_file()
    # The sites' ClientApps ran in Ray workers of both nodes, and no Ray started here.
    nodes = {p.name.split(".")[0] for p in calls.iterdir()}
    assert nodes == cluster.node_ids, (nodes, cluster.node_ids)
    assert _local_ray_processes() <= before
    said = [r.getMessage() for r in caplog.records if r.name in ("fedspatial.simulation", "fedspatial.ray_cluster")]
    assert f"Ray: the Ray cluster at {cluster.address} (from --ray-address)" in said
    assert any(m.startswith(f"Ray cluster at {cluster.address}: 2 node(s)") for m in said), said
    assert not list((tmp_path / "results").glob(".fedspatial-shared-*"))  # the shared-folder marker is gone


def test_a_cluster_without_a_node_big_enough_is_refused_before_the_run(cluster: Cluster, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(RayClusterError, match=r"no node with 2 CPUs .*cpus-per-client=2"):
        simulate(_config(tmp_path, **{"cpus-per-client": 2}), integration_report=False, ray_address=cluster.address)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "results" / "on-cluster").exists()


# ------------------------------------------------------------------ no cluster needed

def _closed_port() -> int:
    """A port nothing listens on (just freed by the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_cluster_fails_at_once_with_no_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(RayClusterError) as caught:
        simulate(_config(tmp_path), integration_report=False, ray_address=address)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "\n" not in message
    assert f"cannot reach the Ray cluster at {address} (from --ray-address)" in message
    assert "ray start --head" in message
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "data").exists()  # nothing at all was done

    monkeypatch.setenv(RAY_ADDRESS_ENV, address)  # Ray's own variable, when no address is given
    with pytest.raises(RayClusterError, match=f"at {address} \\(from RAY_ADDRESS\\).*unset RAY_ADDRESS"):
        simulate(_config(tmp_path), integration_report=False)
    assert not (tmp_path / "results").exists()


def test_the_cli_flag_fails_at_once_with_one_line_and_no_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from fedspatial.cli import main

    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    config = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
    status = main(["simulate", config, "--ray-address", address,
                   "--set", f"data.synthetic-dir={tmp_path / 'data'}", "--set", f"results-dir={tmp_path / 'results'}"])
    assert time.monotonic() - started < 15
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot reach the Ray cluster at {address}"), err
    assert not (tmp_path / "results").exists()

    # a malformed address, also refused before anything
    assert main(["simulate", config, "--ray-address", "ray://head:10001"]) == 2
    assert "Ray Client addresses (ray://) are not supported" in capsys.readouterr().err


def test_where_the_simulation_runs_and_its_ray_backend_config() -> None:
    assert ray_target(None, environ={}) == RayTarget(None)
    assert ray_target(None, environ={RAY_ADDRESS_ENV: "10.0.0.5:6379"}) == RayTarget("10.0.0.5:6379", RAY_ADDRESS_ENV)
    assert ray_target("head:6379", environ={RAY_ADDRESS_ENV: "10.0.0.5:6379"}) == RayTarget("head:6379", "--ray-address")
    assert ray_target("local", environ={RAY_ADDRESS_ENV: "10.0.0.5:6379"}) == RayTarget(None, "--ray-address")
    assert ray_target(None, environ={RAY_ADDRESS_ENV: "local"}).address is None
    assert ray_target("auto", environ={}).address == "auto"
    assert "RAY_ADDRESS" in RayTarget("h:1", RAY_ADDRESS_ENV).describe()
    assert "local Ray on this machine" in RayTarget(None).describe()
    for bad in ("head", "head:port", "head:0", ":6379", "ray://head:10001"):
        with pytest.raises(RayClusterError):
            ray_target(bad, environ={})
    assert check_reachable(RayTarget(None)) == RayTarget(None)  # nothing to reach

    cfg = ExperimentConfig.from_dict({"simulation": {"num-cpus": 1, "cpus-per-client": 4}})
    local = ray_backend_config(cfg, RayTarget(None))
    # this machine: Ray started with simulation.num-cpus (a client never gets more)
    assert local == {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                     "init_args": {"address": "local", "num_cpus": 1, "include_dashboard": False, "log_to_driver": True}}
    # a cluster: attach (Ray refuses num_cpus there); each client gets cpus-per-client
    remote = ray_backend_config(cfg, RayTarget("10.0.0.5:6379", "--ray-address"))
    assert remote == {"client_resources": {"num_cpus": 4, "num_gpus": 0.0},
                      "init_args": {"address": "10.0.0.5:6379", "include_dashboard": False, "log_to_driver": True}}
