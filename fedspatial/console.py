"""What ``fedspatial simulate`` shows while it runs: one progress display, actionable warnings.

For the run's duration (:class:`RunConsole`) everything the process and its children
write to file descriptors 1 and 2 (Flower's log, Ray's re-printed actor output, torch,
Python warnings, fedspatial's INFO records) goes through a pipe into
``<results-dir>/<run-name>/log.txt``: ANSI codes stripped, each line time-stamped as it
comes. The console shows only

* the progress (:class:`ProgressState`, from the ``fedspatial.progress`` records of
  :mod:`fedspatial.server.progress`): on a terminal one live line (mode k/n, phase,
  round i/N, elapsed, ETA); elsewhere (CI, ``| tee``) plain lines at milestones only;
* fedspatial's WARNING and ERROR records, once each;
* on failure: the error, the last lines of the log, and the log's path (the traceback
  is in the log).

With ``-v`` the log is echoed to the console too. :func:`fedspatial.simulation.simulate`
knows nothing of this: it logs, and the console decides where the lines go.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from fedspatial.server.progress import LOGGER_NAME as PROGRESS_LOGGER
from fedspatial.server.progress import ProgressState, format_duration

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
TAIL_LINES = 15

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_STAMPED = re.compile(r"^\d\d:\d\d:\d\d ")
_LEVEL = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")
_LIBRARY_INFO = re.compile(r"^(?:DEBUG|INFO)\s+(?!fedspatial)[\w.]+: ")  # alembic, ray: "INFO name: ..."
_TRACE = re.compile(r"^\s*(?:File \"|Traceback \(most recent call last\)|[\^~\s]+$|During handling of|The above exception)")


class RunFailed(Exception):
    """The run failed and the console has said so; ``exit_code`` is the command's status."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences; of ``\\r``-overwritten text the last part."""
    text = _ANSI.sub("", text).rstrip("\r")
    return text.rsplit("\r", 1)[-1] if "\r" in text else text


def meaningful_tail(lines: list[str], n: int = TAIL_LINES) -> list[str]:
    """The last ``n`` lines of a log that say something: no blank Flower lines, no
    libraries' INFO lines, no traceback frames (the error itself is shown apart)."""
    kept: list[str] = []
    after_frame = False
    for line in lines:
        content = _LEVEL.sub("", _STAMPED.sub("", line)).strip()
        frame = bool(_TRACE.match(_STAMPED.sub("", line)))
        if frame or after_frame or _LIBRARY_INFO.match(_STAMPED.sub("", line)) or not content.strip("│├└─>{}[]() \t"):
            after_frame = frame and "File \"" in line  # the source line under a frame
            continue
        after_frame = False
        kept.append(line if len(line) <= 240 else line[:237] + "...")
    return kept[-n:]


# ------------------------------------------------------------------ displays

class PlainDisplay:
    """Milestone lines, no cursor movement (not a terminal, or ``-v``)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def start(self, state: ProgressState, clock: Any) -> None:
        pass

    def line(self, text: str, kind: str = "") -> None:
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def stop(self) -> None:
        pass


class LiveDisplay(PlainDisplay):
    """A terminal: one live status line (rich) under the milestone and warning lines;
    round milestones are left to the live line."""

    def start(self, state: ProgressState, clock: Any) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self.console = Console(file=self.stream, highlight=False, force_terminal=True)
        frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

        def render() -> Text:
            now = clock()
            return Text(f"{frames[int(now * 8) % len(frames)]} {state.status(now)}", no_wrap=True,
                        overflow="ellipsis")

        self.live = Live(console=self.console, get_renderable=render, refresh_per_second=4, transient=True,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def line(self, text: str, kind: str = "") -> None:
        if kind == "round":
            return
        if not hasattr(self, "console"):
            return super().line(text, kind)
        from rich.text import Text

        self.console.print(Text(text), soft_wrap=True)

    def stop(self) -> None:
        self.live.stop()


class ProgressHandler(logging.Handler):
    """Turns ``fedspatial.progress`` records into the display's lines."""

    def __init__(self, state: ProgressState, display: PlainDisplay, clock: Any = time.monotonic) -> None:
        super().__init__(logging.INFO)
        self.state, self.display, self.clock = state, display, clock

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "progress", None)
        if not isinstance(fields, dict):
            return
        try:
            for kind, text in self.state.update(fields, self.clock()):
                self.display.line(text, kind)
        except Exception:  # a display problem must not stop the run
            self.handleError(record)


