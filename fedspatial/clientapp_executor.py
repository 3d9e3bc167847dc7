"""Warm executors: a hospital's ClientApps (``fedspatial client``) and the center's
ServerApps (``fedspatial server``, ``--task-type serverapp``).

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp``
process, started by its SuperExec, and has no option to keep one process per run
(``flwr-clientapp`` handles one task and exits). Starting Python and importing the
ClientApp's dependencies (torch, flwr, anndata, scikit-learn) takes seconds, paid at
every site for every message: for a deployed run that was most of its wall time.

This executor takes the SuperExec's place (``flower-supernode --isolation process``):
it asks the SuperNode's Runtime API for ClientApp tasks, as Flower's SuperExec does, and
hands each to its run's worker (:mod:`fedspatial.run_worker`), forked once per run from
a :mod:`multiprocessing` fork server that imported :mod:`fedspatial.clientapp_preload`.
The worker answers the run's messages one after the other with Flower's own functions:
the ClientApp loaded from the run's Flower App bundle, the node's state kept by the
SuperNode in its Context, as ``flwr-clientapp``; the start-up and the site's loading are
paid once per run, not per message. At the center the same executor forks each run's
Flower ``flwr-serverapp`` from a fork server that imported the ServerApp
(:mod:`fedspatial.serverapp_preload`).

    python -c "from fedspatial.clientapp_executor import main; main()" \
        --runtime-api-address 127.0.0.1:9094

(not ``python -m``: multiprocessing would import the main module, and with it the
installed fedspatial, into every task process). ``fedspatial client`` starts it next to
``flower-supernode`` (``--clientapp-runner warm``, the default); ``--clientapp-runner
flower`` keeps Flower's own executor.

With an allow-list of app bundle hashes (``--allow-app SHA256``, from ``fedspatial client
--allowed-apps``), a task whose bundle is not listed is refused before anything is forked
for it: the executor pulls the task's input itself, recomputes the bundle's SHA-256 from its
bytes, replies to the message with an error naming the hash and fails the task, as Flower
fails a ClientApp (:mod:`fedspatial.deployment.app_pinning`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PRELOAD = "fedspatial.clientapp_preload"
PRELOADS = {"clientapp": (PRELOAD, "FEDSPATIAL_CLIENTAPP_PRELOAD"),
            "serverapp": ("fedspatial.serverapp_preload", "FEDSPATIAL_SERVERAPP_PRELOAD")}
"""Per task type: the module the fork server imports, and where it leaves its outcome."""
DEFAULT_POLL_INTERVAL = 0.2
"""Most seconds between two task requests to the local Runtime API (Flower's SuperExec: 1 s)."""
FIRST_POLL = 0.02
"""Seconds before the first request after a task started or ended; 1.5x longer each time
after that, up to the poll interval: inside a run the next task follows within moments."""
STOP_GRACE = 10.0
RUN_WORKER_IDLE = 300.0
"""Seconds a run's worker (and the site it holds in memory) waits for the run's next message."""
MAX_IDLE_WORKERS = 2
"""Idle run workers kept at most (the longest idle leaves first)."""
LAUNCH_COMMAND = "from fedspatial.clientapp_executor import main; raise SystemExit(main())"
"""``python -c`` program that runs :func:`main` (see the module docstring for why not ``-m``)."""


def _probe(preload: str, status_env: str) -> None:
    """Runs in a forked process: exit 1 when the fork server's preload failed."""
    status = os.environ.get(status_env, "failed: the fork server did not import " + preload)
    if status != "ok" or "torch" not in sys.modules:
        sys.stderr.write(f"fedspatial: the app's dependencies cannot be imported: {status}\n")
        sys.exit(1)


SERVERAPP_PROGRAM = (
    "import sys\n"
    "from flwr.superlink.cli.flwr_serverapp import flwr_serverapp\n"
    "sys.argv = {argv!r}\n"
    "flwr_serverapp()\n"
)
"""A ServerApp task process's program: Flower's own ``flwr-serverapp`` entry point, forked warm
(a string run by ``exec``: the process must not import fedspatial before Flower loads the bundle)."""


@dataclass
class RunWorkerProcess:
    """A run's worker (:mod:`fedspatial.run_worker`), as the executor sees it."""

    proc: BaseProcess
    conn: Connection
    run: tuple[int, str]
    """(run id, bundle hash): the tasks it may take."""
    token: str | None = None
    """The task in hand; None: idle."""
    task_id: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class WarmExecutor:
    """Acquire ClientApp tasks from a SuperNode and run them in warm, forked processes:
    one per run, which answers the run's messages one after the other.

    With ``task_type="serverapp"`` it takes the ServerApp tasks of the center's SuperLink
    instead (``fedspatial server``), one forked ``flwr-serverapp`` per run; ``root_certificates``
    (a CA file) when that API speaks TLS."""

    def __init__(self, runtime_api_address: str, *, poll_interval: float = DEFAULT_POLL_INTERVAL,
                 allowed: frozenset[str] | None = None, idle_timeout: float = RUN_WORKER_IDLE,
                 task_type: str = "clientapp", root_certificates: str | None = None) -> None:
        if task_type not in PRELOADS:
            raise ValueError(f"task_type must be one of {', '.join(PRELOADS)}, not {task_type!r}")
        self.task_type = task_type
        self.root_certificates = root_certificates
        self.tasks: list[BaseProcess] = []
        """One-off task processes (ServerApps)."""
        self.address = runtime_api_address
        self.poll_interval = poll_interval
        self.allowed = allowed
        """SHA-256 hashes of the app bundles that may run; ``None``: any."""
        self.idle_timeout = idle_timeout
        self.workers: list[RunWorkerProcess] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # launch (polling thread) vs. shutdown (main thread)
        self._ctx = multiprocessing.get_context("forkserver")

    def warm_up(self) -> float:
        """Start the fork server and import the ClientApp in it; returns the seconds taken."""
        start = time.perf_counter()
        if self.allowed is not None:  # the fork server (started now) checks again before unpacking
            from fedspatial.deployment.app_pinning import ALLOW_ENV

            os.environ[ALLOW_ENV] = ",".join(sorted(self.allowed))
        preload, status_env = PRELOADS[self.task_type]
        self._ctx.set_forkserver_preload([preload])
        multiprocessing.forkserver.ensure_running()
        # The fork server imports the preload before it serves the first request: the
        # probe waits for that, and reports an import error the fork server would swallow.
        probe = self._ctx.Process(target=_probe, args=(preload, status_env), name=f"{self.task_type}-preload-probe")
        probe.start()
        probe.join()
        if probe.exitcode != 0:
            app = "client" if self.task_type == "clientapp" else "server"
            raise RuntimeError(
                f"the {app} app cannot be imported (see the error above): check this environment with "
                f"`python -c 'import fedspatial.{app}.app'`"
                + (", or start with --clientapp-runner flower" if app == "client" else "")
            )
        return time.perf_counter() - start

    def _client(self, token: str | None = None) -> Any:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if token is not None:  # one task's own calls (a refusal)
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        ca = None if self.root_certificates is None else Path(self.root_certificates).read_bytes()
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=ca is None,  # a SuperNode's Runtime API: plain HTTP on 127.0.0.1
            root_certificates=ca,
            interceptors=interceptors,
            # Retries until the SuperNode's Runtime API answers (it may start after us).
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def admit(self, token: str, task: Any) -> bool:
        """Whether the task's app bundle may run; an unlisted one is refused here (no fork).

        ``task.fab_hash`` is the key under which this SuperNode stored the bundle after
        recomputing its SHA-256 from the bytes (Flower's ``NodeState.store_fab``);
        :meth:`refuse` recomputes it once more from the bytes it pulls.
        """
        if self.allowed is None or task.fab_hash in self.allowed:
            return True
        self.refuse(token, task)
        return False

    def refuse(self, token: str, task: Any) -> None:
        """Fail the task as Flower fails a ClientApp: an error reply, then status FAILED."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime import run_clientapp as flower

        from fedspatial.deployment.app_pinning import fab_sha256, refusal_reason

        digest = task.fab_hash
        reason = refusal_reason(digest)
        client = self._client(token)
        context = None
        try:
            message, context, run, fab = flower.pull_task_input(client)
            digest = fab_sha256(fab.content)  # the bytes, not the hash field sent with them
            reason = refusal_reason(digest)
            flower.push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message),
                                context)
            logger.error("REFUSED run %s (task %d): app bundle sha256:%s is not on this hospital's allow-list; "
                         "nothing was run. To approve it, review the new version and add its hash to the "
                         "--allowed-apps file (deploy/README.md)", run.run_id, task.task_id, digest)
        except Exception as err:  # the task is failed below in any case
            logger.error("REFUSED task %d: app bundle sha256:%s is not on this hospital's allow-list "
                         "(the error reply could not be sent: %s)", task.task_id, digest, err)
        finally:
            flower.push_task_output(client, context, SubStatus.FAILED, reason)
            client.close()

    def launch(self, token: str, task: Any) -> None:
        """Hand the task to its run's idle worker, or fork one for it."""
        from fedspatial.run_worker import serve_run

        run = (int(task.run_id), str(task.fab_hash))
        if self.task_type == "serverapp":
            self._launch_serverapp(token, task)
            return
        with self._lock:
            if self.stopping.is_set():
                return  # acquired while stopping: Flower expires the task and replies with an error
            worker = next((w for w in self.workers if w.run == run and w.token is None and w.proc.exitcode is None), None)
            if worker is None:
                ours, theirs = self._ctx.Pipe()
                proc = self._ctx.Process(target=serve_run, name=f"clientapp-run-{task.run_id}",
                                         args=(theirs, self.address, os.getpid()))
                proc.start()
                theirs.close()
                worker = RunWorkerProcess(proc, ours, run)
                self.workers.append(worker)
                logger.info("run %d: ClientApp worker %s started (it keeps this site loaded for the run's "
                            "next messages)", task.run_id, proc.pid)
            worker.conn.send(token)
            worker.token, worker.task_id = token, int(task.task_id)
        logger.debug("task %d: sent to the worker of run %d (pid %s)", task.task_id, task.run_id, worker.proc.pid)

    def _launch_serverapp(self, token: str, task: Any) -> None:
        argv = ["flwr-serverapp", "--runtime-api-address", self.address, "--token", token,
                "--parent-pid", str(os.getpid())]
        argv += ["--insecure"] if self.root_certificates is None else ["--root-certificates", self.root_certificates]
        with self._lock:
            if self.stopping.is_set():
                return
            proc = self._ctx.Process(target=exec, args=(SERVERAPP_PROGRAM.format(argv=argv),),
                                     name=f"serverapp-run-{task.run_id}")
            proc.start()
            self.tasks.append(proc)
        logger.info("run %d: ServerApp process %s started", task.run_id, proc.pid)

    def reap(self) -> int:
        """Collect finished tasks, drop workers that ended, retire idle ones; returns how
        many tasks ended."""
        ended, retire = 0, []
        with self._lock:
            now = time.monotonic()
            for proc in [p for p in self.tasks if p.exitcode is not None]:
                self.tasks.remove(proc)
                proc.join()
                ended += 1
                if proc.exitcode != 0:  # Flower has logged the reason and failed the run
                    logger.warning("%s (pid %s) exited with code %s", proc.name, proc.pid, proc.exitcode)
            for w in list(self.workers):
                try:
                    while w.token is not None and w.conn.poll():
                        w.conn.recv()
                        w.token, w.idle_since = None, now
                        ended += 1
                except (EOFError, OSError):
                    pass  # the worker ended: seen below
                if w.proc.exitcode is not None:
                    if w.token is not None:  # Flower's task heartbeat expires and fails the task
                        logger.warning("ClientApp worker %s of run %d ended with exit code %s during task %d",
                                       w.proc.pid, w.run[0], w.proc.exitcode, w.task_id)
                        ended += 1
                    self.workers.remove(w)
                    retire.append(w)
                elif w.token is None and now - w.idle_since > self.idle_timeout:
                    self.workers.remove(w)
                    retire.append(w)
            idle = sorted((w for w in self.workers if w.token is None), key=lambda w: w.idle_since)
            for w in idle[: max(0, len(idle) - MAX_IDLE_WORKERS)]:
                self.workers.remove(w)
                retire.append(w)
        for w in retire:
            self._retire(w)
        return ended

    @staticmethod
    def _retire(worker: RunWorkerProcess) -> None:
        if worker.proc.exitcode is None:
            with contextlib.suppress(OSError):
                worker.conn.send(None)  # idle: it leaves at once
            worker.proc.join(STOP_GRACE)
            if worker.proc.exitcode is None:
                worker.proc.kill()
            logger.info("run %d: ClientApp worker %s ended (idle)", worker.run[0], worker.proc.pid)
        worker.proc.join(5)
        worker.conn.close()

    def serve(self) -> None:
        """Poll for tasks until :meth:`stop`."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = self._client()
        kind = TaskType.CLIENT_APP if self.task_type == "clientapp" else TaskType.SERVER_APP
        request = AcquireTaskRequest(supported_task_types=[kind])
        delay = self.poll_interval
        try:
            while not self.stopping.is_set():
                if self.reap():
                    delay = min(FIRST_POLL, self.poll_interval)
                res = client.AcquireTask(request)
                if res.HasField("task") and res.token:
                    if self.admit(res.token, res.task):
                        self.launch(res.token, res.task)
                    delay = min(FIRST_POLL, self.poll_interval)
                    continue  # another task may be waiting (several runs)
                self.stopping.wait(delay)
                delay = min(delay * 1.5, self.poll_interval)
        finally:
            client.close()

    def stop(self) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        """SIGTERM to the run workers (a task in hand is reported stopped to Flower),
        SIGKILL after :data:`STOP_GRACE` seconds."""
        self.stopping.set()
        with self._lock:
            workers = list(self.workers)
            self.workers.clear()
            tasks = list(self.tasks)
            self.tasks.clear()
        for proc in [*(w.proc for w in workers), *tasks]:
            if proc.exitcode is None and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in tasks:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.exitcode is None:
                w.proc.kill()
                w.proc.join(5)
            w.conn.close()


def _watch_parent(parent_pid: int, executor: WarmExecutor) -> None:
    """Stop when the process that started us is gone (``fedspatial client`` killed)."""

    def watch() -> None:
        while not executor.stopping.wait(1.0):
            if os.getppid() != parent_pid:
                logger.warning("the SuperNode wrapper (pid %d) is gone: stopping", parent_pid)
                executor.stop()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fedspatial warm ClientApp executor (see module docstring)")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, 127.0.0.1:PORT")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    parser.add_argument("--allow-app", action="append", metavar="SHA256",
                        help="run only app bundles with these hashes (repeatable; default: any)")
    parser.add_argument("--allowed-apps", action="append", metavar="FILE",
                        help="allow-list files, as `fedspatial client --allowed-apps` (its own unit: "
                        "--clientapp-runner external)")
    parser.add_argument("--task-type", choices=sorted(PRELOADS), default="clientapp",
                        help="serverapp: the center's ServerApps (`fedspatial server`), from its SuperLink")
    parser.add_argument("--root-certificates", metavar="CA_FILE", default=None,
                        help="the CA of a TLS Runtime API (the center's SuperLink)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per task request otherwise
    allowed = None
    if args.allow_app or args.allowed_apps:
        from pathlib import Path

        from fedspatial.deployment.app_pinning import load_allow_list
        from fedspatial.deployment.errors import DeployError

        try:
            listed = load_allow_list(tuple(Path(f) for f in args.allowed_apps or ()), tuple(args.allow_app or ()))
        except DeployError as err:
            logger.error("%s", err)
            return 2
        allowed = frozenset(listed or ())
        logger.info("app allow-list: only %d app bundle hash(es) run here", len(allowed))
    elif args.task_type == "clientapp":
        logger.warning("no app allow-list: any app the center submits runs here (--allowed-apps FILE)")
    executor = WarmExecutor(args.runtime_api_address, poll_interval=args.poll_interval, allowed=allowed,
                            task_type=args.task_type, root_certificates=args.root_certificates)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: executor.stop())
    if args.parent_pid is not None:
        _watch_parent(args.parent_pid, executor)
    try:
        seconds = executor.warm_up()
    except RuntimeError as err:
        logger.error("%s", err)
        return 1
    if args.task_type == "clientapp":
        logger.info("ClientApp preloaded in %.1f s; taking tasks from the SuperNode at %s",
                    seconds, args.runtime_api_address)
    else:
        logger.info("ServerApp preloaded in %.1f s; taking the runs of the SuperLink at %s",
                    seconds, args.runtime_api_address)
    # Polling runs in a thread: a request to a SuperNode that went away retries with
    # back-off, and must not keep a SIGTERM from stopping us.
    threading.Thread(target=executor.serve, daemon=True, name="acquire-tasks").start()
    while not executor.stopping.wait(0.5):
        pass
    executor.shutdown()
    logger.info("executor stopped")
    return 0

