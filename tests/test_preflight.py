"""Pre-flight (issue 19): every bad input stops `fedspatial simulate` before Ray or Flower
start, with one clear message naming the fix, no traceback, inputs unchanged and no
results folder; `inspect` compares sites; `--allow KIND` lets a warning through."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import fedspatial.simulation
from fedspatial.cli import main
from fedspatial.shared.data.synthetic import SyntheticSpec, make_synthetic_federation

ROOT = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(sections_per_site=(1, 1, 1), spots_per_section=(30, 40), n_features=30)
HUMAN = [f"GENE{i}A" for i in range(30)]  # upper-case symbols
MOUSE = [f"Gene{i}a" for i in range(30)]  # capitalized symbols


@pytest.fixture(scope="module")
def base() -> dict[str, ad.AnnData]:
    fed = make_synthetic_federation(SPEC)
    return {site: sections[0] for site, sections in fed.items()}


@pytest.fixture(autouse=True)
def _no_simulation(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Pre-flight must decide before any work: a run that gets past it is recorded, not run."""
    calls: list[dict] = []

    def fake(cfg, **kwargs):  # type: ignore[no-untyped-def]
        calls.append({"cfg": cfg, **kwargs})
        return {}

    monkeypatch.setattr(fedspatial.simulation, "simulate", fake)
    monkeypatch.setattr("fedspatial.server.report.comparison_table", lambda results: "table")
    return calls


