"""The run report comes back through a run's log, which whoever runs code at the center
can write to: a crafted result line must never make the submitter write anything but
``metrics.json``/``config.json`` into the chosen results folder (issue 14, item 6). And
no reply of a site carries the hospital's own folder paths."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from fedspatial.deployment import submit
from fedspatial.deployment.errors import DeployError
from fedspatial.deployment.submit import run_results, save_results
from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.protocol.result_line import (
    RESULT_MARKER,
    ResultLineError,
    parse_result_line,
    result_line,
)
from fedspatial.shared.protocol.site_paths import strip_site_paths

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBAD attacker@example\n"


def crafted(run_name: str, files: dict[str, str]) -> str:
    """A result line as an attacker would write it: valid JSON, valid checksums."""
    bundle = {
        "run-name": run_name,
        "center-folder": "/srv/x",
        "files": files,
        "sha256": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in files.items()},
    }
    return RESULT_MARKER + json.dumps(bundle)


@pytest.mark.parametrize(
    ("run_name", "files", "needle"),
    [
        ("../../home/user/.ssh", {"authorized_keys": KEY}, "not a valid run name"),
        ("r1", {"authorized_keys": KEY}, "unexpected file"),
        ("../../home/user/.ssh", {"metrics.json": KEY}, "not a valid run name"),
        (".ssh", {"metrics.json": KEY}, "not a valid run name"),
        ("/root/.ssh", {"config.json": KEY}, "not a valid run name"),
        ("r1", {"../.ssh/authorized_keys": KEY}, "unexpected file"),
        ("r1", {"/root/.ssh/authorized_keys": KEY}, "unexpected file"),
        ("r1", {"metrics.json": KEY, ".bashrc": KEY}, "unexpected file"),
    ],
)
def test_crafted_result_lines_are_refused(run_name: str, files: dict[str, str], needle: str) -> None:
    with pytest.raises(ResultLineError, match=needle):
        parse_result_line(crafted(run_name, files))
    # save_results checks too, whoever hands it a bundle
    bundle = json.loads(crafted(run_name, files)[len(RESULT_MARKER):])
    with pytest.raises(DeployError, match=needle):
        save_results(bundle, Path("/nonexistent-never-written"))


def test_the_real_report_still_passes(tmp_path: Path) -> None:
    """Negative control: what the ServerApp sends is accepted and saved."""
    files = {"metrics.json": "{}\n", "config.json": '{"run-name": "study-1"}\n'}
    bundle = parse_result_line(result_line("study-1", "/srv/results/study-1", files))
    assert bundle is not None
    saved = save_results(bundle, tmp_path / "study-1")
    assert sorted(p.name for p in saved) == ["config.json", "metrics.json"]


def test_fedspatial_results_does_not_plant_an_ssh_key(tmp_path: Path, monkeypatch, caplog) -> None:
    """`fedspatial results RUN_ID` on a log holding the crafted line of the review: the
    line is refused with a clear message and nothing is written anywhere."""
    home = tmp_path / "home" / "user"
    (home / ".ssh").mkdir(parents=True)
    work = home / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    line = crafted("../../.ssh", {"authorized_keys": KEY})  # results/../../.ssh = ~/.ssh
    fake_flwr = tmp_path / "flwr"  # stands in for `flwr log RUN_ID --stream`
    fake_flwr.write_text(f"#!{sys.executable}\nprint('INFO : run log')\nprint({line!r})\n")
    fake_flwr.chmod(fake_flwr.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(submit, "flower_binary", lambda name: str(fake_flwr))
    with pytest.raises(DeployError, match="holds no run report"):
        run_results(7, connection=None, out=None)
    assert "not a valid run name" in caplog.text and "refusing to save it" in caplog.text
    assert not (home / ".ssh" / "authorized_keys").exists()
    assert sorted(os.listdir(home)) == [".ssh", "work"] and os.listdir(work) == []


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    files = {"metrics.json": "{}\n"}
    bundle = parse_result_line(result_line("r1", "/srv/r1", files))
    assert bundle is not None
    outside = tmp_path / "outside.txt"
    outside.write_text("keep\n")
    folder = tmp_path / "r1"
    folder.mkdir()
    (folder / "metrics.json").symlink_to(outside)
    with pytest.raises(DeployError, match="symbolic link"):
        save_results(bundle, folder)
    linked = tmp_path / "linked"
    linked.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(DeployError, match="symbolic link"):
        save_results(bundle, linked)
    assert outside.read_text() == "keep\n" and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("name", ["..", ".hidden", "../up", "a/b", "a\\b", ""])
def test_config_refuses_run_names_that_are_paths(name: str) -> None:
    with pytest.raises(ConfigError, match="run-name"):
        ExperimentConfig.from_dict({"run-name": name})


def test_site_replies_carry_no_absolute_paths(tmp_path: Path) -> None:
    out, data = tmp_path / "hospital" / "out", tmp_path / "hospital" / "data"
    report = {
        "site": "hospital_a",
        "sections": {"hospital_a/s1": {"output": str(out / "a__s1.h5ad"), "plot": str(out / "a__s1_domains.png")}},
        "outputs": [str(out / "a__s1.h5ad")],
        "source": str(data / "s1.h5ad"),
        "contingency": {"hospital_a": {"labels": ["/L1", "WM"]}},  # a label is not a path of ours
    }
    reply = Payload({"x": np.zeros(2)}, {"report": json.dumps(report), "files": [str(out / "ledger.json")], "n": 3})
    clean = strip_site_paths(reply, [out, data])
    text = json.dumps(clean.config)
    assert str(tmp_path) not in text
    got = json.loads(str(clean.config["report"]))
    assert got["sections"]["hospital_a/s1"] == {"output": "a__s1.h5ad", "plot": "a__s1_domains.png"}
    assert got["outputs"] == ["a__s1.h5ad"] and got["source"] == "s1.h5ad"
    assert got["contingency"]["hospital_a"]["labels"] == ["/L1", "WM"]
    assert clean.config["files"] == ["ledger.json"] and clean.config["n"] == 3
    # negative control: the report as finalize writes it does hold the paths
    assert str(out) in reply.config["report"]  # type: ignore[operator]


def test_submit_fails_when_the_run_report_does_not_come_back(tmp_path: Path, monkeypatch, caplog) -> None:
    """`flwr run` exits 0 but the log holds no run report (the ServerApp stopped early):
    `fedspatial submit` must not report success to a script that submitted the run."""
    monkeypatch.chdir(tmp_path)
    fake_flwr = tmp_path / "flwr"  # stands in for `flwr run APP --stream`: a log and exit 0
    fake_flwr.write_text(f"#!{sys.executable}\nprint('INFO : run log without a report')\n")
    fake_flwr.chmod(fake_flwr.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(submit, "flower_binary", lambda name: str(fake_flwr))
    config = tmp_path / "run.yaml"
    config.write_text("run-name: r1\n")
    root = Path(__file__).resolve().parents[1]
    code = submit.run_submit(config, overrides={}, connection="c", superlink=None, ca_cert=None, app_dir=root)
    assert code == 1 and "report did not come back" in caplog.text
    assert not (tmp_path / "results").exists()
