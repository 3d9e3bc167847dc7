"""Where ``fedspatial simulate``'s simulations compute: a Ray started on this machine for
each simulation (the default), or a running Ray cluster (``--ray-address HOST:PORT``, else
Ray's ``RAY_ADDRESS``) whose nodes host the sites' ClientApps.

A cluster is checked before a run folder exists: reachable at once (:func:`check_reachable`),
then a node with ``simulation.cpus-per-client`` CPUs and every node importing fedspatial and
seeing the sites' data and the results folder at the same paths (:func:`check_ray_cluster`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedspatial.deployment.errors import DeployError

if TYPE_CHECKING:
    from fedspatial.shared.config import ExperimentConfig

logger = logging.getLogger(__name__)

RAY_ADDRESS_ENV = "RAY_ADDRESS"
"""Ray's own variable for a running cluster's address, honoured when no address is given."""
CONNECT_TIMEOUT_S = 5.0
"""Seconds to wait for a TCP connection to the cluster's head before giving up."""
PROBE_TIMEOUT_S = 60.0
"""Seconds the cluster check (connect, list the nodes, one small task per node) may take."""
_MARKER_PREFIX = ".fedspatial-shared-"


class RayClusterError(DeployError):
    """The Ray cluster given to the simulation cannot run it (unreachable, too small, a node
    without fedspatial or the data); the message is one line and says what to do."""


@dataclasses.dataclass(frozen=True)
class RayTarget:
    """Where the simulations' Ray runs."""

    address: str | None
    """A running cluster (``HOST:PORT`` of its head's GCS, as ``ray start --address`` takes,
    or ``auto``); None: a Ray started on this machine for each simulation."""
    source: str = ""
    """Where ``address`` came from: ``--ray-address`` (the argument) or ``RAY_ADDRESS``;
    empty when neither is set."""

    def describe(self) -> str:
        if self.address is None:
            why = f"{self.source}=local" if self.source else f"no --ray-address, no {RAY_ADDRESS_ENV}"
            return f"a local Ray on this machine, started for each simulation ({why})"
        return f"the Ray cluster at {self.address} (from {self.source})"


@dataclasses.dataclass(frozen=True)
class RayNode:
    """A live node of a Ray cluster, as :func:`ray_cluster_nodes` found it."""

    node_id: str
    address: str
    """The node's raylet, ``IP:PORT``."""
    cpus: float
    fedspatial: str | None = None
    """The fedspatial version a Ray worker on the node imports (None: not checked, or failed)."""
    import_error: str | None = None
    missing: tuple[str, ...] = ()
    """Paths the driver gave that do not exist on the node."""


def ray_target(ray_address: str | None = None, environ: dict[str, str] | None = None) -> RayTarget:
    """Where to run: ``ray_address``, else ``$RAY_ADDRESS``, else Ray on this machine.

    ``local`` (either way) also means this machine, even when a cluster runs here or
    ``RAY_ADDRESS`` is set. Raises :class:`RayClusterError` for an address that is not
    ``HOST:PORT`` or ``auto`` (Ray Client's ``ray://`` included: the simulation's driver
    must run on a node of the cluster)."""
    env = os.environ if environ is None else environ
    if ray_address is not None and ray_address.strip():
        value, source = ray_address.strip(), "--ray-address"
    elif env.get(RAY_ADDRESS_ENV, "").strip():
        value, source = env[RAY_ADDRESS_ENV].strip(), RAY_ADDRESS_ENV
    else:
        return RayTarget(None)
    if value == "local":
        return RayTarget(None, source)
    if value.startswith("ray://"):
        raise RayClusterError(
            f"{source} {value}: Ray Client addresses (ray://) are not supported; run fedspatial simulate "
            "on a node of the cluster (e.g. its head) and give the head's HOST:PORT (`ray start --head --port`)"
        )
    if value != "auto":
        _host_port(value, source)
    return RayTarget(value, source)


