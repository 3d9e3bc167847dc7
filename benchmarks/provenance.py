"""Where a benchmark result came from: written into every ``benchmarks/results/*.json``.

``provenance(config)`` returns the four keys every result file carries: ``commit`` (the
checkout's HEAD, marked ``-dirty`` when files differ from it), ``config`` (the settings
as run, made JSON-ready: paths become strings), ``machine`` (what a reader needs to compare timings) and ``date`` (UTC).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit() -> str:
    """HEAD of the checkout, ``-dirty`` when tracked files differ from it (``unknown``
    outside a git checkout). Result files are not code: benchmarks run one after another
    rewrite them, and that does not make the next one's code differ from HEAD."""
    head = _git("rev-parse", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return f"{head}-dirty" if dirty else head


def machine() -> dict[str, Any]:
    import torch

    return {
        "system": f"{platform.system()} {platform.machine()}",
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def provenance(config: Mapping[str, Any]) -> dict[str, Any]:
    """``commit``, ``config``, ``machine`` and ``date`` of a result. ``config`` goes through
    JSON once here (paths and other non-JSON values as ``str``), so no script converts."""
    return {
        "commit": commit(),
        "config": json.loads(json.dumps(dict(config), default=str)),
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
