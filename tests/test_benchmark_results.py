"""Every committed benchmark result says where it came from (issue: result provenance).

``benchmarks/provenance.py`` writes ``commit``, ``config``, ``machine`` and ``date`` into
each ``benchmarks/results/*.json``; a file without them, or from a modified checkout, is a
figure nobody can reproduce.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FILES = sorted(RESULTS.glob("*.json"))


def test_every_benchmark_has_a_result_file() -> None:
    scripts = {p.stem for p in RESULTS.parent.glob("*.py")} - {"provenance"}
    assert scripts == {p.stem for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_result_records_commit_config_machine_and_date(path: Path) -> None:
    result = json.loads(path.read_text())
    # A clean checkout's full commit id: not "unknown", not "-dirty".
    assert re.fullmatch(r"[0-9a-f]{40}", result["commit"]), result["commit"]
    assert isinstance(result["config"], dict) and result["config"]["command"].startswith("python benchmarks/")
    assert result["machine"]["cpus"] >= 1 and result["machine"]["torch"]
    assert dt.datetime.fromisoformat(result["date"]).tzinfo is not None
