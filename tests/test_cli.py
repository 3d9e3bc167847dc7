"""The command line as a user meets it (in-process, no simulation)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from fedspatial.cli import main
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    spec = SyntheticSpec(spots_per_section=(60, 90), n_features=40)
    write_synthetic_federation(root, spec)
    return root


def test_inspect_good_site(demo_data, capsys):
    assert main(["inspect", str(demo_data / "hospital_a")]) == 0
    out = capsys.readouterr().out
    assert "hospital_a_s1" in out and "OK, ready to join" in out


def test_inspect_reports_every_problem(tmp_path, capsys):
    good = ad.AnnData(np.ones((5, 3), dtype=np.float32))
    good.obsm["spatial"] = np.random.default_rng(0).random((5, 2))
    bad = good.copy()
    del bad.obsm["spatial"]
    bad.X[0, 0] = -1.0
    good.write_h5ad(tmp_path / "good.h5ad")
    bad.write_h5ad(tmp_path / "bad.h5ad")
    (tmp_path / "broken.h5ad").write_bytes(b"not an hdf5 file")
    assert main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "bad.h5ad" in out and "obsm['spatial']" in out and "Fix:" in out
    assert "negative" in out
    assert "broken.h5ad" in out


def test_simulate_rejects_bad_config(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("training:\n  num-round: 3\n")
    assert main(["simulate", str(cfg)]) == 2
    assert "Did you mean 'num-rounds'?" in capsys.readouterr().err


def test_simulate_needs_a_config():
    with pytest.raises(SystemExit, match=r"configs/demo\.yaml"):
        main(["simulate"])


def test_make_demo_data_refuses_to_overwrite(demo_data, capsys):
    assert main(["make-demo-data", str(demo_data)]) == 2
    assert "overwrite" in capsys.readouterr().err.lower()


def test_deploy_commands_parse():
    from fedspatial.cli import build_parser

    parser = build_parser()
    client = ["client", "--superlink", "fl.example.org:9092", "--data-path", "d", "--ca-cert", "ca.crt",
              "--auth-key", "k.key"]
    assert parser.parse_args(client).clientapp_runner == "warm"  # the fast executor by default
    assert parser.parse_args([*client, "--clientapp-runner", "flower"]).clientapp_runner == "flower"
    with pytest.raises(SystemExit):
        parser.parse_args([*client, "--clientapp-runner", "threads"])
    res = parser.parse_args(["results", "123", "--connection", "center", "--out", "here"])
    assert (res.run_id, res.connection, str(res.out)) == (123, "center", "here")
    assert str(parser.parse_args(["submit", "run.yaml", "--out", "mine"]).out) == "mine"
