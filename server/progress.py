"""Progress events of a run: plain log records on the ``fedspatial.progress`` logger.

Each record is an ordinary INFO line (in a deployment, a line of the ServerApp's
stream; in ``fedspatial simulate``, a line of the run's ``log.txt``) and carries the
event's fields as ``record.progress`` (a dict with at least ``event``), which
``fedspatial simulate``'s console (:mod:`fedspatial.console`) turns into its progress
display. Nothing here needs a console.

Events, in the order a run emits them:

``run``         the simulation harness starts: ``modes`` (names), ``simulations`` (count),
                ``sites`` (count), ``num-rounds``
``simulation``  one Flower simulation starts: ``name``, ``mode``, ``mode-index``,
                ``mode-count``, ``index`` / ``count`` (simulations), ``part`` / ``parts``
                (its place among its mode's simulations: local mode runs one per site),
                ``nodes`` (SuperNodes), ``sites``
``phase``       the server starts a phase: ``name``
``round``       a training round finished (checkpointed): ``round``, ``num-rounds``
``simulation-done``  ``name``, ``seconds``, ``ari`` (NaN when unknown), ``reused`` (True:
                finished before a ``--resume``, not run now)
``mode-done``   ``mode``, ``mode-index``, ``mode-count``, ``seconds``, ``ari``
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

LOGGER_NAME = "fedspatial.progress"
logger = logging.getLogger(LOGGER_NAME)

__all__ = [
    "LOGGER_NAME",
    "ProgressState",
    "emit",
    "format_duration",
    "mode_done",
    "phase_started",
    "round_finished",
    "run_started",
    "simulation_done",
    "simulation_started",
]


def emit(event: str, message: str, *args: Any, **fields: Any) -> None:
    """Log ``message % args`` at INFO with ``record.progress = {"event": event, **fields}``.

    Field names use dashes as the rest of fedspatial's run config (``num-rounds``);
    pass them through a dict: ``emit("round", ..., **{"num-rounds": 30})``."""
    logger.info(message, *args, extra={"progress": {"event": event, **fields}})


def run_started(modes: list[str], *, simulations: int, sites: int, num_rounds: int) -> None:
    emit("run", "%d mode(s) (%s), %d site(s), %d round(s): %d simulation(s)", len(modes), ", ".join(modes),
         sites, num_rounds, simulations,
         modes=list(modes), simulations=simulations, sites=sites, **{"num-rounds": num_rounds})


def simulation_started(
    name: str, *, mode: str, mode_index: int, mode_count: int, index: int, count: int, part: int, parts: int,
    nodes: list[str], sites: int | None = None,
) -> None:
    """``nodes``: the simulation's SuperNodes; ``sites``: the sites they hold (default: one each)."""
    sites = len(nodes) if sites is None else sites
    emit("simulation", "mode %d/%d %s: %d SuperNode(s): %s", mode_index, mode_count, name, len(nodes),
         ", ".join(nodes), name=name, mode=mode, index=index, count=count, part=part, parts=parts, nodes=len(nodes),
         sites=sites, **{"mode-index": mode_index, "mode-count": mode_count})


def phase_started(name: str) -> None:
    emit("phase", "phase: %s", name, name=name)


def round_finished(server_round: int, num_rounds: int, where: str = "") -> None:
    total = f"/{num_rounds}" if num_rounds > 0 else ""
    emit("round", "round %d%s finished%s", server_round, total, f"; checkpoint saved to {where}" if where else "",
         round=server_round, **{"num-rounds": num_rounds})


def simulation_done(name: str, *, seconds: float, ari: float, reused: bool = False) -> None:
    """``reused``: finished in an earlier session (``--resume``), not run now."""
    emit("simulation-done", "%s %s in %.1f s%s", name, "had finished" if reused else "finished", seconds,
         _ari(ari, ": "), name=name, seconds=seconds, ari=ari, reused=reused)


