"""Starting from a trained model (``model.init-from``) and fine-tuning only its last layer
(``model.fine-tune: last``), with and without local DP."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation
from fedspatial.shared.features.selection import FeatureSpace
from fedspatial.shared.models import CellAutoencoder
from fedspatial.shared.phases.training import freeze_for_fine_tuning
from fedspatial.shared.privacy.dp import NodeBound, dp_train_epochs, plan_round
from fedspatial.shared.storage.checkpoint import save_checkpoint
from fedspatial.shared.storage.pretrained import pretrained_space, read_pretrained
from fedspatial.shared.training.loop import GraphData, per_cell_data, train_epochs

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


def _cfg(**sections) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"run-name": "t", **sections})


def _cells(n: int = 200, f: int = 12) -> GraphData:
    x = torch.randn(n, f, generator=torch.Generator().manual_seed(0))
    return per_cell_data(GraphData(x, torch.zeros(n, 0, dtype=torch.int64), [("s", 0, n)], None))


@pytest.mark.parametrize("engine", ["plain", "ghost", "hooks"])
def test_fine_tuning_the_last_layer_leaves_every_other_weight_as_loaded(engine):
    torch.manual_seed(0)
    model, data = CellAutoencoder(12, 8, 3), _cells()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_for_fine_tuning(model, "last")
    if engine == "plain":
        train_epochs(model, data, epochs=1, batch_size=32, lr=1e-2, weight_decay=0.1, proximal_mu=0.1)
    else:
        plan = plan_round(200, batch_size=32, epochs=1, max_grad_norm=1.0, bound=NodeBound(0), node_noise_multiplier=1.0)
        dp_train_epochs(model, data, plan, lr=1e-2, weight_decay=0.1, grad_sample_mode=engine, seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"to_latent.weight", "to_latent.bias"}


def test_fine_tune_last_needs_a_model_to_start_from():
    with pytest.raises(ConfigError, match=r"model\.init-from"):
        _cfg(model={"fine-tune": "last"})


def test_a_folder_without_a_model_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no fedspatial model.*federated/model"):
        read_pretrained(_cfg(model={"init-from": str(tmp_path)}), encoder="gat")


def _space(shared: list[str]) -> FeatureSpace:
    n = len(shared)
    return FeatureSpace(shared, shared[: n // 2], np.zeros(n // 2, np.float32), np.ones(n // 2, np.float32), 1e4, None)


def test_a_model_of_the_other_encoder_kind_is_refused(tmp_path):
    from fedspatial.shared.protocol.feature_space import feature_space_to_config

    model = CellAutoencoder(3, 4, 2)
    save_checkpoint(tmp_path, model.state_dict(), {"model": model.model_config(),
                                                    "feature-space": feature_space_to_config(_space(list("abcdef")))})
    assert read_pretrained(_cfg(model={"init-from": str(tmp_path)}), encoder="cell").model_config["in_dim"] == 3
    with pytest.raises(ConfigError, match=r"holds a cell_autoencoder.*encoder is 'gat'"):
        read_pretrained(_cfg(model={"init-from": str(tmp_path)}), encoder="gat")


def test_the_sites_must_hold_every_gene_of_the_loaded_space(tmp_path):
    from fedspatial.shared.storage.pretrained import Pretrained

    pre = Pretrained(tmp_path, {}, {}, _space(list("abcdef")))
    cfg = _cfg()
    assert pretrained_space(pre, cfg, {"s1": list("abcdefg")}).selected == list("abc")
    with pytest.raises(ConfigError, match=r"section s2 lacks 2 of the 6 genes.*e, f"):
        pretrained_space(pre, cfg, {"s1": list("abcdef"), "s2": list("abcd")})
    private = _cfg(privacy={"local-dp": True, "feature-clip": 7.0})
    assert pretrained_space(pre, private, {"s1": list("abcdef")}).clip_norm == 7.0  # the run's own clip


@pytest.mark.flower
def test_private_fine_tuning_of_a_loaded_model_end_to_end(tmp_path):
    """A locally private run that starts from a saved model (standing in for a public one)
    and trains only its last layer: everything else arrives at the end as loaded, the
    feature space is the loaded one, and the ledger holds the section means and DP-SGD."""
    from fedspatial.shared.protocol.feature_space import feature_space_to_config
    from fedspatial.simulation import simulate

    spec = dataclasses.replace(SyntheticSpec(seed=2), spots_per_section=(120, 160), n_features=60)
    manifest = write_synthetic_federation(tmp_path / "data", spec)
    genes = [f"F{g:04d}" for g in range(60)]
    space = FeatureSpace(genes, genes[::2], np.full(30, 0.5, np.float32), np.ones(30, np.float32), 1e4, None)
    torch.manual_seed(1)
    public = CellAutoencoder(30, 16, 4)
    loaded = tmp_path / "public" / "model"
    save_checkpoint(loaded, public.state_dict(), {"model": public.model_config(), "feature-space": feature_space_to_config(space)})
    private = ExperimentConfig.from_dict({
        "run-name": "private", "results-dir": str(tmp_path / "results"), "data": {"manifest": str(manifest)},
        "model": {"init-from": str(loaded), "fine-tune": "last"},
        "training": {"num-rounds": 2, "batch-size": 64, "local-epochs": 1},
        "clustering": {"n-domains": 3}, "simulation": {"modes": ["federated"]},
        "privacy": {"local-dp": True, "target-epsilon": 8.0},
    })
    simulate(private)
    run = tmp_path / "results" / "private" / "federated"
    start, end = load_file(str(loaded / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert start.keys() == end.keys()
    for name in start:  # FedAvg's weighted mean of equal arrays is equal up to float32 rounding
        same = np.allclose(start[name], end[name], rtol=1e-5, atol=1e-6)
        assert same != name.startswith("to_latent."), name
    saved = json.loads((run / "model" / "model.json").read_text())["feature-space"]
    assert saved["fs-selected"] == genes[::2] and saved["fs-clip_norm"] == 20.0  # the run's own clip
    report = json.loads((run / "metrics.json").read_text())
    assert report["init-from"] == str(loaded) and report["fine-tune"] == "last"
    assert report["n-features-selected"] == 30
    for ledger_file in sorted((run / "sites").glob("*/privacy_ledger.json")):
        ledger = json.loads(ledger_file.read_text())
        assert {"feature-stats", "dp-sgd", "dp-kmeans", "dp-table"} == {r["kind"] for r in ledger["releases"]}
        assert ledger["epsilon"] <= 8.0 * 1.0001