class WarningHandler(logging.Handler):
    """fedspatial's WARNING and ERROR records on the console, once each, message only
    (the log holds the logger name, the time and any traceback)."""

    def __init__(self, display: PlainDisplay) -> None:
        super().__init__(logging.WARNING)
        self.display = display
        self.seen: set[str] = set()
        self.addFilter(lambda r: r.name.startswith("fedspatial") and not r.name.startswith(PROGRESS_LOGGER))

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.levelname.lower()}: {strip_ansi(record.getMessage())}"
        if text not in self.seen:
            self.seen.add(text)
            self.display.line(text, "warning")


class UserFormatter(logging.Formatter):
    """``warning: message`` (before the console starts, in quiet mode)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class BufferHandler(logging.Handler):
    """Holds records until the run's log exists (the console replays them into it)."""

    def __init__(self, capacity: int = 10_000) -> None:
        super().__init__(logging.NOTSET)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# ------------------------------------------------------------------ the log file

class _LogFile:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115  # closed in stop()
        self.lock = threading.Lock()
        self.tail: collections.deque[str] = collections.deque(maxlen=400)

    def write(self, text: str, *, tail: bool = True) -> None:
        """Append ``text``'s lines, time-stamped unless they are; ``tail``: they may show in a
        failure's "last lines of the log"."""
        now = time.strftime("%H:%M:%S ")
        with self.lock:
            for raw in text.split("\n"):
                line = strip_ansi(raw)
                line = line if _STAMPED.match(line) or not line else now + line
                self.file.write(line + "\n")
                if tail:
                    self.tail.append(line)
            self.file.flush()


