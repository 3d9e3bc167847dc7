"""Results a lab can share (issue 19, items 4 and 5): group-readable files, one domain
palette for the federation, integer round ticks, the annotated h5ad's run record, the run
summary (Markdown and HTML, the HTML checked in a real headless browser) and `submit`
refusing to run without a federation."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from fedspatial.deployment import submit
from fedspatial.deployment.errors import DeployError
from fedspatial.server.report import write_comparison
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.phases.finalize import run_record
from fedspatial.shared.plots import (
    _pyplot,
    domain_palette,
    federation_colours,
    integer_ticks,
    plot_loss,
    plot_section_domains,
)
from fedspatial.shared.storage.atomic import write_atomic, write_json_atomic, write_text_atomic

# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path: Path, umask: int) -> None:
    """As open() would: 0o666 less the umask, for text, JSON and a writer that replaces the
    temporary file (h5py, matplotlib); not mkstemp's 0o600."""
    old = os.umask(umask)
    try:
        paths = [
            write_text_atomic(tmp_path / "a.md", "x"),
            write_json_atomic(tmp_path / "b.json", {"a": 1}),
            write_atomic(tmp_path / "c.bin", lambda tmp: (tmp.unlink(), tmp.write_bytes(b"1"))),
        ]
        with open(tmp_path / "plain", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.json", "c.bin", "plain"]  # no temporary left


# ----------------------------------------------------------------------------- colours


@pytest.mark.parametrize("n", [5, 10, 12, 20, 22, 28, 60, 102, 150])
def test_palette_never_repeats_and_is_the_same_everywhere(n: int) -> None:
    colours = domain_palette(n)
    assert len(colours) == n and len(set(colours)) == n
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
    assert domain_palette(n) == colours


def test_one_domain_has_one_colour_at_every_hospital() -> None:
    """Two hospitals whose domains overlap their labels differently: domain i has the
    federation's colour i at both; each label takes its domain's colour; 22 labels get
    22 different colours."""
    k = 8
    palette = domain_palette(k)
    dom_a = pd.Series(["0", "0", "1", "2", "3"] * 10)
    lab_a = pd.Series(["L1", "L1", "L2", "L3", "L4"] * 10)
    dom_b = pd.Series(["3", "2", "2", "7"] * 10)
    lab_b = pd.Series(["L1", "L2", "L2", "L9"] * 10)
    col_a, lab_col_a = federation_colours(dom_a, lab_a, k)
    col_b, lab_col_b = federation_colours(dom_b, lab_b, k)
    for d in {"0", "1", "2", "3", "7"}:
        for cols in (col_a, col_b):
            if d in cols:
                assert cols[d] == palette[int(d)]
    assert col_a["3"] == col_b["3"] and col_a["2"] == col_b["2"]
    assert lab_col_a["L1"] == palette[0] and lab_col_b["L1"] == palette[3]  # a label follows its domain
    many = pd.Series([f"layer_{i}" for i in range(22)] * 3)
    _, lab_col = federation_colours(pd.Series(["0", "1"] * 33), many, 2)
    assert len(set(map(str, lab_col.values()))) == 22


def test_section_plot_and_integer_round_ticks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 100, (300, 2))
    truth = np.array([f"type_{i % 24}" for i in range(300)], dtype=object)
    out = plot_section_domains(coords, rng.integers(0, 22, 300), truth, title="s", path=tmp_path / "d.png", n_domains=22)
    assert out.stat().st_size > 1000
    plt = _pyplot()
    for rounds in ([1, 2], [1, 2, 3, 4, 5], list(range(1, 31))):
        fig, ax = plt.subplots()
        ax.plot(rounds, np.linspace(1, 0, len(rounds)))
        integer_ticks(ax)
        fig.canvas.draw()
        low, high = ax.get_xlim()
        shown = [(t, lab.get_text()) for t, lab in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True) if low <= t <= high]
        ticks, labels = [t for t, _ in shown], [text for _, text in shown]
        plt.close(fig)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert labels == [str(int(t)) for t in ticks], labels
    plot_loss({"train": [(1, 1.0), (2, 0.5)]}, path=tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- the annotated h5ad


@pytest.mark.parametrize(("mode", "sim"), [("", ""), ("federated", "federated"), ("local", "hospital_a")])
def test_run_record_is_written_by_h5py_and_names_the_run(tmp_path: Path, mode: str, sim: str) -> None:
    cfg = ExperimentConfig.from_dict({"run-name": sim or "study-7", "simulation": {"simulated-mode": mode,
                                                                                    "simulated-run": "study-7" if mode else ""}})
    record = run_record(cfg, cfg.run_name, n_domains=4, refine=True)
    assert record["run"] == "study-7"
    assert record["mode"] == (mode or "federated")
    assert record["simulation"] == sim
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    adata.uns["fedspatial"] = record
    adata.uns["fedspatial_domain_colors"] = np.asarray(domain_palette(4), dtype=object)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    from fedspatial import __version__

    assert back.uns["fedspatial"]["version"] == __version__
    assert back.uns["fedspatial"]["run"] == "study-7" and int(back.uns["fedspatial"]["n_domains"]) == 4
    assert ExperimentConfig.from_dict(json.loads(back.uns["fedspatial"]["config"])) == cfg
    assert list(back.uns["fedspatial_domain_colors"]) == domain_palette(4)


# ----------------------------------------------------------------------------- the summary


def _section(site: str, cells: int, ari: float | None, plot: str, n_features: int = 100, shared: int = 90) -> dict:
    sec = {"site": site, "n_cells": cells, "plot": plot, "n_features": n_features, "n_features_shared": shared,
           "n_features_used": 50}
    if ari is not None:
        sec.update(ari=ari, nmi=ari / 2)
    return sec


def _fake_run(folder: Path) -> dict[str, dict]:
    """A run folder as `fedspatial simulate` leaves it: federated and local modes."""
    fed = {
        "sections": {"a/s1": _section("a", 120, 0.5, "x"), "b/s1": _section("b", 80, None, "y", 1000, 92)},
        "sites": {"a": {"n_cells": 120, "ari": 0.5, "nmi": 0.25}, "b": {"n_cells": 80}},
        "n-features-shared": 90, "n-features-selected": 50, "mapped-panels": {},
        "dropped-sites": {"c": "no reply within 600 s"}, "markers": {"skipped": "local DP"},
        "warnings": ["section b/s1: X does not look like counts"],
    }
    write_json_atomic(folder / "federated" / "metrics.json", fed)
    for site, sec in fed["sections"].items():
        name = site.split("/")[0]
        write_json_atomic(folder / "local" / name / "metrics.json", {
            "sections": {site: {**sec, "ari": 0.3, "nmi": 0.2}}, "sites": {name: {"ari": 0.3, "nmi": 0.2}},
        })
    plot_loss({"train": [(1, 1.0), (2, 0.5)]}, path=folder / "federated" / "loss.png")
    plot_section_domains(np.random.default_rng(0).uniform(0, 1, (50, 2)), np.arange(50) % 3, None,
                         title="a/s1", path=folder / "federated" / "sites" / "a" / "a__s1_domains.png", n_domains=3)
    plot_loss({"train": [(1, 2.0), (2, 1.5)]}, path=folder / "local" / "a" / "loss.png")
    score = {"joint_ari": 0.5, "joint_nmi": 0.4, "mean_section_ari": 0.5, "median_section_ari": 0.5,
             "wall_s": 12.0, "seconds_per_round": 1.5}
    return {"federated": score, "local": {**score, "joint_ari": float("nan")}}


def test_summary_holds_sites_sections_warnings_and_every_figure(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    results = _fake_run(folder)
    table = write_comparison(folder, results)
    md = (folder / "summary.md").read_text()
    assert table.strip() in md and "| local | nan |" in md
    for needle in ("## Modes", "## Sites", "## Sections", "## Features", "## Warnings", "## Figures",
                   "2 site(s), 2 section(s), 200 cells", "| a/s1 | a | 120 | 100 | 90 | 50 | 0.500 | 0.250 | 0.300 | 0.200 |",
                   "| b/s1 | b | 80 | 1000 | 92 | 50 | – | – |", "site c was dropped", "marker genes skipped",
                   "X does not look like counts", "no labels in 1 section(s) (b/s1)", "kept 92 of its 1000 features"):
        assert needle in md, needle
    pngs = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        assert f"]({png})" in md
    page = (folder / "summary.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "X does not look like counts" in page
    assert json.loads((folder / "summary.json").read_text())["federated"]["joint_ari"] == 0.5
    assert stat.S_IMODE((folder / "summary.html").stat().st_mode) & 0o044 == 0o044 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chromium() -> str | None:
    return next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)


@pytest.mark.slow
def test_summary_html_images_render_in_a_headless_browser(tmp_path: Path) -> None:
    """Slow: needs Chromium (`apt-get install chromium`); opens summary.html and reads
    every image's naturalWidth after the page has loaded (0 for a broken image)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    folder = tmp_path / "study"
    write_comparison(folder, _fake_run(folder))
    page = (folder / "summary.html").read_text()
    probe = ('<script>window.addEventListener("load",()=>{document.body.setAttribute("data-widths",'
             '[...document.images].map(i=>i.complete?i.naturalWidth:-1).join(","))})</script></body>')
    checked = folder / "checked.html"  # the page as written, plus a broken image (the check must see it) and the probe
    checked.write_text(page.replace("</body>", '<img src="data:image/png;base64,AAAA" alt="broken">' + probe))
    (folder / "federated" / "loss.png").unlink()  # inline images do not need the files
    flags = ["--headless", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to sandbox as root (CI containers)
    out = subprocess.run([browser, *flags, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-widths="([^"]*)"', out.stdout)
    assert found, out.stderr[-2000:]
    widths = [int(w) for w in found.group(1).split(",")]
    assert len(widths) == 4 and all(w > 0 for w in widths[:3]) and widths[3] == 0, widths
    shot = folder / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,3000", checked.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


# ----------------------------------------------------------------------------- submit


def _no_flwr(name: str) -> str:
    raise AssertionError(f"{name} must not be started")


@pytest.mark.parametrize(
    "flwr_config",
    [
        None,  # no file: flwr would create one whose default is its local simulation
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n',
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = ":local-in-memory:"\noptions.num-supernodes = 3\n',
        '[superlink.center]\naddress = "center.example.org:9093"\n',  # no default
    ],
)
def test_submit_without_a_federation_refuses_and_starts_nothing(tmp_path: Path, monkeypatch, flwr_config) -> None:
    home = tmp_path / "flwr"
    monkeypatch.setenv("FLWR_HOME", str(home))
    if flwr_config is not None:
        home.mkdir()
        (home / "config.toml").write_text(flwr_config)
    before = sorted(p.name for p in home.iterdir()) if home.exists() else None
    monkeypatch.setattr(submit, "flower_binary", _no_flwr)
    config = tmp_path / "run.yaml"
    config.write_text("run-name: r1\n")
    with pytest.raises(DeployError) as err:
        submit.run_submit(config, overrides={}, connection=None, superlink=None, ca_cert=None, app_dir=None)
    text = str(err.value)
    assert f"fedspatial submit {config} --superlink CENTER_HOST:9093 --ca-cert ca.crt" in text
    assert f"fedspatial submit {config} --connection NAME" in text
    assert str(home / "config.toml") in text
    assert (sorted(p.name for p in home.iterdir()) if home.exists() else None) == before  # nothing written


def test_submit_cli_prints_the_two_lines(tmp_path: Path, monkeypatch, capsys) -> None:
    from fedspatial.cli import main

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "none"))
    monkeypatch.setattr(submit, "flower_binary", _no_flwr)
    config = tmp_path / "run.yaml"
    config.write_text("run-name: r1\n")
    assert main(["submit", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no federation to submit to" in err and "--superlink CENTER_HOST:9093" in err and "--connection NAME" in err
    assert "Traceback" not in err


def test_a_real_default_connection_is_used(tmp_path: Path) -> None:
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "center"\n\n[superlink.center]\naddress = "10.0.0.5:9093"\n')
    assert submit.default_connection_problem({"FLWR_HOME": str(home)}) is None