def _write(root: Path, sites: dict[str, ad.AnnData]) -> list[str]:
    paths = []
    for name, adata in sites.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(root / name / f"{name}_s1.h5ad")
        paths.append(str(root / name))
    return paths


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _config(tmp: Path, **sections: dict) -> Path:
    raw: dict = {
        "run-name": "t", "results-dir": str(tmp / "results"),
        "features": {"n-top-features": 30}, "clustering": {"n-domains": 3},
        "training": {"num-rounds": 1}, "simulation": {"modes": ["federated"]},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp / "config.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(raw))
    return path


def _refused(tmp: Path, capsys: pytest.CaptureFixture[str], argv: list[str], inputs: Path, needle: str) -> str:
    before = _digest(inputs)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc != 0, out + err
    assert "Traceback" not in out + err
    assert needle in err, err
    assert "Fix" in err or "fix" in err or "--allow" in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err  # one block
    assert _digest(inputs) == before  # inputs unchanged, nothing written next to them
    assert not (tmp / "results").exists()
    return err


def _mutated(base: dict[str, ad.AnnData], fn: Callable[[ad.AnnData], object], site: str = "hospital_b"
             ) -> dict[str, ad.AnnData]:
    sites = {k: v.copy() for k, v in base.items()}
    changed = fn(sites[site])
    if isinstance(changed, ad.AnnData):
        sites[site] = changed
    return sites


def _renamed(adata: ad.AnnData, names: list[str]) -> ad.AnnData:
    adata.var_names = names[: adata.n_vars]
    return adata


def _nan_coords(a: ad.AnnData) -> None:
    a.obsm["spatial"][3] = np.nan


def _neg(a: ad.AnnData) -> None:
    a.X = a.X.toarray()
    a.X[0, 0] = -2.0


def _nan_x(a: ad.AnnData) -> None:
    a.X = a.X.toarray()
    a.X[1, 1] = np.nan


def _dup_var(a: ad.AnnData) -> None:
    a.var_names = ["F0000"] * 2 + list(a.var_names[2:])


def _scaled(a: ad.AnnData) -> None:
    a.X = np.log1p(a.X.toarray()) * 1.37 + 0.01


def _scaled_with_layer(a: ad.AnnData) -> None:
    a.layers["counts"] = a.X.copy()
    _scaled(a)


def _zero(a: ad.AnnData) -> None:
    a.X = np.zeros(a.shape, dtype=np.float32)


def _same_coords(a: ad.AnnData) -> None:
    a.obsm["spatial"] = np.zeros((a.n_obs, 2))


def _cell_classes(a: ad.AnnData) -> None:
    a.obs["domain"] = pd.Categorical(np.where(np.arange(a.n_obs) % 2, "Neuron", "Astrocyte"))


def _one_column(a: ad.AnnData) -> None:
    a.obsm["spatial"] = a.obsm["spatial"][:, :1]


def _text_coords(a: ad.AnnData) -> None:
    a.obsm["spatial"] = np.asarray(a.obsm["spatial"]).astype(str)


# (kind, mutation of hospital_b, extra arguments, expected text in the message)
DATA_CASES = {
    "missing coordinates": (lambda a: a.obsm.pop("spatial") is None, [], "obsm['spatial'] is missing"),
    "NaN coordinates": (_nan_coords, [], "NaN or infinite coordinates"),
    "coordinates with one column": (_one_column, [], "has shape"),
    "text coordinates": (_text_coords, [], "non-numeric dtype"),
    "negative counts": (_neg, [], "negative values"),
    "NaN in X": (_nan_x, [], "NaN and 0 infinite"),
    "duplicate feature names": (_dup_var, [], "duplicated name"),
    "empty section": (lambda a: a[:0].copy(), [], "the section is empty"),
    "non-count X": (_scaled, [], "[non-counts]"),
    "non-count X with a counts layer": (_scaled_with_layer, [], "adata.X = adata.layers['counts']"),
    "all-zero section": (_zero, [], "[zero-section]"),
    "one-cell section": (lambda a: a[:1].copy(), [], "[tiny-section]"),
    "n-neighbors larger than a section": (lambda a: a[:8].copy(), ["--set", "neighbors.n-neighbors=10"],
                                          "neighbors.n-neighbors + 1 = 11"),
    "identical coordinates": (_same_coords, [], "[same-coordinates]"),
    "different label schemes": (_cell_classes, [], "[label-schemes]"),
    "mouse with human symbols": (None, [], "[mixed-species]"),
    "few shared features": (lambda a: _renamed(a, [*map(str, a.var_names[:10]), *MOUSE[10:]]), [],
                            "[low-overlap]"),
    "no shared feature": (lambda a: _renamed(a, [f"X{i}" for i in range(30)]), [], "share no feature"),
    "label key missing everywhere": (None, ["--set", "data.label-key=celltype"], "[no-labels]"),
    "n-domains above a site's cells": (lambda a: a[:12].copy(), ["--set", "clustering.n-domains=15",
                                       "--set", "simulation.modes=[federated,local]", "--allow", "tiny-section"],
                                       "the local mode clusters it alone"),
    "n-domains above the federation's cells": (None, ["--set", "clustering.n-domains=500"],
                                               "clustering.n-domains is 500"),
    "feature-key column missing": (None, ["--set", "data.feature-key=gene_ids"], "var['gene_ids']"),
}


FEDERATION_WIDE = {"label key missing everywhere", "n-domains above the federation's cells"}


@pytest.mark.parametrize("kind", list(DATA_CASES))
def test_bad_data_stops_simulate_before_anything_starts(kind, base, tmp_path, capsys, _no_simulation):
    fn, extra, needle = DATA_CASES[kind]
    sites = _mutated(base, fn) if fn is not None else dict(base)
    if kind == "mouse with human symbols":  # human upper-case symbols; hospital_b mouse, 5 homonyms
        sites = {k: _renamed(v.copy(), HUMAN if k != "hospital_b" else MOUSE[:25] + HUMAN[25:])
                 for k, v in base.items()}
    data = tmp_path / "data"
    paths = _write(data, sites)
    err = _refused(tmp_path, capsys, ["simulate", str(_config(tmp_path)), "--data", *paths, *extra], data, needle)
    if kind not in FEDERATION_WIDE:
        assert "hospital_b" in err  # the site is named
    assert _no_simulation == []


def test_dlpfc_config_on_a_33_gene_panel(base, tmp_path, capsys, monkeypatch):
    """The shipped DLPFC config (n-pcs 50, feature-key gene_ids) on a 33-gene panel with gene ids."""
    monkeypatch.chdir(tmp_path)
    sites = {}
    for name, adata in base.items():
        panel = ad.concat([adata, adata[:, :3]], axis=1, merge="first")  # 33 genes
        panel.var_names = [f"Gene{i}a" for i in range(33)]
        panel.var["gene_ids"] = [f"ENSMUSG{i:011d}" for i in range(33)]
        panel.obsm["spatial"] = adata.obsm["spatial"]
        sites[name] = panel
    data = tmp_path / "data"
    paths = _write(data, sites)
    err = _refused(tmp_path, capsys, ["simulate", str(ROOT / "configs" / "dlpfc.yaml"), "--data", *paths],
                   data, "features.n-pcs is 50")
    assert "--set features.n-pcs=" in err and "33 shared" in err


def _manifest_case(tmp: Path, paths: list[str], text: str) -> Path:
    path = tmp / "data" / "federation.json"
    path.write_text(text.replace("PATH_A", paths[0]).replace("PATH_B", paths[1]))
    return path


MANIFEST_CASES = {
    "manifest with bad JSON": ('{"sites": [', "not valid JSON"),
    "manifest without data-path": ('{"sites": [{"name": "a"}]}', "has no 'data-path'"),
    "manifest as a list": ('[{"name": "a", "data-path": "PATH_A"}]', "top level is a JSON list"),
    "manifest without sites": ('{"hospitals": []}', "lists no sites"),
    "manifest with duplicate site names": (
        '{"sites": [{"name": "a", "data-path": "PATH_A"}, {"name": "a", "data-path": "PATH_B"}]}', "used twice"),
    "manifest naming a missing folder": ('{"sites": [{"name": "a", "data-path": "nowhere/"}]}',
                                         "no such file or folder"),
    "missing manifest file": (None, "does not exist"),
}


@pytest.mark.parametrize("kind", list(MANIFEST_CASES))
def test_bad_manifest_is_one_line(kind, base, tmp_path, capsys):
    text, needle = MANIFEST_CASES[kind]
    data = tmp_path / "data"
    paths = _write(data, dict(base))
    manifest = _manifest_case(tmp_path, paths, text) if text is not None else tmp_path / "none.json"
    cfg = _config(tmp_path, data={"manifest": str(manifest)})
    before = _digest(data)
    assert main(["simulate", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert needle in err and "Traceback" not in out + err and err.startswith("error:")
    assert _digest(data) == before and not (tmp_path / "results").exists()
    if text is not None:  # inspect reads the manifest the same way
        rc = main(["inspect", str(manifest)])
        out, err = capsys.readouterr()
        assert rc != 0 and needle in out + err and "Traceback" not in out + err


PATH_CASES = {
    "missing site folder": (lambda d: str(d / "nowhere"), "no such file or folder"),
    "empty site folder": (lambda d: (d / "empty").mkdir() or str(d / "empty"), "holds no .h5ad files"),
    "not an h5ad file": (lambda d: (d / "x.csv").write_text("a,b\n") and str(d / "x.csv"), "not a .h5ad file"),
    "truncated file": (lambda d: _truncated(d), "not truncated"),
    "Space Ranger folder": (lambda d: _vendor(d, "visium", "spatial/tissue_positions.csv"), "Space Ranger"),
    "Xenium folder": (lambda d: _vendor(d, "xenium", "experiment.xenium"), "Xenium output folder"),
    "duplicate site names": (lambda d: f"hospital_a={d / 'hospital_b'}", "is given 2 times"),
}


def _truncated(d: Path) -> str:
    site = d / "cut"
    site.mkdir()
    good = next((d / "hospital_a").glob("*.h5ad")).read_bytes()
    (site / "s1.h5ad").write_bytes(good[: len(good) // 2])
    return str(site)


def _vendor(d: Path, name: str, marker: str) -> str:
    (d / name / marker).parent.mkdir(parents=True, exist_ok=True)
    (d / name / marker).write_text("x")
    return str(d / name)


@pytest.mark.parametrize("kind", list(PATH_CASES))
def test_bad_site_paths(kind, base, tmp_path, capsys):
    make, needle = PATH_CASES[kind]
    data = tmp_path / "data"
    paths = _write(data, dict(base))
    extra = make(data)
    _refused(tmp_path, capsys, ["simulate", str(_config(tmp_path)), "--data", *paths, extra], data, needle)


def test_allow_lets_a_warning_through_and_the_manifest_goes_to_the_run(base, tmp_path, capsys, _no_simulation):
    data = tmp_path / "data"
    paths = _write(data, _mutated(base, _scaled))
    before = _digest(data)
    argv = ["simulate", str(_config(tmp_path)), "--data", *paths]
    assert main(argv) == 2
    assert "--allow non-counts" in capsys.readouterr().err
    assert main([*argv, "--allow", "non-counts"]) == 0
    (call,) = _no_simulation
    assert [s["name"] for s in call["federation"]["sites"]] == ["hospital_a", "hospital_b", "hospital_c"]
    assert all(Path(s["data-path"]).is_absolute() for s in call["federation"]["sites"])
    assert _digest(data) == before  # no manifest next to the inputs


def test_unknown_allow_kind_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["simulate", str(_config(tmp_path)), "--data", str(tmp_path), "--allow", "everything"])
    assert "invalid choice" in capsys.readouterr().err


def test_inspect_cross_site_report(base, tmp_path, capsys):
    sites = {k: v.copy() for k, v in base.items()}
    sites["hospital_b"] = _renamed(sites["hospital_b"], [*map(str, sites["hospital_b"].var_names[:20]),
                                                          *[f"B{i}" for i in range(10)]])
    _scaled_with_layer(sites["hospital_c"])
    data = tmp_path / "data"
    paths = _write(data, sites)
    assert main(["inspect", *paths]) == 0  # warnings only
    out = capsys.readouterr().out
    assert "3 site(s)" in out and "20 feature(s) shared by the federation" in out
    assert "shared features" in out  # the pairwise table
    row_b = next(line for line in out.splitlines() if line.startswith("hospital_b "))
    assert row_b.split()[3:6] == ["30", "20", "10"]  # features, kept, dropped
    assert "non-integer (counts layer)" in out and "[non-counts]" in out
    assert "domain (5: D0" in out or "domain (4: D0" in out
    assert "--allow non-counts" in out


@pytest.mark.parametrize(
    ("names", "scheme"),
    [(HUMAN, "human symbols"), (MOUSE, "mouse symbols"), ([f"ENSG{i:011d}" for i in range(30)], "Ensembl human"),
     ([f"ENSMUSG{i:011d}" for i in range(30)], "Ensembl mouse")],
)
def test_inspect_detects_the_identifier_scheme(names, scheme, base, tmp_path, capsys):
    paths = _write(tmp_path, {"site": _renamed(base["hospital_a"].copy(), names)})
    assert main(["inspect", *paths]) == 0
    assert scheme in capsys.readouterr().out


def test_inspect_a_manifest_and_a_config(base, tmp_path, capsys):
    data = tmp_path / "data"
    paths = _write(data, dict(base))
    assert main(["manifest", *paths, "--out", str(tmp_path / "fed.json")]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "fed.json").read_text())
    assert written == {"sites": [{"name": n, "data-path": f"data/{n}"} for n in base]}
    assert main(["manifest", *paths, "--out", str(tmp_path / "fed.json")]) == 2  # no overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "fed.json"), "--config", str(_config(tmp_path))]) == 0
    assert "OK, ready to join" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "fed.json"), "--config", str(_config(tmp_path)),
                 "--set", "clustering.n-domains=1000"]) == 1
    assert "clustering.n-domains is 1000" in capsys.readouterr().out


