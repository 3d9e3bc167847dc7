from pathlib import Path

import pytest

from fedspatial.shared.config import ConfigError, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), ExperimentConfig)


def test_run_config_round_trip_matches_pyproject():
    import tomllib

    cfg = ExperimentConfig()
    assert ExperimentConfig.from_run_config(cfg.to_run_config()) == cfg
    flwr_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = cfg.to_run_config()
    assert set(flwr_config) == set(defaults)
    # The schema (shared/config.py) is the one definition: the Flower run config ships its
    # defaults, value and type, except the run's name.
    differ = {k: (flwr_config[k], defaults[k]) for k in defaults if k != "run-name" and (
        flwr_config[k] != defaults[k] or type(flwr_config[k]) is not type(defaults[k]))}
    assert differ == {}, f"[tool.flwr.app.config] disagrees with shared/config.py: {differ}"
    ExperimentConfig.from_run_config(flwr_config)  # every shipped key is valid


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"training": {"num-round": 3}}, "unknown key 'num-round'. Did you mean 'num-rounds'?"),
        ({"trainin": {}}, "unknown key 'trainin'"),
        ({"training": {"num-rounds": "five"}}, "num-rounds: expected an integer"),
        ({"training": {"lr": True}}, "lr: expected a number"),
        ({"training": {"num-rounds": 0}}, "training.num-rounds: must be >= 1"),
        ({"neighbors": {"graph": "delaunay"}}, "choose one of ['knn', 'radius']"),
        ({"neighbors": {"graph": "radius"}}, "neighbors.radius: must be > 0"),
        ({"simulation": {"modes": ["federated", "swarm"]}}, "simulation.modes"),
        ({"clustering": {"refine": "yes"}}, "refine: expected true or false"),
    ],
)
def test_bad_values_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(raw)
    assert needle in str(err.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("training:\n  num-rounds: 4\n")
    cfg = load_config(good, {"training.lr": 0.01})
    assert cfg.training.num_rounds == 4 and cfg.training.lr == 0.01


def test_saved_run_config_reloads(tmp_path):
    """`simulate` saves config.yaml in the run folder; `--resume` reads it back."""
    import yaml

    cfg = ExperimentConfig.from_dict({"run-name": "x", "training": {"num-rounds": 7}, "simulation": {"modes": ["local"]}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"privacy": {"delta": 0}}, "privacy.delta: must be in (0, 1)"),
        ({"privacy": {"on-exhausted": "pause"}}, "choose one of ['stop', 'continue']"),
        ({"privacy": {"central-dp": "server"}}, "central-dp"),
        ({"privacy": {"secagg": True, "central-dp": "server-fixed"}}, "privacy.secagg: combine only with central-dp 'client-fixed'"),
        ({"privacy": {"max-grad-norm": 0}}, "privacy.max-grad-norm: must be > 0"),
        ({"privacy": {"local-dp": True}, "training": {"proximal-mu": 0.1}}, "privacy.local-dp: needs training.proximal-mu 0"),
    ],
)
def test_privacy_values_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(raw)
    assert needle in str(err.value)


def test_privacy_keys_in_run_config():
    flat = ExperimentConfig.from_dict({"privacy": {"local-dp": True, "target-epsilon": 4}}).to_run_config()
    assert flat["local-dp"] is True and flat["target-epsilon"] == 4.0 and flat["central-dp"] == "none"
