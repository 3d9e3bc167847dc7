"""Where a benchmark result came from: written into every ``benchmarks/results/*.json``.

``provenance(config)`` returns the four keys every result file carries: ``commit`` (the
checkout's HEAD, marked ``-dirty`` when files differ from it), ``config`` (the settings
as run, made JSON-ready and machine-independent: see :func:`portable`), ``machine`` (what a reader needs to compare timings) and ``date`` (UTC).
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


def portable(value: Any, *, root: Path = ROOT, shared: Path | None = None) -> Any:
    """``value`` with every absolute path made machine-independent: relative to the
    checkout ``root``; ``../shared/...`` under the project's shared folder (``shared``,
    default ``root/../shared``); ``$FEDSPATIAL_...`` under a folder a ``FEDSPATIAL_*``
    variable names; otherwise only its name, marked as outside the checkout."""
    if isinstance(value, Mapping):
        return {k: portable(v, root=root, shared=shared) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, root=root, shared=shared) for v in value]
    if not (isinstance(value, str) and os.path.isabs(value)):
        return value
    path = Path(value)
    bases = [(root, ""), (shared or root.parent / "shared", "../shared")]
    bases += [(Path(v), f"${k}") for k, v in os.environ.items() if k.startswith("FEDSPATIAL_") and os.path.isabs(v)]
    for base, prefix in bases:
        if path.is_relative_to(base):
            rel = path.relative_to(base).as_posix()
            return "/".join(p for p in (prefix, rel) if p and p != ".") or "."
    return f"<outside the checkout>/{path.name}"


def provenance(config: Mapping[str, Any]) -> dict[str, Any]:
    """``commit``, ``config``, ``machine`` and ``date`` of a result. ``config`` goes through
    JSON once here (paths and other non-JSON values as ``str``), so no script converts, and
    through :func:`portable`, so no result names this machine's folders."""
    return {
        "commit": commit(),
        "config": portable(json.loads(json.dumps(dict(config), default=str))),
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