def _config_data(kind: str, base: dict[str, ad.AnnData]) -> dict[str, ad.AnnData]:
    rng = np.random.default_rng(0)
    sites = {}
    for name, adata in base.items():
        n_genes = {"visium": 120, "panel": 300, "protein": 40}[kind]
        x = rng.poisson(3.0, size=(adata.n_obs, n_genes)).astype(np.float32)
        if kind == "protein":
            x = rng.gamma(2.0, 1.5, size=x.shape).astype(np.float32)  # intensities
        new = ad.AnnData(x, obs=adata.obs.copy())
        new.var_names = ([f"GENE{i}A" for i in range(n_genes)] if kind != "panel"
                         else [f"Gene{i}a" for i in range(n_genes)])
        new.obsm["spatial"] = adata.obsm["spatial"]
        new.obs["cell_type"] = adata.obs["domain"].astype(str)
        sites[name] = new
    return sites


@pytest.mark.parametrize(("config", "kind"), [("visium-whole-transcriptome", "visium"),
                                              ("targeted-panel", "panel"), ("protein", "protein")])
def test_example_configs_pass_preflight_on_fitting_data(config, kind, base, tmp_path, capsys, _no_simulation):
    data = tmp_path / "data"
    paths = _write(data, _config_data(kind, base))
    results = tmp_path / "results"
    argv = ["simulate", str(ROOT / "configs" / f"{config}.yaml"), "--data", *paths,
            "--set", f"results-dir={results}", "--set", "clustering.n-domains=4"]
    assert main(argv) == 0, capsys.readouterr().err
    # pre-flight passed: the run started (its log opened), and only the mocked simulation ran
    written = {p.name for p in results.rglob("*") if p.is_file()} if results.exists() else set()
    assert len(_no_simulation) == 1 and written <= {"log.txt"}


def test_protein_data_needs_the_protein_config(base, tmp_path, capsys):
    data = tmp_path / "data"
    paths = _write(data, _config_data("protein", base))
    err = _refused(tmp_path, capsys, ["simulate", str(ROOT / "configs" / "targeted-panel.yaml"), "--data", *paths,
                                      "--set", f"results-dir={tmp_path / 'results'}"], data, "[non-counts]")
    assert "data.expect-counts: false" in err


def test_client_preflight_refuses_errors_and_logs_warnings(base, tmp_path, caplog):
    from fedspatial.deployment.errors import DeployError
    from fedspatial.deployment.nodes import check_site_data

    bad = _write(tmp_path / "bad", {"s": _mutated(base, _nan_coords)["hospital_b"]})[0]
    with pytest.raises(DeployError, match="NaN or infinite coordinates"):
        check_site_data(bad)
    scaled = _write(tmp_path / "scaled", {"s": _mutated(base, _scaled)["hospital_b"]})[0]
    with caplog.at_level("WARNING"):
        assert "1 section(s)" in check_site_data(scaled)
    assert "[non-counts]" in caplog.text