class _PipeReader(threading.Thread):
    """Reads the redirected fds 1 and 2: into the log, and (``-v``) onto the console."""

    def __init__(self, fd: int, log: _LogFile, echo_fd: int | None, echo_ansi: bool) -> None:
        super().__init__(name="fedspatial-console", daemon=True)
        self.fd, self.log, self.echo_fd, self.echo_ansi = fd, log, echo_fd, echo_ansi

    def run(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._line(line)
        if pending:
            self._line(pending)
        os.close(self.fd)

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace")
        self.log.write(text)
        if self.echo_fd is not None:
            out = text if self.echo_ansi else strip_ansi(text)
            with contextlib.suppress(OSError):
                os.write(self.echo_fd, (out + "\n").encode("utf-8", errors="replace"))


# ------------------------------------------------------------------ the console

def _std_streams() -> tuple[Any, ...]:
    return (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _stream_handlers() -> list[tuple[logging.Logger, logging.StreamHandler[Any]]]:
    """``(logger, handler)`` of every console-like handler (not files) of every logger."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [(lg, h) for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _swap(handler: logging.StreamHandler[Any], stream: Any) -> Any:
    """Point ``handler`` at ``stream``; returns the old one (not flushed: it may be closed)."""
    with handler.lock or contextlib.nullcontext():
        old, handler.stream = handler.stream, stream
    return old


class RunConsole:
    """Context manager: the run's output into ``log_path``, progress and warnings on the console.

    Parameters
    ----------
    log_path : Path
        The run's ``log.txt`` (appended to: a resumed run keeps its earlier log).
    verbose : bool
        Also echo everything onto the console (as without the console), plus the
        progress lines.
    expected : tuple of exception types
        Failures a user can fix (a config, missing data): exit status 2, else 1.
    notes : str
        Written at the top of the log (the command line, the config).
    tty : bool or None
        Live display; None: when stderr is a terminal (and TERM is not ``dumb``).
    """

    def __init__(self, log_path: str | Path, *, verbose: bool = False, expected: tuple[type[BaseException], ...] = (),
                 notes: str = "", tty: bool | None = None, clock: Any = time.monotonic) -> None:
        self.log_path = Path(log_path)
        self.verbose, self.expected, self.notes, self.tty, self.clock = verbose, expected, notes, tty, clock
        self._restore: list[Any] = []

    # -- start / stop
    def __enter__(self) -> RunConsole:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.log = _LogFile(self.log_path)
        self.log.write(f"==== fedspatial simulate, {time.strftime('%Y-%m-%d %H:%M:%S')} ====", tail=False)
        if self.notes:
            self.log.write(self.notes, tail=False)
        self._replay_buffered()
        self.real_fd = os.dup(2)
        tty = self.tty if self.tty is not None else (os.isatty(self.real_fd) and os.environ.get("TERM") != "dumb")
        self.real = io.TextIOWrapper(io.FileIO(self.real_fd, "w", closefd=False), encoding="utf-8",
                                     errors="replace", line_buffering=True, write_through=True)
        self.saved = (os.dup(1), os.dup(2))
        read_fd, write_fd = os.pipe()
        self.reader = _PipeReader(read_fd, self.log, self.real_fd if self.verbose else None, echo_ansi=tty)
        self.reader.start()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.old_sys = (sys.stdout, sys.stderr)
        self.new_sys = tuple(io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                                              errors="backslashreplace", line_buffering=True, write_through=True)
                             for fd in (1, 2))
        old = _std_streams()
        sys.stdout, sys.stderr = self.new_sys
        root = logging.getLogger()
        for owner, handler in _stream_handlers():
            # Flower's console handler keeps the stream it found at import (under pytest, a
            # capture object of an earlier test): its output is console output all the same.
            if handler.stream not in old and owner.name != "flwr":
                continue
            if owner is root:  # the command's console handler: self.to_log replaces it
                root.removeHandler(handler)
                self._restore.append((handler, None))
            else:  # Flower's own handler (it does not propagate): into the log
                self._restore.append((handler, _swap(handler, self.new_sys[1])))
        self.to_log = logging.StreamHandler(self.new_sys[1])
        self.to_log.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        root.addHandler(self.to_log)
        self.state = ProgressState(started=self.clock())
        self.display = LiveDisplay(self.real) if tty and not self.verbose else PlainDisplay(self.real)
        self.progress = ProgressHandler(self.state, self.display, self.clock)
        logging.getLogger(PROGRESS_LOGGER).addHandler(self.progress)
        self.warnings = WarningHandler(self.display) if not self.verbose else None
        if self.warnings is not None:
            root.addHandler(self.warnings)
        self.display.start(self.state, self.clock)
        self.display.line(f"log: {self.log_path}" + ("" if self.verbose else " (-v also shows it here)"))
        return self

    def _replay_buffered(self) -> None:
        formatter = logging.Formatter(FORMAT, DATE_FORMAT)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, BufferHandler)]:
            root.removeHandler(handler)
            for record in handler.records:
                self.log.write(formatter.format(record))

    def _stop(self) -> None:
        root = logging.getLogger()
        try:
            self.display.stop()
        finally:
            logging.getLogger(PROGRESS_LOGGER).removeHandler(self.progress)
            if self.warnings is not None:
                root.removeHandler(self.warnings)
            for stream in (*self.new_sys, sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            root.removeHandler(self.to_log)
            sys.stdout, sys.stderr = self.old_sys
            for handler, stream in reversed(self._restore):
                if stream is None:
                    root.addHandler(handler)
                else:
                    _swap(handler, stream)
            for _, handler in _stream_handlers():  # made during the run (a library imported late)
                if handler.stream in self.new_sys:
                    _swap(handler, sys.stderr)
            os.dup2(self.saved[0], 1)
            os.dup2(self.saved[1], 2)
            for fd in self.saved:
                os.close(fd)
            self.reader.join(timeout=10)  # EOF once no process holds the pipe any more

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop()
        elapsed = format_duration(self.clock() - self.state.started)
        try:
            if exc is None:
                self.display.line(f"finished in {elapsed}")
                return
            with self.log.lock:
                self.tail = meaningful_tail(list(self.log.tail))
            self.log.write("".join(traceback.format_exception(exc_type, exc, tb)).rstrip("\n"))
            if isinstance(exc, (SystemExit, GeneratorExit)):
                return
            if isinstance(exc, KeyboardInterrupt):
                self._report("interrupted", f"after {elapsed}; finished rounds are checkpointed: continue with "
                             f"`fedspatial simulate --resume {self.log_path.parent}`")
                raise RunFailed(130) from None
            expected = isinstance(exc, self.expected)
            self._report("error", str(exc) if expected else f"{type(exc).__name__}: {exc}")
            raise RunFailed(2 if expected else 1) from None
        finally:
            self.real.close()
            os.close(self.real_fd)
            if not self.reader.is_alive():
                self.log.file.close()

    def _report(self, what: str, message: str) -> None:
        lines = [f"{what}: {message}"]
        if self.tail:
            lines += ["last lines of the log:", *(f"  {line}" for line in self.tail)]
        lines.append(f"full log (with the traceback): {self.log_path}")
        self.real.write("\n".join(lines) + "\n")
        self.real.flush()
