"""A warm ClientApp executor for a hospital's SuperNode (``fedspatial client``).

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp``
process, started by its SuperExec, and has no option to keep one process per run
(``flwr-clientapp`` handles one task and exits). Starting Python and importing the
ClientApp's dependencies (torch, flwr, anndata, scikit-learn) takes seconds, paid at
every site for every message: for a deployed run that was most of its wall time.

This executor takes the SuperExec's place (``flower-supernode --isolation process``):
it asks the SuperNode's Runtime API for ClientApp tasks, as Flower's SuperExec does,
but starts each task by forking a process that has those dependencies imported already
(a :mod:`multiprocessing` fork server that imported :mod:`fedspatial.clientapp_preload`).
The forked process runs Flower's own ``run_clientapp`` unchanged: one message per
process, the ClientApp loaded from the run's Flower App bundle, state kept by the
SuperNode in the node's Context, exactly as ``flwr-clientapp``; only the start-up is saved.

    python -c "from fedspatial.clientapp_executor import main; main()" \
        --runtime-api-address 127.0.0.1:9094

(not ``python -m``: multiprocessing would import the main module, and with it the
installed fedspatial, into every task process). ``fedspatial client`` starts it next to
``flower-supernode`` (``--clientapp-runner warm``, the default); ``--clientapp-runner
flower`` keeps Flower's own executor.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

logger = logging.getLogger(__name__)

PRELOAD = "fedspatial.clientapp_preload"
DEFAULT_POLL_INTERVAL = 0.2
"""Seconds between two task requests to the local Runtime API (Flower's SuperExec: 1 s)."""
STOP_GRACE = 10.0
LAUNCH_COMMAND = "from fedspatial.clientapp_executor import main; raise SystemExit(main())"
"""``python -c`` program that runs :func:`main` (see the module docstring for why not ``-m``)."""


def _probe() -> None:
    """Runs in a forked process: exit 1 when the fork server's preload failed."""
    from fedspatial.clientapp_preload import STATUS_ENV

    status = os.environ.get(STATUS_ENV, "failed: the fork server did not import " + PRELOAD)
    if status != "ok" or "torch" not in sys.modules:
        sys.stderr.write(f"fedspatial: the ClientApp's dependencies cannot be imported: {status}\n")
        sys.exit(1)


class WarmExecutor:
    """Acquire ClientApp tasks from a SuperNode and run each in a forked, warm process."""

    def __init__(self, runtime_api_address: str, *, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        self.address = runtime_api_address
        self.poll_interval = poll_interval
        self.running: dict[str, BaseProcess] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # launch (polling thread) vs. shutdown (main thread)
        self._ctx = multiprocessing.get_context("forkserver")

    def warm_up(self) -> float:
        """Start the fork server and import the ClientApp in it; returns the seconds taken."""
        start = time.perf_counter()
        self._ctx.set_forkserver_preload([PRELOAD])
        multiprocessing.forkserver.ensure_running()
        # The fork server imports the preload before it serves the first request: the
        # probe waits for that, and reports an import error the fork server would swallow.
        probe = self._ctx.Process(target=_probe, name="clientapp-preload-probe")
        probe.start()
        probe.join()
        if probe.exitcode != 0:
            raise RuntimeError(
                "the ClientApp cannot be imported (see the error above): check this environment with "
                "`python -c 'import fedspatial.client.app'`, or start with --clientapp-runner flower"
            )
        return time.perf_counter() - start

    def _client(self) -> Any:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            # Retries until the SuperNode's Runtime API answers (it may start after us).
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def launch(self, token: str, task_id: int) -> None:
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        with self._lock:
            if self.stopping.is_set():
                return  # acquired while stopping: Flower expires the task and replies with an error
            # Flower's own function as the target: unpickling it in the task process must
            # not import fedspatial before Flower loads the ClientApp from the bundle.
            proc = self._ctx.Process(
                target=run_clientapp, name=f"clientapp-task-{task_id}",
                kwargs={
                    "runtime_api_address": self.address,
                    "token": token,
                    "insecure": True,  # the Runtime API listens on 127.0.0.1 only
                    "certificates": None,
                    "parent_pid": os.getpid(),
                    "runtime_dependency_install": False,
                },
            )
            proc.start()
            self.running[token] = proc
        logger.debug("task %d: ClientApp process %s started", task_id, proc.pid)

    def reap(self) -> None:
        with self._lock:
            finished = {t: p for t, p in self.running.items() if p.exitcode is not None}
            for token in finished:
                del self.running[token]
        for proc in finished.values():
            proc.join()
            if proc.exitcode != 0:
                # Flower has already logged the reason and replied with an error.
                logger.warning("ClientApp process %s (%s) exited with code %s", proc.pid, proc.name, proc.exitcode)

    def serve(self) -> None:
        """Poll for tasks until :meth:`stop`."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = self._client()
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while not self.stopping.is_set():
                self.reap()
                res = client.AcquireTask(request)
                if res.HasField("task") and res.token:
                    self.launch(res.token, res.task.task_id)
                    continue  # another task may be waiting (several runs)
                self.stopping.wait(self.poll_interval)
        finally:
            client.close()

    def stop(self) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        """SIGTERM to running task processes (Flower then reports the task stopped),
        SIGKILL after :data:`STOP_GRACE` seconds."""
        self.stopping.set()
        with self._lock:
            running = list(self.running.values())
            self.running.clear()
        for proc in running:
            if proc.exitcode is None and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in running:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per task request otherwise
    executor = WarmExecutor(args.runtime_api_address, poll_interval=args.poll_interval)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: executor.stop())
    if args.parent_pid is not None:
        _watch_parent(args.parent_pid, executor)
    try:
        seconds = executor.warm_up()
    except RuntimeError as err:
        logger.error("%s", err)
        return 1
    logger.info("ClientApp preloaded in %.1f s; taking tasks from the SuperNode at %s",
                seconds, args.runtime_api_address)
    # Polling runs in a thread: a request to a SuperNode that went away retries with
    # back-off, and must not keep a SIGTERM from stopping us.
    threading.Thread(target=executor.serve, daemon=True, name="acquire-tasks").start()
    while not executor.stopping.wait(0.5):
        pass
    executor.shutdown()
    logger.info("executor stopped")
    return 0

