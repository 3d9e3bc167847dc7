"""Which modes a run runs: `--mode all` is all three, and `--resume` continues the modes the
run started with, not the config's (issue 19)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import fedspatial.simulation
from fedspatial.cli import main
from fedspatial.shared.config import load_config

ROOT = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    pass


def test_mode_all_is_the_three_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def fake(cfg: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append(kwargs["modes"])
        return {}

    monkeypatch.setattr(fedspatial.simulation, "simulate", fake)
    monkeypatch.setattr("fedspatial.server.report.comparison_table", lambda results: "table")
    base = ["simulate", str(ROOT / "configs" / "demo.yaml"), "--set", f"results-dir={tmp_path}",
            "--set", f"data.synthetic-dir={tmp_path / 'data'}", "--set", "data.synthetic-scale=0.1",
            "--set", "simulation.modes=[federated]"]
    assert main([*base, "--mode", "all", "--run-name", "a"]) == 0
    assert main([*base, "--run-name", "b"]) == 0
    assert main([*base, "--mode", "local", "--run-name", "c"]) == 0
    assert seen == [["federated", "local", "centralized"], None, ["local"]]


def test_resume_continues_the_modes_the_run_started_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(*args: Any, **kwargs: Any) -> None:
        raise _Stop  # interrupted in its first simulation: config.yaml is written by then

    monkeypatch.setattr(fedspatial.simulation, "run_one", stop)
    cfg = load_config(ROOT / "configs" / "demo.yaml", {
        "results-dir": str(tmp_path), "run-name": "r", "data.synthetic-dir": str(tmp_path / "data"),
        "data.synthetic-scale": 0.1,
    })
    assert cfg.simulation.modes == ["federated", "local", "centralized"]
    with pytest.raises(_Stop):
        fedspatial.simulation.simulate(cfg, modes=["federated"], integration_report=False)
    record = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert record["simulation"]["modes"] == ["federated"]
    resumed = load_config(tmp_path / "r" / "config.yaml")
    assert resumed.simulation.modes == ["federated"]  # what `simulate --resume` runs