def mode_done(mode: str, *, mode_index: int, mode_count: int, seconds: float, ari: float) -> None:
    emit("mode-done", "mode %d/%d %s finished in %.1f s%s", mode_index, mode_count, mode, seconds, _ari(ari, ": "),
         mode=mode, seconds=seconds, ari=ari, **{"mode-index": mode_index, "mode-count": mode_count})


# ------------------------------------------------------------------ reading the events

def format_duration(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on)."""
    s = max(0, round(seconds)) if math.isfinite(seconds) else 0
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class ProgressState:
    """The run's progress from ``fedspatial.progress`` events, and its ETA.

    The unit of work is one Flower simulation (federated: one, local: one per site,
    centralized: one). ETA, once a simulation has finished: the mean duration of the
    finished ones for each one left, the current one's share reduced by its elapsed
    time, but never less than its training rounds left at the current round rate.
    Before that, the training rounds left at the current round rate ("training ETA"),
    and "ETA ?" before the first round.
    """

    started: float
    modes: list[str] = field(default_factory=list)
    simulations: int = 0
    num_rounds: int = 0
    name: str = ""
    mode: str = ""
    mode_index: int = 0
    mode_count: int = 0
    part: int = 0
    parts: int = 0
    phase: str = ""
    round: int = 0
    round_total: int = 0
    sim_started: float | None = None
    mode_started: float | None = None
    training_started: float | None = None
    last_round_at: float | None = None
    rounds_seen: int = 0
    finished: list[float] = field(default_factory=list)

    def update(self, fields: dict[str, Any], now: float) -> list[tuple[str, str]]:
        """Apply one event; returns the milestone lines it makes, as ``(kind, text)``."""
        event = fields.get("event")
        if event == "run":
            self.modes = list(fields.get("modes", []))
            self.simulations = int(fields.get("simulations", 0))
            self.num_rounds = int(fields.get("num-rounds", 0))
            return [("run", f"run: {', '.join(self.modes)} on {fields.get('sites', '?')} site(s), "
                            f"{self.num_rounds} round(s) each ({self.simulations} simulation(s))")]
        if event == "simulation":
            self.name, self.mode = str(fields.get("name", "")), str(fields.get("mode", ""))
            self.mode_index, self.mode_count = int(fields.get("mode-index", 0)), int(fields.get("mode-count", 0))
            self.part, self.parts = int(fields.get("part", 1)), int(fields.get("parts", 1))
            self.sim_started, self.phase = now, "starting Ray"
            self.round, self.round_total, self.rounds_seen = 0, self.num_rounds, 0
            self.training_started = self.last_round_at = None
            if self.part == 1:
                self.mode_started = now
                what = _sites(fields) if self.parts == 1 else f"one simulation per site ({self.parts})"
                return [("start", f"{self._prefix()}: starting, {what}")]
            return []
        if event == "phase":
            # In a simulation the first message (describe) waits for Ray's actors to start (20-30 s)
            ray = " (starting Ray)" if self.phase in ("starting Ray", "waiting for the sites (starting Ray)") else ""
            name = str(fields.get("name", ""))
            self.phase = name + ray
            if name == "training":
                self.training_started = now
            return []
        if event == "round":
            before = self.round
            self.round = int(fields.get("round", 0))
            self.round_total = int(fields.get("num-rounds", 0)) or self.round_total
            self.rounds_seen += 1
            self.last_round_at = now
            if self.training_started is None:
                self.training_started = self.sim_started if self.sim_started is not None else now
            n = self.round_total
            if self.parts == 1 and n > 0 and (4 * self.round) // n != (4 * before) // n:  # every 25%
                timing = self.timing(now) if self.round < n else f"{format_duration(now - self.started)} elapsed, training done"
                return [("round", f"{self._prefix()}: round {self.round}/{n} [{timing}]")]
            return []
        if event == "simulation-done":
            if fields.get("reused"):  # finished before --resume: neither done now nor left to do
                self.simulations = max(self.simulations - 1, 0)
            elif self.sim_started is not None:
                self.finished.append(now - self.sim_started)
            self.sim_started, self.phase = None, ""
            if self.parts > 1:
                return [("done", f"{self._prefix()}: site {self.part}/{self.parts} {self.name.split('/')[-1]} done in "
                                 f"{format_duration(self.finished[-1] if self.finished else 0)}"
                                 f"{_ari(fields.get('ari'))} [{self.timing(now)}]")]
            return []
        if event == "mode-done":
            took = now - self.mode_started if self.mode_started is not None else float(fields.get("seconds", 0))
            return [("done", f"{self._prefix()}: done in {format_duration(took)}{_ari(fields.get('ari'))} "
                             f"[{self.timing(now)}]")]
        return []

    def _prefix(self) -> str:
        return f"mode {self.mode_index}/{self.mode_count} {self.mode}"

    def round_seconds(self) -> float | None:
        """Mean seconds per round of the current simulation's training, once one is done."""
        if not self.rounds_seen or self.training_started is None or self.last_round_at is None:
            return None
        return (self.last_round_at - self.training_started) / self.rounds_seen

    def eta(self, now: float) -> tuple[float | None, str]:
        """``(seconds left, what they cover)``: ``"run"``, ``"training"``, or ``(None, "")``."""
        rate = self.round_seconds()
        rounds_left = max(self.round_total - self.round, 0) if self.sim_started is not None else 0
        training_left = rounds_left * rate if rate is not None else None
        if self.finished:
            per = sum(self.finished) / len(self.finished)
            running = self.sim_started is not None
            current = max(per - (now - self.sim_started), 0.0) if self.sim_started is not None else 0.0
            if training_left is not None:
                current = max(current, training_left)
            left = max(self.simulations - len(self.finished) - (1 if running else 0), 0)
            return current + left * per, "run"
        if training_left:
            return training_left, "training"
        return None, ""

    def timing(self, now: float) -> str:
        """``0:32 elapsed, ETA ~1:10`` (or ``training ETA ~0:40``, ``ETA ?``; only the elapsed
        time once every simulation is done, or training is and nothing else is known)."""
        seconds, basis = self.eta(now)
        done = bool(self.mode) and self.sim_started is None and len(self.finished) >= self.simulations
        if done or (seconds is None and self.training_started is not None and self.round >= self.round_total > 0):
            return f"{format_duration(now - self.started)} elapsed"
        if seconds is None:
            eta = "ETA ?"
        else:
            eta = f"{'training ' if basis == 'training' else ''}ETA ~{format_duration(seconds)}"
        return f"{format_duration(now - self.started)} elapsed, {eta}"

    def status(self, now: float) -> str:
        """The live line: mode k/n, phase, round i/N, elapsed, ETA."""
        if not self.mode:
            return f"preparing the run · {self.timing(now)}"
        parts = [self._prefix() + (f" (site {self.part}/{self.parts})" if self.parts > 1 else "")]
        if self.phase:
            parts.append(self.phase)
        if self.round_total and self.phase.startswith("training"):
            parts.append(f"round {self.round}/{self.round_total}")
        parts.append(self.timing(now))
        return " · ".join(parts)


def _sites(fields: dict[str, Any]) -> str:
    nodes, sites = fields.get("nodes", "?"), fields.get("sites", fields.get("nodes", "?"))
    if sites == nodes:
        return f"{sites} site(s)"
    return f"{sites} site(s) pooled" if nodes == 1 else f"{sites} site(s) on {nodes} node(s)"


def _ari(value: Any, sep: str = ", ") -> str:
    """``", joint ARI 0.512"`` (``sep`` first), or nothing when the score is unknown (NaN)."""
    return f"{sep}joint ARI {value:.3f}" if isinstance(value, float) and math.isfinite(value) else ""
