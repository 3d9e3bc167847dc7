"""Every committed benchmark result says where it came from (issue: result provenance).

``benchmarks/provenance.py`` writes ``commit``, ``config``, ``machine`` and ``date`` into
each ``benchmarks/results/*.json``; a file without them, or from a modified checkout, is a
figure nobody can reproduce.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FILES = sorted(RESULTS.glob("*.json"))
sys.path.insert(0, str(RESULTS.parent))  # as `python benchmarks/<name>.py` runs: provenance.py beside it
from provenance import portable  # noqa: E402


def _absolute_paths(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _absolute_paths(v)]
    return [value] if isinstance(value, str) and os.path.isabs(value) else []


def test_every_benchmark_has_a_result_file() -> None:
    scripts = {p.stem for p in RESULTS.parent.glob("*.py")} - {"provenance", "dp_timing"}
    assert scripts == {p.stem for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_result_records_commit_config_machine_and_date(path: Path) -> None:
    result = json.loads(path.read_text())
    # A clean checkout's full commit id: not "unknown", not "-dirty".
    assert re.fullmatch(r"[0-9a-f]{40}", result["commit"]), result["commit"]
    assert isinstance(result["config"], dict) and result["config"]["command"].startswith("python benchmarks/")
    assert result["machine"]["cpus"] >= 1 and result["machine"]["torch"]
    assert dt.datetime.fromisoformat(result["date"]).tzinfo is not None
    # Machine-independent: no folder of the machine that ran it.
    assert _absolute_paths(result) == []


def test_portable_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, shared, data = tmp_path / "repo", tmp_path / "shared", tmp_path / "elsewhere" / "dlpfc"
    monkeypatch.setenv("FEDSPATIAL_DLPFC", str(data))
    config = {"out": str(root / "benchmarks" / "results"), "here": str(root), "n": 3, "rel": "configs/x.yaml",
              "inputs": [str(shared / "data" / "dlpfc"), str(data / "151673.h5ad"), "/etc/hosts"]}
    assert portable(config, root=root, shared=shared) == {
        "out": "benchmarks/results", "here": ".", "n": 3, "rel": "configs/x.yaml",
        "inputs": ["../shared/data/dlpfc", "$FEDSPATIAL_DLPFC/151673.h5ad", "<outside the checkout>/hosts"],
    }
