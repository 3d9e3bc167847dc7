"""End to end through Flower's simulation runtime: 3 sites, 2 rounds, then a resume."""

from __future__ import annotations

import dataclasses
import json

import anndata as ad
import pytest
from processes import descendants

from fedspatial.server.run_store import RunExistsError
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation
from fedspatial.simulation import simulate

pytestmark = pytest.mark.flower


def _ray_processes() -> set[int]:
    """Ray processes started by this test process (other jobs on the machine may run Ray too)."""
    return descendants(markers=("ray::", "raylet", "gcs_server"))


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    spec = dataclasses.replace(SyntheticSpec(seed=3), spots_per_section=(150, 220), n_features=120)
    return write_synthetic_federation(root / "data", spec)


def _config(manifest, results, **training):
    return ExperimentConfig.from_dict(
        {
            "run-name": "it",
            "results-dir": str(results),
            "data": {"manifest": str(manifest)},
            "features": {"n-top-features": 80},
            "model": {"hidden-dim": 32, "latent-dim": 8},
            "training": {"num-rounds": 2, "batch-size": 64, **training},
            "simulation": {"modes": ["federated"]},
        }
    )


def test_federated_simulation_end_to_end_and_resume(federation, tmp_path):
    before = _ray_processes()
    inputs = {p: p.read_bytes() for p in federation.parent.rglob("*.h5ad")}
    cfg = _config(federation, tmp_path)
    results = simulate(cfg)

    run = tmp_path / "it" / "federated"
    report = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["n-sites"] == 3 and r["bytes-sent"] > 0 for r in report["rounds"])
    assert set(report["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert 0.0 <= report["joint"]["ari"] <= 1.0
    assert (run / "model" / "model.safetensors").is_file() and (run / "loss.png").is_file()
    assert json.loads((run / "checkpoint" / "state.json").read_text())["round"] == 2
    # Each site wrote its annotated sections and plots at home.
    written = sorted((run / "sites").rglob("*.h5ad"))
    assert len(written) == sum(len(s["sections"]) for s in report["sites"].values())
    annotated = ad.read_h5ad(written[0])
    assert annotated.obsm["X_fedspatial"].shape[1] == 8
    assert set(annotated.obs["fedspatial_domain"].cat.categories) == {str(i) for i in range(5)}
    assert annotated.obs["fedspatial_confidence"].between(0, 1).all()
    record = annotated.uns["fedspatial"]  # the user's run name, not the mode (issue 19)
    assert (record["run"], record["mode"], record["simulation"]) == ("it", "federated", "federated")
    assert json.loads(record["config"])["training"]["num-rounds"] == 2 and record["version"]
    assert len(annotated.uns["fedspatial_domain_colors"]) == 5
    assert report["sections"][next(iter(report["sections"]))]["n_features_used"] == 80
    assert len(list((run / "sites").rglob("*_domains.png"))) == len(written)
    assert "federated" in (tmp_path / "it" / "summary.md").read_text()
    assert (tmp_path / "it" / "summary.html").read_text().count("data:image/png;base64,") == len(
        list((tmp_path / "it").rglob("*.png")))
    assert results["federated"]["wall_s"] > 0
    # Inputs untouched.
    assert all(p.read_bytes() == b for p, b in inputs.items())
    # An existing run is never overwritten silently.
    with pytest.raises(RunExistsError):
        simulate(cfg)

    # Interrupt after round 2 (the checkpoint stays), then resume to 3 rounds:
    # only round 3 is trained, the history keeps rounds 1-2.
    (run / "metrics.json").unlink()
    resumed = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, num_rounds=3))
    simulate(resumed, resume=True)
    report = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["round"] == 3
    # Nothing left running: Ray's processes were stopped with the simulation.
    assert _ray_processes() <= before


def _shuffled_ari(run_dir, seed: int = 0, repeats: int = 20) -> float:
    """The highest joint ARI of the run's domains against randomly permuted labels."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    truth, found = [], []
    for path in sorted(run_dir.rglob("*.h5ad")):
        a = ad.read_h5ad(path)
        truth += a.obs["domain"].astype(str).tolist()
        found += a.obs["fedspatial_domain"].astype(str).tolist()
    rng = np.random.default_rng(seed)
    return max(adjusted_rand_score(rng.permutation(truth), found) for _ in range(repeats))


def test_every_mode_learns(federation, tmp_path):
    """Training lowers the loss and the domains match the tissue far above chance, in
    the federated, local-only and centralized modes alike."""
    cfg = _config(federation, tmp_path, **{"num-rounds": 6})
    cfg = dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, modes=["federated", "local", "centralized"]))
    results = simulate(cfg)
    runs = {
        "federated": [tmp_path / "it" / "federated"],
        "centralized": [tmp_path / "it" / "centralized"],
        "local": sorted(p for p in (tmp_path / "it" / "local").iterdir() if p.is_dir()),
    }
    for mode, folders in runs.items():
        for run in folders:
            losses = [r["train-loss"] for r in json.loads((run / "metrics.json").read_text())["rounds"]]
            assert len(losses) == 6 and losses[-1] < losses[0] - 0.02, (mode, run.name, losses)
        # Local domain ids are each site's own: judge those runs per section.
        score = results[mode]["mean_section_ari" if mode == "local" else "joint_ari"]
        chance = max(_shuffled_ari(run / "sites") for run in folders)
        assert score > chance + 0.1, (mode, score, chance)
