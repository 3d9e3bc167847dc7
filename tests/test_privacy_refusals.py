"""Local DP refuses the releases its ledger does not cover, before anything is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.phases.base import Run, SiteDescription
from fedspatial.shared.phases.feature_space import FeatureSpacePhase


def test_local_dp_refuses_federated_pca() -> None:
    with pytest.raises(ConfigError, match=r"features\.n-pcs: federated PCA releases statistics"):
        ExperimentConfig.from_dict({"features": {"n-pcs": 10}, "privacy": {"local-dp": True}})
    ExperimentConfig.from_dict({"features": {"n-pcs": 10}})  # fine without local DP


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("clustering", "mixture", "tied"), ("clustering", "harmony", "section"), ("clustering", "n-init", 3)],
)
def test_local_dp_refuses_clustering_without_a_private_version(section: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: .*privacy\.local-dp"):
        ExperimentConfig.from_dict({section: {key: value}, "privacy": {"local-dp": True}})
    ExperimentConfig.from_dict({section: {key: value}})  # fine without local DP


class _NothingSent:
    sites = ("a", "b")

    def ask(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a message was sent before the refusal")


def _run(tmp_path: Path, **privacy: Any) -> Run:
    cfg = ExperimentConfig.from_dict({"privacy": privacy})
    genes = [f"g{i}" for i in range(100)]
    run = Run(cfg, {}, tmp_path)
    run.sites = {
        "a": SiteDescription(10, ["a/s1"], ["a"], [10], {"a/s1": genes}, []),
        "b": SiteDescription(10, ["b/s1"], ["b"], [10], {"b/s1": genes[:20]}, []),  # a 20-gene panel
        "c": SiteDescription(10, ["c/s1"], ["c"], [10], {"c/s1": genes}, []),
    }
    return run


def test_local_dp_refuses_small_panel_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"small feature panel.*small-panel-fraction: 0"):
        FeatureSpacePhase().run(_NothingSent(), _run(tmp_path, **{"local-dp": True}))  # type: ignore[arg-type]
    # Without local DP the plan maps b's section (and would now ask for feature statistics).
    with pytest.raises(AssertionError, match="before the refusal"):
        FeatureSpacePhase().run(_NothingSent(), _run(tmp_path))  # type: ignore[arg-type]