def _host_port(address: str, source: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayClusterError(
            f"{source} {address}: expected HOST:PORT of the Ray cluster's head (its GCS port, "
            "`ray start --head --port`, 6379 by default), `auto` or `local`"
        )
    return host, int(port)


def check_reachable(target: RayTarget, *, timeout: float = CONNECT_TIMEOUT_S) -> RayTarget:
    """Fail fast (:class:`RayClusterError`) when nothing answers at the cluster's address:
    one TCP connection to the head, at most ``timeout`` seconds. ``auto`` is resolved to
    the cluster started on this machine (``ray start``). Returns the target with a concrete
    address; a local target is returned as it is."""
    if target.address is None:
        return target
    address = target.address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            resolved = canonicalize_bootstrap_address("auto")
        except Exception as err:  # ConnectionError: no cluster; anything else: Ray changed
            raise RayClusterError(
                f"{target.source}=auto: no running Ray cluster found on this machine "
                f"({_one_line(str(err))}); give the head's HOST:PORT"
            ) from None
        if not resolved:
            raise RayClusterError(f"{target.source}=auto: no running Ray cluster found on this machine; give the head's HOST:PORT")
        address = str(resolved)
    host, port = _host_port(address, target.source)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        why = {ConnectionRefusedError: "connection refused, nothing listens there",
               socket.timeout: f"no answer within {timeout:g} s",
               socket.gaierror: "unknown host"}.get(type(err), _one_line(str(err)))
        raise RayClusterError(
            f"cannot reach the Ray cluster at {address} (from {target.source}): {why}. Start its head "
            f"(`ray start --head --port={port}`) and workers (`ray start --address={address}`), "
            f"or fix the address" + (f" (unset {RAY_ADDRESS_ENV} to run on this machine)"
                                     if target.source == RAY_ADDRESS_ENV else "")
        ) from None
    return dataclasses.replace(target, address=address)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Run as `python -c` with: address, the workers' PYTHONPATH, "1" to check the nodes, the
# paths (JSON). A separate process so that a cluster that does not answer can be given up
# on (killed), and this process's Ray stays untouched for Flower.
_PROBE = r"""
import json, sys

def main():
    address, pythonpath, node_checks, paths = sys.argv[1], sys.argv[2], sys.argv[3] == "1", json.loads(sys.argv[4])
    try:
        import ray
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}} if node_checks else None)
    except BaseException as err:
        print("FEDSPATIAL-PROBE " + json.dumps({"error": type(err).__name__ + ": " + str(err)}), flush=True)
        return
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    checks = {}
    if node_checks:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=0)
        def look(paths):
            import os
            try:
                import fedspatial
                found, problem = fedspatial.__version__, None
            except Exception as err:
                found, problem = None, type(err).__name__ + ": " + str(err)
            return {"fedspatial": found, "import_error": problem, "missing": [p for p in paths if not os.path.exists(p)]}

        for n in nodes:
            if n["Resources"].get("CPU", 0) > 0:
                strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                checks[n["NodeID"]] = look.options(scheduling_strategy=strategy).remote(paths)
    found = [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"] + ":" + str(n["NodeManagerPort"]),
              "cpus": float(n["Resources"].get("CPU", 0.0)), **(ray.get(checks[n["NodeID"]]) if n["NodeID"] in checks else {})}
             for n in nodes]
    print("FEDSPATIAL-PROBE " + json.dumps({"ray": ray.__version__, "nodes": found}), flush=True)
    ray.shutdown()

main()
"""


def _worker_pythonpath() -> str:
    """The PYTHONPATH Flower's Ray backend gives the cluster's workers: this process's
    ``sys.path``, then ``$PYTHONPATH``."""
    path = os.pathsep.join(sys.path)
    return f"{path}{os.pathsep}{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else path


def ray_cluster_nodes(address: str, *, paths: Iterable[str | Path] = (), node_checks: bool = True,
                      timeout: float = PROBE_TIMEOUT_S) -> list[RayNode]:
    """The live nodes of the Ray cluster at ``address`` (``HOST:PORT``), from a short-lived
    driver process. ``node_checks``: on each node with CPUs, a Ray worker (given the
    PYTHONPATH Flower gives the ClientApps) imports fedspatial and looks for ``paths``.
    Raises :class:`RayClusterError` when the cluster refuses the connection or does not
    answer within ``timeout`` seconds."""
    env = {k: v for k, v in os.environ.items() if k != RAY_ADDRESS_ENV}
    env["PYTHONWARNINGS"] = "ignore"
    args = [sys.executable, "-c", _PROBE, address, _worker_pythonpath(), "1" if node_checks else "0",
            json.dumps([str(p) for p in paths])]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RayClusterError(
            f"the Ray cluster at {address} did not answer within {timeout:g} s: is it the head's GCS port "
            "(`ray start --head --port`), and does fedspatial simulate run on a node of the cluster?"
        ) from None
    lines = [line for line in out.splitlines() if line.startswith("FEDSPATIAL-PROBE ")]
    if not lines:
        last = [line for line in err.splitlines() if line.strip()][-1:] or [f"exit status {proc.returncode}"]
        raise RayClusterError(f"cannot connect to the Ray cluster at {address}: {_one_line(last[0])}")
    found = json.loads(lines[-1].removeprefix("FEDSPATIAL-PROBE "))
    if "error" in found:
        raise RayClusterError(f"cannot connect to the Ray cluster at {address}: {_one_line(found['error'])}")
    logger.debug("Ray %s cluster at %s: %s", found["ray"], address, found["nodes"])
    return [RayNode(node_id=n["node_id"], address=n["address"], cpus=n["cpus"], fedspatial=n.get("fedspatial"),
                    import_error=n.get("import_error"), missing=tuple(n.get("missing", ())))
            for n in found["nodes"]]


def check_ray_cluster(target: RayTarget, *, cpus_per_client: int, paths: Iterable[str | Path] = (),
                      timeout: float = PROBE_TIMEOUT_S) -> list[RayNode]:
    """Check that the cluster can run the simulation, before it starts: reachable, a node
    with ``cpus_per_client`` CPUs (Flower places each site's ClientApp actor on one node),
    every node with CPUs imports fedspatial and sees ``paths`` (the sites' data, the run
    folder: a shared file system, same paths). Raises :class:`RayClusterError`; logs the
    nodes. ``target`` must have an address (:func:`check_reachable` first for ``auto``)."""
    assert target.address is not None
    address = check_reachable(target).address
    assert address is not None
    paths = [str(p) for p in paths]
    nodes = ray_cluster_nodes(address, paths=paths, timeout=timeout)
    cpus = ", ".join(f"{n.address}: {n.cpus:g}" for n in nodes)
    slots = sum(int(n.cpus // cpus_per_client) for n in nodes)
    if slots == 0:
        raise RayClusterError(
            f"the Ray cluster at {address} has no node with {cpus_per_client} CPUs for a site "
            f"(simulation.cpus-per-client={cpus_per_client}; CPUs per node: {cpus or 'no live node'}): "
            "lower simulation.cpus-per-client or start nodes with more `ray start --num-cpus`"
        )
    for node in nodes:
        if node.import_error is not None:
            raise RayClusterError(
                f"node {node.address} of the Ray cluster at {address} cannot import fedspatial "
                f"({_one_line(node.import_error, 160)}): every node needs this environment (fedspatial, "
                "flwr, torch, ray) at the same path, e.g. the same virtual environment or container image"
            )
        if node.missing:
            first = Path(node.missing[0])
            what = (f"the results folder {first.parent} (a file just written there)"
                    if first.name.startswith(_MARKER_PREFIX) else str(first))
            raise RayClusterError(
                f"node {node.address} of the Ray cluster at {address} does not see {what}"
                + (f" (and {len(node.missing) - 1} more path(s))" if len(node.missing) > 1 else "")
                + ": every node must see the sites' data and the results folder at the same paths "
                "(a shared file system)"
            )
    from fedspatial import __version__

    other = sorted({n.fedspatial for n in nodes if n.fedspatial not in (None, __version__)}, key=str)
    if other:
        logger.warning("nodes of the Ray cluster at %s import fedspatial %s, this process %s: install the same "
                       "version everywhere", address, ", ".join(map(str, other)), __version__)
    logger.info("Ray cluster at %s: %d node(s) (CPUs: %s), room for %d site(s) at a time "
                "(simulation.cpus-per-client=%d); every node imports fedspatial and sees the data and run folder",
                address, len(nodes), cpus, slots, cpus_per_client)
    return nodes


@contextlib.contextmanager
def shared_marker(folder: Path) -> Iterator[Path]:
    """An empty file in ``folder`` (made if needed) for the duration: a node of a cluster
    that sees it shares this folder with this machine, not just a folder of the same name."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{_MARKER_PREFIX}{os.getpid()}-{time.time_ns()}"
    marker.touch()
    try:
        yield marker
    finally:
        marker.unlink(missing_ok=True)


def federation_nodes(federation: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A manifest's nodes, of its long (``nodes``) or short (``sites``) form."""
    assert federation is not None
    if "nodes" in federation:
        return list(federation["nodes"])
    return [{"name": site["name"], "sites": [site]} for site in federation["sites"]]


def paths_to_share(nodes: list[dict[str, Any]], results_marker: Path) -> list[str]:
    """What every node of a cluster must see: a file in the results folder, each site's
    data and policy."""
    paths = [str(results_marker)]
    for node in nodes:
        for site in node["sites"]:
            paths.append(str(site["data-path"]))
            if isinstance(site.get("policy"), str):
                paths.append(str(site["policy"]))
    return list(dict.fromkeys(paths))



def ray_backend_config(cfg: ExperimentConfig, target: RayTarget) -> dict[str, Any]:
    """Flower's Ray backend config for one simulation: each site's ClientApp actor gets
    ``simulation.cpus-per-client`` CPUs and no GPU. On this machine Ray starts with
    ``simulation.num-cpus`` (``address="local"``: even when a cluster runs here); on a
    cluster Ray attaches to it (``address``; the cluster's nodes decide the CPUs, and Ray
    refuses ``num_cpus`` there)."""
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if target.address is not None:
        per_client = cfg.simulation.cpus_per_client
        init_args = {"address": target.address, **init_args}
    else:
        n_cpus = max(1, min(cfg.simulation.num_cpus, os.cpu_count() or 1))
        # Also one node alone gets cpus-per-client: these models are small, and two torch
        # threads contending with any other process were 10-30x slower per step than one.
        per_client = min(cfg.simulation.cpus_per_client, n_cpus)
        init_args = {"address": "local", "num_cpus": n_cpus, **init_args}
    return {"client_resources": {"num_cpus": per_client, "num_gpus": 0.0}, "init_args": init_args}
