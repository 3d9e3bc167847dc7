"""Flower commands as child processes: found in this environment, run with their output
passed through, signals forwarded, helpers beside them, exit codes explained."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedspatial.deployment.errors import DeployError, explain_exit

logger = logging.getLogger(__name__)


def flower_binary(name: str) -> str:
    """A Flower command from this environment (the venv's bin first, then PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise DeployError(f"`{name}` not found: install fedspatial (it brings flwr) into this environment")
    return found


def flower_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry and no update check, because a
    hospital's SuperNode must talk to the coordinating center only (override by setting
    the variables yourself)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # Flower's SuperExec (a hospital's with --clientapp-runner flower) looks for new tasks
    # every second by default: a second of delay per message, for a local HTTP request.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    return env


_FLOWER_EXIT_RE = re.compile(r"Exit Code: (\d+)")


def run_child(cmd: Sequence[str], *, explain: Mapping[tuple[int, str], str], what: str,
              env: Mapping[str, str] | None = None, cwd: Path | None = None,
              ended_by_itself: str = "", helpers: Mapping[str, Sequence[str]] | None = None,
              helper_options: Mapping[str, Mapping[str, Any]] | None = None) -> int:
    """Run ``cmd`` with its output passed through, forwarding SIGINT/SIGTERM to it.

    ``ended_by_itself`` is logged when the child exits with 0 unasked. ``helpers`` (name ->
    command) run next to the child and share its fate: they are stopped when it ends, and
    the child is stopped when one of them ends unasked. ``helper_options`` (name -> extra
    :class:`subprocess.Popen` arguments, e.g. ``user``/``group``/``env``) start a helper
    differently (:mod:`fedspatial.deployment.confinement`).

    Flower processes exit with 1 on any error and name the real reason in a log line
    ``Exit Code: N``; a known ``N`` is explained from ``explain`` (see :func:`explain_exit`).

    Returns
    -------
    int
        The child's exit code (0 when it was stopped by a forwarded signal; 1 when a
        helper ended unasked).
    """
    logger.debug("running: %s", " ".join(cmd))
    full_env = flower_env(env)
    proc = subprocess.Popen(list(cmd), env=full_env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    side: dict[str, subprocess.Popen[Any]] = {}
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        running: list[subprocess.Popen[Any]] = [proc, *side.values()]
        for p in running:
            if p.poll() is None:
                p.send_signal(signum)

    flower_codes: list[int] = []
    recent: deque[str] = deque(maxlen=50)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            recent.append(line)
            if match := _FLOWER_EXIT_RE.search(line):
                flower_codes.append(int(match.group(1)))

    # Flower's helper processes inherit the pipe and only exit once their parent is reaped,
    # so wait for the child itself, not for the end of its output.
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    helper_failed = ""
    try:
        for name, helper_cmd in (helpers or {}).items():
            logger.debug("running %s: %s", name, " ".join(helper_cmd))
            options = {"env": full_env, "cwd": cwd, **(helper_options or {}).get(name, {})}
            side[name] = subprocess.Popen(list(helper_cmd), **options)
        while (code := proc.poll()) is None:
            for name, helper in side.items():
                if not stopping and not helper_failed and helper.poll() is not None:
                    helper_failed = f"{name} ended unasked (exit code {helper.returncode}, see the log above)"
                    logger.error("%s: stopping %s too", helper_failed, what)
                    proc.terminate()
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_processes(list(side.values()))
    reader.join(timeout=15)
    flower_code = flower_codes[-1] if flower_codes else None
    if helper_failed:
        logger.error("%s stopped because %s; start it again (a service manager restarts it)", what, helper_failed)
        return 1
    if stopping:
        logger.info("%s stopped", what)
        return 0
    if code == 0 and ended_by_itself:
        logger.warning("%s ended without being asked to: %s", what, ended_by_itself)
    if code != 0:
        reason = flower_code if flower_code is not None else code
        hint = explain_exit(explain, reason, list(recent)) or (
            f"see its log above and https://flower.ai/docs/framework/ref-exit-codes/{reason}.html"
        )
        logger.error("%s stopped (Flower exit code %s): %s", what, reason, hint)
    return code


def _stop_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = 15.0) -> None:
    """SIGTERM to each process still running, SIGKILL after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
