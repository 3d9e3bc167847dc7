"""The result line: how a run's report files travel back to whoever submitted the run.

Flower 1.42 returns no files to the submitter, but it streams what the ServerApp process
writes to its output (``flwr run --stream``, ``flwr log``). At the end of a run the
ServerApp writes one line starting with :data:`RESULT_MARKER` and holding the report
files (:func:`result_line`); ``fedspatial submit`` picks it out of the stream
(:func:`parse_result_line`) and saves the files locally.

The line comes from a log stream that anyone who can run code at the center can write
to, so its contents are untrusted: the parser accepts only a valid run name and the known
report files (:data:`RESULT_FILES`), never a path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

RESULT_MARKER = "FEDSPATIAL-RESULTS v1 "
"""Starts the one log line in which the ServerApp returns the run's report files."""
MAX_RESULT_BYTES = 8 * 2**20
RESULT_FILES = ("metrics.json", "config.json")
"""The run folder's files sent back to the submitter (the model stays at the center)."""
# One path component: no separator, no control character, no leading '.' (so not '..').
_RUN_NAME = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,127}")
RUN_NAME_RULE = "1-128 characters, no '/', '\\' or control characters, not starting with '.'"


class ResultLineError(ValueError):
    """A report too large for one line, or a marked line that arrived damaged."""


def is_valid_run_name(name: object) -> bool:
    """A run name that is one plain folder name (no path, no '..', no hidden folder)."""
    return isinstance(name, str) and _RUN_NAME.fullmatch(name) is not None


def result_line(run_name: str, center_folder: str, files: Mapping[str, str]) -> str:
    """The marked log line carrying ``files`` (name -> text) back to the submitter.

    Raises
    ------
    ResultLineError
        When the files are too large for one log line (they stay at the center).
    """
    bundle = {
        "run-name": run_name,
        "center-folder": center_folder,
        "files": dict(files),
        "sha256": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()},
    }
    line = RESULT_MARKER + json.dumps(bundle, separators=(",", ":"))
    if len(line) > MAX_RESULT_BYTES:
        raise ResultLineError(
            f"the run report ({len(line) // 2**20} MiB) is too large to send back in the run's log; "
            f"copy it from the coordinating center: {center_folder}/"
        )
    return line


def parse_result_line(line: str) -> dict[str, Any] | None:
    """The bundle of a result line (None for any other line).

    Raises
    ------
    ResultLineError
        When the line is marked but damaged (cut off, or a file that fails its checksum),
        or names a run or a file it may not (see :func:`check_bundle`).
    """
    start = line.find(RESULT_MARKER)
    if start < 0:
        return None
    try:
        bundle = json.loads(line[start + len(RESULT_MARKER):])
        files, sums = bundle["files"], bundle["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ResultLineError("the run report line in the run's log is damaged (cut off?)") from None
    check_bundle(bundle)
    for name, text in files.items():
        if hashlib.sha256(text.encode()).hexdigest() != sums.get(name):
            raise ResultLineError(f"the run report's {name} failed its checksum on the way back")
    return dict(bundle)


def check_bundle(bundle: Any) -> None:
    """Refuse a result bundle that names an invalid run or a file other than
    :data:`RESULT_FILES` (whatever wrote it could aim the submitter's writes elsewhere).

    Raises
    ------
    ResultLineError
        Naming what is wrong; nothing of such a bundle may be saved.
    """
    if not isinstance(bundle, dict):
        raise ResultLineError("the run report line in the run's log is damaged (not a JSON object)")
    name = bundle.get("run-name")
    if not is_valid_run_name(name):
        raise ResultLineError(
            f"the run report names the run {name!r}, which is not a valid run name ({RUN_NAME_RULE}); "
            "refusing to save it"
        )
    files, sums = bundle.get("files"), bundle.get("sha256")
    if not isinstance(files, dict) or not isinstance(sums, dict):
        raise ResultLineError("the run report line in the run's log is damaged (no file table)")
    unexpected = sorted(str(f) for f in files if f not in RESULT_FILES)
    if unexpected:
        raise ResultLineError(
            f"the run report holds unexpected file(s) {', '.join(map(repr, unexpected))} "
            f"(only {', '.join(RESULT_FILES)} may come back); refusing to save it"
        )
    if not all(isinstance(text, str) for text in files.values()):
        raise ResultLineError("the run report line in the run's log is damaged (a file is not text)")
