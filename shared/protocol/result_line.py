"""The result line: how a run's report files travel back to whoever submitted the run.

Flower 1.42 returns no files to the submitter, but it streams what the ServerApp process
writes to its output (``flwr run --stream``, ``flwr log``). At the end of a run the
ServerApp writes one line starting with :data:`RESULT_MARKER` and holding the report
files (:func:`result_line`); ``fedspatial submit`` picks it out of the stream
(:func:`parse_result_line`) and saves the files locally.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

RESULT_MARKER = "FEDSPATIAL-RESULTS v1 "
"""Starts the one log line in which the ServerApp returns the run's report files."""
MAX_RESULT_BYTES = 8 * 2**20


class ResultLineError(ValueError):
    """A report too large for one line, or a marked line that arrived damaged."""


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
        When the line is marked but damaged (cut off, or a file that fails its checksum).
    """
    start = line.find(RESULT_MARKER)
    if start < 0:
        return None
    try:
        bundle = json.loads(line[start + len(RESULT_MARKER):])
        files, sums = bundle["files"], bundle["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ResultLineError("the run report line in the run's log is damaged (cut off?)") from None
    for name, text in files.items():
        if hashlib.sha256(text.encode()).hexdigest() != sums.get(name):
            raise ResultLineError(f"the run report's {name} failed its checksum on the way back")
    return dict(bundle)
