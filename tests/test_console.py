"""What ``fedspatial simulate`` shows (issue 19, "a run a person can follow").

Fast: the progress logic on synthetic events (hand-checkable ETA), and the console on
a stand-in run that writes like Flower, Ray and torch do (Python streams, the fds
directly, a child process, warnings, log records). Slow: real runs through the CLI.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fedspatial import cli
from fedspatial.console import RunConsole, RunFailed, meaningful_tail, strip_ansi
from fedspatial.server import progress
from fedspatial.server.progress import ProgressState, format_duration

ANSI = re.compile(r"\x1b\[")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# what a default run must not show: Flower's and Ray's notices, actor output, config dumps
NOISE = ("DEPRECATED FEATURE", "FutureWarning", "DeprecationWarning", "ClientAppActor", "ConfigRecord",
         "torch.jit", "alembic", "[ROUND")


@pytest.fixture
def logging_state():
    """The CLI reconfigures the root logger; put it back for the next tests. fedspatial's
    package logger starts as in a fresh CLI process (a simulation run in this process by an
    earlier test may have given it a handler of its own: fedspatial.logstream)."""
    saved = {}
    for name in ("", "fedspatial", "flwr"):
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.level, logger.propagate)
        if name == "fedspatial":
            logger.handlers[:] = []
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


# ------------------------------------------------------------------ progress logic

def test_progress_lines_and_eta_by_hand():
    state = ProgressState(started=0.0)
    run = {"event": "run", "modes": ["federated", "local"], "simulations": 3, "sites": 2, "num-rounds": 4}
    assert state.update(run, 0.0) == [("run", "run: federated, local on 2 site(s), 4 round(s) each (3 simulation(s))")]
    sim = {"event": "simulation", "name": "federated", "mode": "federated", "mode-index": 1, "mode-count": 2,
           "part": 1, "parts": 1, "nodes": 2}
    assert state.update(sim, 0.0) == [("start", "mode 1/2 federated: starting, 2 site(s)")]
    assert state.status(5.0) == "mode 1/2 federated · starting Ray · 0:05 elapsed, ETA ?"
    state.update({"event": "phase", "name": "describe"}, 6.0)
    assert state.status(7.0) == "mode 1/2 federated · describe (starting Ray) · 0:07 elapsed, ETA ?"
    assert state.update({"event": "phase", "name": "training"}, 10.0) == []
    # round 1 after 4 s of training: 3 rounds left at 4 s each
    assert state.update({"event": "round", "round": 1, "num-rounds": 4}, 14.0) == [
        ("round", "mode 1/2 federated: round 1/4 [0:14 elapsed, training ETA ~0:12]")]
    assert state.status(15.0) == "mode 1/2 federated · training · round 1/4 · 0:15 elapsed, training ETA ~0:12"
    # (18 - 10) / 2 rounds = 4 s a round, 2 left
    assert state.update({"event": "round", "round": 2, "num-rounds": 4}, 18.0) == [
        ("round", "mode 1/2 federated: round 2/4 [0:18 elapsed, training ETA ~0:08]")]
    state.update({"event": "round", "round": 3, "num-rounds": 4}, 22.0)
    assert state.update({"event": "round", "round": 4, "num-rounds": 4}, 26.0)[0][1].endswith("training done]")
    state.update({"event": "phase", "name": "k-means"}, 27.0)
    assert state.status(28.0) == "mode 1/2 federated · k-means · 0:28 elapsed"  # nothing known of what is left
    assert state.update({"event": "simulation-done", "name": "federated", "ari": 0.5}, 30.0) == []
    # one simulation of 30 s done, two left, none running: 60 s
    assert state.update({"event": "mode-done", "mode": "federated", "ari": 0.5}, 32.0) == [
        ("done", "mode 1/2 federated: done in 0:32, joint ARI 0.500 [0:32 elapsed, ETA ~1:00]")]
    local = {**sim, "name": "local/a", "mode": "local", "mode-index": 2, "part": 1, "parts": 2}
    assert state.update(local, 32.0) == [("start", "mode 2/2 local: starting, one simulation per site (2)")]
    # the running one: 30 - 10 s left, then one more of 30 s
    assert state.status(42.0) == ("mode 2/2 local (site 1/2) · starting Ray · "
                                  "0:42 elapsed, ETA ~0:50")
    assert state.update({"event": "round", "round": 1, "num-rounds": 4}, 44.0) == []  # no round lines per site
    assert state.update({"event": "simulation-done", "name": "local/a", "ari": float("nan")}, 52.0) == [
        ("done", "mode 2/2 local: site 1/2 a done in 0:20 [0:52 elapsed, ETA ~0:25]")]
    state.update({**local, "name": "local/b", "part": 2}, 52.0)
    state.update({"event": "simulation-done", "name": "local/b"}, 70.0)
    assert state.update({"event": "mode-done", "mode": "local", "ari": 0.25}, 71.0) == [
        ("done", "mode 2/2 local: done in 0:39, joint ARI 0.250 [1:11 elapsed]")]


def test_progress_resumed_simulation_is_not_work():
    state = ProgressState(started=0.0)
    state.update({"event": "run", "modes": ["federated", "centralized"], "simulations": 2, "num-rounds": 2}, 0.0)
    state.update({"event": "simulation", "mode": "federated", "mode-index": 1, "mode-count": 2}, 0.0)
    state.update({"event": "simulation-done", "reused": True, "seconds": 500.0}, 0.1)
    state.update({"event": "simulation", "mode": "centralized", "mode-index": 2, "mode-count": 2}, 0.1)
    state.update({"event": "phase", "name": "training"}, 10.1)
    state.update({"event": "round", "round": 1, "num-rounds": 2}, 15.1)
    assert state.eta(16.0) == (5.0, "training")  # not 500 s: nothing of the earlier session counts
    state.update({"event": "simulation-done"}, 30.0)
    assert state.timing(31.0) == "0:31 elapsed"  # all done: no ETA


def test_helpers():
    assert format_duration(5) == "0:05" and format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "0:00"
    assert strip_ansi("\x1b[92mINFO \x1b[0m:  [ROUND 1/2]") == "INFO :  [ROUND 1/2]"
    assert strip_ansi("10%\r50%\r") == "50%"
    log = ["12:00:00 INFO :      ", "12:00:01 INFO    fedspatial.x: phase: k-means",
           "12:00:01 INFO    alembic.runtime.plugins: setup plugin alembic.autogenerate.schemas",
           "12:00:02 Traceback (most recent call last):", '12:00:02   File "x.py", line 1, in f',
           "12:00:02     f()", "12:00:03 ERROR   fedspatial.y: site b lost"]
    assert meaningful_tail(log) == [log[1], log[6]]


# ------------------------------------------------------------------ the console

def _noisy_run(n_rounds: int = 2) -> None:
    """Writes as a simulation does: Flower's coloured log, Ray's re-printed actor output
    (print), C code and child processes (the fds), warnings, log records, progress."""
    from flwr.common.logger import log as flower_log

    progress.run_started(["federated"], simulations=1, sites=3, num_rounds=n_rounds)
    progress.simulation_started("federated", mode="federated", mode_index=1, mode_count=1, index=1, count=1,
                                part=1, parts=1, nodes=["a", "b", "c"])
    flower_log(logging.INFO, "[ROUND 1/%d]", n_rounds)
    flower_log(logging.INFO, "ConfigRecord (train): {'run-config': ...}")
    print("\x1b[36m(ClientAppActor pid=1)\x1b[0m actor output")
    os.write(2, b"\x1b[93mWARNING \x1b[0m: written to fd 2 directly\n")
    subprocess.run([sys.executable, "-c", "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"],
                   check=True)
    warnings.warn("Tip: a FutureWarning nobody can act on", FutureWarning, stacklevel=1)  # pytest keeps these
    logging.getLogger("fedspatial.simulation").info("an info line for the log only")
    for _ in range(2):
        logging.getLogger("fedspatial.server.messaging").warning("site b dropped: it did not answer")
    progress.phase_started("training")
    for r in range(1, n_rounds + 1):
        progress.round_finished(r, n_rounds)
    progress.simulation_done("federated", seconds=1.0, ari=0.5)
    progress.mode_done("federated", mode_index=1, mode_count=1, seconds=1.0, ari=0.5)


def test_console_keeps_the_noise_in_the_log(tmp_path, capfd, logging_state):
    cli._setup_logging(False, quiet=True)
    log_path = tmp_path / "run" / "log.txt"
    with RunConsole(log_path, notes="config:\nn-top-features: 300"):
        _noisy_run()
    out, err = capfd.readouterr()
    shown = (out + err).splitlines()
    assert not any(n in line for line in shown for n in NOISE), shown
    assert "warning: site b dropped: it did not answer" in shown  # once, no ANSI, no logger name
    assert sum("site b dropped" in line for line in shown) == 1
    assert any(line.startswith("mode 1/1 federated: round 1/2 [") for line in shown)
    assert any(line.startswith("mode 1/1 federated: done in") for line in shown)
    assert shown[0] == f"log: {log_path} (-v also shows it here)" and shown[-1].startswith("finished in")
    assert not ANSI.search(out + err)
    text = log_path.read_text()
    assert not ANSI.search(text)
    for expected in ("[ROUND 1/2]", "ConfigRecord", "(ClientAppActor pid=1) actor output", "written to fd 2",
                     "child stdout", "child stderr", "an info line", "n-top-features: 300",
                     "fedspatial.progress: round 2/2 finished"):
        assert expected in text, expected
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in text.splitlines() if line)
    # everything is back: Python's streams, the fds, the root logger
    print("after the run")
    os.write(2, b"fd 2 after the run\n")
    out, err = capfd.readouterr()
    assert "after the run" in out and "fd 2 after the run" in err
    assert "after the run" not in log_path.read_text()


def test_console_verbose_echoes_the_log(tmp_path, capfd, logging_state):
    cli._setup_logging(True)
    with RunConsole(tmp_path / "log.txt", verbose=True):
        _noisy_run()
    err = capfd.readouterr().err
    assert "[ROUND 1/2]" in err and "actor output" in err and "child stderr" in err
    assert "mode 1/1 federated: done in" in err  # the progress lines too
    assert not ANSI.search(err)  # not a terminal


def test_console_failure_shows_error_tail_and_log(tmp_path, capfd, logging_state):
    cli._setup_logging(False, quiet=True)
    log_path = tmp_path / "log.txt"
    with pytest.raises(RunFailed) as failed, RunConsole(log_path):
        logging.getLogger("fedspatial.server.federation").info("phase: k-means")
        raise RuntimeError("boom in k-means")
    assert failed.value.exit_code == 1
    err = capfd.readouterr().err
    assert "error: RuntimeError: boom in k-means" in err
    assert "phase: k-means" in err and str(log_path) in err
    assert "Traceback" not in err
    assert "Traceback" in log_path.read_text() and "boom in k-means" in log_path.read_text()


def test_console_expected_error_exits_2(tmp_path, capfd, logging_state):
    cli._setup_logging(False, quiet=True)
    with pytest.raises(RunFailed) as failed, RunConsole(tmp_path / "log.txt", expected=(FileNotFoundError,)):
        raise FileNotFoundError("data.manifest: x.json does not exist")
    assert failed.value.exit_code == 2
    assert "error: data.manifest: x.json does not exist" in capfd.readouterr().err


def test_console_live_display_on_a_terminal(tmp_path, capfd, logging_state):
    cli._setup_logging(False, quiet=True)
    with RunConsole(tmp_path / "log.txt", tty=True):
        _noisy_run(n_rounds=40)
    err = capfd.readouterr().err
    assert "mode 1/1 federated: done in" in err and "warning: site b dropped" in err
    assert "round 10/40" not in strip_ansi(err).split("done in")[0].splitlines()[-1]  # rounds live only
    assert not any(n in err for n in ("ClientAppActor", "[ROUND", "ConfigRecord"))


# ------------------------------------------------------------------ real runs (Ray)

def _simulate_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["simulate", str(CONFIG), "--set", "data.synthetic-scale=0.2", "--set", "training.num-rounds=2",
            "--set", f"results-dir={tmp_path / 'results'}", "--set", f"data.synthetic-dir={tmp_path / 'data'}",
            "--run-name", "r", *extra]


@pytest.mark.slow
def test_default_run_prints_at_most_40_lines(tmp_path, capfd, logging_state):
    assert cli.main(_simulate_args(tmp_path)) == 0
    out, err = capfd.readouterr()
    shown = (out + err).splitlines()
    assert len(shown) <= 40, "\n".join(shown)
    assert any(line.startswith("mode 1/3 federated") for line in shown)
    assert any(line.startswith("mode 3/3 centralized: done in") for line in shown)
    assert "| federated |" in out and "Results:" in out
    assert not any(n in line for line in shown for n in NOISE), "\n".join(shown)
    text = (tmp_path / "results" / "r" / "log.txt").read_text()
    assert not ANSI.search(text)
    assert "[ROUND 2/2]" in text and "n-top-features: 300" in text
    assert "DEPRECATED FEATURE" not in text and "In future versions of Ray" not in text


@pytest.mark.slow
def test_verbose_run_shows_flower(tmp_path, capfd, logging_state):
    assert cli.main(["-v", *_simulate_args(tmp_path, "--mode", "federated")]) == 0
    err = capfd.readouterr().err
    assert "[ROUND 1/2]" in err and "mode 1/1 federated: done in" in err


@pytest.mark.slow
def test_failing_server_app_prints_error_and_log(tmp_path, capfd, logging_state, monkeypatch):
    from fedspatial.shared.phases.describe import Describe

    def broken(self, fed, run):
        raise RuntimeError("describe broke")

    monkeypatch.setattr(Describe, "run", broken)
    assert cli.main(_simulate_args(tmp_path, "--mode", "federated")) == 1
    out, err = capfd.readouterr()
    assert "error: RuntimeError: describe broke" in err
    assert str(tmp_path / "results" / "r" / "log.txt") in err
    assert "Traceback" not in out + err
    assert "describe broke" in (tmp_path / "results" / "r" / "log.txt").read_text()
