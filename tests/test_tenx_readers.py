"""Space Ranger (Visium) and Xenium output folders as sections (issue 19, item 2).

The folders are tiny synthetic copies of the real layouts: the 10x HDF5 matrix
(``matrix/{barcodes,data,indices,indptr,shape,features/...}``, as scanpy's
``read_10x_h5`` reads it), Space Ranger's ``spatial/tissue_positions*.csv`` and Xenium's
``cells.parquet`` / ``cells.csv.gz``. Values are small enough to check by hand.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from fedspatial.cli import main
from fedspatial.shared.data.io import inspect_site, load_site
from fedspatial.shared.data.synthetic import SyntheticSpec, make_synthetic_federation
from fedspatial.shared.data.tenx import read_10x_h5
from fedspatial.shared.data.validation import DataValidationError

GEX = "Gene Expression"


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], ids: list[str], names: list[str],
                 types: list[str]) -> None:
    """A Cell Ranger >= 3 / Space Ranger / Xenium HDF5 matrix: features x barcodes in CSC."""
    csc = sparse.csc_matrix(np.asarray(counts).T)  # features x barcodes
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=csc.data.astype(np.int32))
        m.create_dataset("indices", data=csc.indices.astype(np.int64))
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        feats = m.create_group("features")
        feats.create_dataset("id", data=np.array(ids, dtype="S"))
        feats.create_dataset("name", data=np.array(names, dtype="S"))
        feats.create_dataset("feature_type", data=np.array(types, dtype="S"))
        feats.create_dataset("genome", data=np.array(["GRCh38"] * len(ids), dtype="S"))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def write_spaceranger(root: Path, counts: np.ndarray, barcodes: list[str], names: list[str],
                      positions: pd.DataFrame, *, layout: str = "csv", outs: str = "outs") -> Path:
    """``root/outs`` of a Space Ranger run: matrix, tissue positions and scale factors.

    ``layout``: ``"csv"`` (Space Ranger >= 2.0, header), ``"list"`` (1.x,
    tissue_positions_list.csv without header) or ``"parquet"`` (Visium HD bins); ``outs``:
    where the files go under ``root``."""
    out = root / outs
    ids = [f"ENSG{i:011d}" for i in range(len(names))]
    write_10x_h5(out / "filtered_feature_bc_matrix.h5", counts, barcodes, ids, names, [GEX] * len(names))
    (out / "spatial").mkdir(parents=True)
    if layout == "list":
        positions.to_csv(out / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    elif layout == "parquet":
        positions.to_parquet(out / "spatial" / "tissue_positions.parquet", index=False)
    else:
        positions.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    (out / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 89.4, "tissue_hires_scalef": 0.15, "tissue_lowres_scalef": 0.045}))
    return root


def write_xenium(root: Path, counts: np.ndarray, cell_ids: list[str], names: list[str], types: list[str],
                 cells: pd.DataFrame, *, tables: tuple[str, ...] = ("parquet", "csv.gz")) -> Path:
    """A Xenium output bundle: cell_feature_matrix.h5, cells.parquet / cells.csv.gz, experiment.xenium."""
    ids = [f"ENSG{i:011d}" if t == GEX else name for i, (name, t) in enumerate(zip(names, types, strict=True))]
    write_10x_h5(root / "cell_feature_matrix.h5", counts, cell_ids, ids, names, types)
    if "parquet" in tables:
        cells.to_parquet(root / "cells.parquet", index=False)
    if "csv.gz" in tables:
        cells.to_csv(root / "cells.csv.gz", index=False)
    (root / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125}))
    return root


def _state(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under ``root``: content digest and modification time."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------ tiny hand-made folders

# Space Ranger: 4 barcodes in the matrix, one of them (BBB) outside the tissue; the
# positions list a 5th spot (EEE) that is not in the matrix. Gene "MT1" appears twice.
SR_BARCODES = ["AAA-1", "BBB-1", "CCC-1", "DDD-1"]
SR_GENES = ["MT1", "ACTB", "MT1"]
SR_COUNTS = np.array([[1, 0, 2], [5, 5, 5], [0, 3, 0], [4, 0, 1]])
SR_POSITIONS = pd.DataFrame({
    "barcode": ["EEE-1", "DDD-1", "CCC-1", "BBB-1", "AAA-1"],
    "in_tissue": [1, 1, 1, 0, 1],
    "array_row": [0, 1, 2, 3, 4],
    "array_col": [10, 11, 12, 13, 14],
    "pxl_row_in_fullres": [900, 400, 300, 200, 100],  # y
    "pxl_col_in_fullres": [950, 450, 350, 250, 150],  # x
})

# Xenium: 3 cells; 2 genes plus 3 control features; the cells table lists the cells in
# another order, with one extra cell.
XE_CELLS = ["aaaa-1", "bbbb-1", "cccc-1"]
XE_NAMES = ["EPCAM", "NegControlProbe_00042", "KRT8", "NegControlCodeword_0500", "UnassignedCodeword_0007"]
XE_TYPES = [GEX, "Negative Control Probe", GEX, "Negative Control Codeword", "Unassigned Codeword"]
XE_COUNTS = np.array([[3, 1, 0, 1, 1], [0, 0, 7, 0, 0], [2, 2, 2, 2, 2]])
XE_TABLE = pd.DataFrame({
    "cell_id": ["cccc-1", "zzzz-1", "aaaa-1", "bbbb-1"],
    "x_centroid": [30.5, 99.0, 10.25, 20.0],
    "y_centroid": [3.5, 99.0, 1.25, 2.0],
    "transcript_counts": [6, 0, 3, 7],
    "cell_area": [50.0, 1.0, 40.0, 45.0],
})


@pytest.mark.parametrize("layout", ["csv", "list", "parquet"])
def test_space_ranger_folder_is_one_section(tmp_path, layout):
    folder = write_spaceranger(tmp_path / "sample1", SR_COUNTS, SR_BARCODES, SR_GENES, SR_POSITIONS, layout=layout)
    before = _state(tmp_path)
    for path in (folder, folder / "outs"):  # the outs/ folder or its parent
        (section,) = load_site(path)
        a = section.adata
        assert section.name == "sample1" and section.source == folder / "outs"
        assert a.obs_names.tolist() == ["AAA-1", "CCC-1", "DDD-1"]  # BBB is outside the tissue
        assert a.var_names.tolist() == ["MT1", "ACTB", "MT1-1"]
        assert a.var["gene_ids"].tolist() == ["ENSG00000000000", "ENSG00000000001", "ENSG00000000002"]
        assert sparse.issparse(a.X) and a.X.dtype == np.float32
        np.testing.assert_array_equal(a.X.toarray(), [[1, 0, 2], [0, 3, 0], [4, 0, 1]])
        np.testing.assert_array_equal(a.obsm["spatial"], [[150, 100], [350, 300], [450, 400]])  # x, y
        assert a.obs["array_row"].tolist() == [4, 2, 1] and a.obs["in_tissue"].tolist() == [1, 1, 1]
        assert a.uns["spatial"]["sample1"]["scalefactors"]["spot_diameter_fullres"] == 89.4
    assert _state(tmp_path) == before  # nothing written, nothing touched


@pytest.mark.parametrize("tables", [("parquet", "csv.gz"), ("csv.gz",), ("parquet",)])
def test_xenium_folder_is_one_section(tmp_path, tables):
    folder = write_xenium(tmp_path / "xenium_run", XE_COUNTS, XE_CELLS, XE_NAMES, XE_TYPES, XE_TABLE, tables=tables)
    before = _state(tmp_path)
    (section,) = load_site(folder)
    a = section.adata
    assert section.name == "xenium_run"
    assert a.obs_names.tolist() == XE_CELLS  # the matrix's order, matched on cell_id
    assert a.var_names.tolist() == ["EPCAM", "KRT8"]  # control probes and codewords dropped
    assert a.var["feature_types"].tolist() == [GEX, GEX]
    np.testing.assert_array_equal(a.X.toarray(), [[3, 0], [0, 7], [2, 2]])
    np.testing.assert_array_equal(a.obsm["spatial"], [[10.25, 1.25], [20.0, 2.0], [30.5, 3.5]])
    assert a.obs["transcript_counts"].tolist() == [3, 7, 6]
    assert _state(tmp_path) == before


def test_xenium_without_pyarrow(tmp_path, monkeypatch):
    """Parquet needs pyarrow: without it cells.csv.gz is read, and a parquet-only folder
    is refused naming the package."""
    both = write_xenium(tmp_path / "both", XE_COUNTS, XE_CELLS, XE_NAMES, XE_TYPES, XE_TABLE)
    only = write_xenium(tmp_path / "only", XE_COUNTS, XE_CELLS, XE_NAMES, XE_TYPES, XE_TABLE, tables=("parquet",))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (section,) = load_site(both)
    np.testing.assert_array_equal(section.adata.obsm["spatial"][:, 0], [10.25, 20.0, 30.5])
    with pytest.raises(DataValidationError, match=r"cells\.parquet: reading parquet needs the pyarrow package"):
        load_site(only)


def test_reader_agrees_with_scanpy(tmp_path):
    """The synthetic files follow the real layout: scanpy's reader gives the same matrix."""
    sc = pytest.importorskip("scanpy")
    h5 = tmp_path / "cell_feature_matrix.h5"
    write_10x_h5(h5, XE_COUNTS, XE_CELLS, [f"id{i}" for i in range(5)], XE_NAMES, XE_TYPES)
    ours, theirs = read_10x_h5(h5), sc.read_10x_h5(h5)
    assert ours.obs_names.tolist() == theirs.obs_names.tolist()
    assert ours.var_names.tolist() == theirs.var_names.tolist()
    assert ours.var["gene_ids"].tolist() == theirs.var["gene_ids"].tolist()
    assert ours.X.dtype == theirs.X.dtype
    np.testing.assert_array_equal(ours.X.toarray(), theirs.X.toarray())


def test_missing_files_are_named(tmp_path):
    sr = write_spaceranger(tmp_path / "sr", SR_COUNTS, SR_BARCODES, SR_GENES, SR_POSITIONS)
    (sr / "outs" / "spatial" / "tissue_positions.csv").unlink()
    xe = write_xenium(tmp_path / "xe", XE_COUNTS, XE_CELLS, XE_NAMES, XE_TYPES, XE_TABLE)
    (xe / "cell_feature_matrix.h5").unlink()
    no_cells = write_xenium(tmp_path / "no_cells", XE_COUNTS, XE_CELLS, XE_NAMES, XE_TYPES, XE_TABLE, tables=())
    before = _state(tmp_path)
    problems = {name: inspect_site(tmp_path / name)[1] for name in ("sr", "xe", "no_cells")}
    assert problems["sr"] == [
        f"no spatial/tissue_positions.csv (nor tissue_positions_list.csv) in {sr / 'outs'}: is this a Space "
        "Ranger outs/ folder? Cell Ranger (single-cell) output has no spot coordinates. Fix: point at Space "
        "Ranger's outs/ folder (or the folder holding it), copied with its spatial/ subfolder"]
    (xe_problem,) = problems["xe"]
    assert xe_problem.startswith(f"{xe} looks like a Xenium output folder, but has no cell_feature_matrix.h5")
    (cells_problem,) = problems["no_cells"]
    assert cells_problem.startswith(f"no cells.parquet (nor cells.csv.gz) in {no_cells}")
    assert _state(tmp_path) == before


def test_mismatched_matrix_and_positions(tmp_path):
    positions = SR_POSITIONS[SR_POSITIONS["barcode"] != "CCC-1"]
    sr = write_spaceranger(tmp_path / "sr", SR_COUNTS, SR_BARCODES, SR_GENES, positions)
    (problem,) = inspect_site(sr)[1]
    assert "1 of 4 barcodes (e.g. CCC-1) are not in" in problem and "different runs" in problem


def test_site_folder_of_several_10x_sections(tmp_path):
    """A site folder holding one Space Ranger run per section (and an .h5ad): every one a section."""
    site = tmp_path / "hospital"
    write_spaceranger(site / "151673", SR_COUNTS, SR_BARCODES, SR_GENES, SR_POSITIONS)
    write_spaceranger(site / "151674", SR_COUNTS, SR_BARCODES, SR_GENES, SR_POSITIONS, layout="list")
    write_xenium(site / "xenium_run", XE_COUNTS, XE_CELLS, XE_NAMES, XE_TYPES, XE_TABLE)
    sections = load_site(site)
    assert [s.name for s in sections] == ["151673", "151674", "xenium_run"]
    assert [s.adata.n_obs for s in sections] == [3, 3, 3]


def test_other_vendor_folders_get_a_conversion_hint(tmp_path):
    """Visium HD (one section per bin size), MERSCOPE and CosMx output: a fix, not a guess."""
    hd = tmp_path / "hd"
    bins = "outs/binned_outputs/square_016um"  # Space Ranger >= 3.0 on Visium HD
    write_spaceranger(hd, SR_COUNTS, SR_BARCODES, SR_GENES, SR_POSITIONS, layout="parquet", outs=bins)
    merscope = tmp_path / "merscope"
    merscope.mkdir()
    (merscope / "cell_by_gene.csv").write_text("cell,A\n1,2\n")
    cosmx = tmp_path / "cosmx"
    cosmx.mkdir()
    (cosmx / "Run5_exprMat_file.csv.gz").write_bytes(b"")
    for path in (hd, hd / "outs"):
        (problem,) = inspect_site(path)[1]
        assert "looks like a Visium HD output folder" in problem and "square_016um" in problem
    (section,) = load_site(hd / bins)  # one bin size is one section
    assert section.adata.n_obs == 3
    assert "Vizgen MERSCOPE" in inspect_site(merscope)[1][0] and "spatialdata_io.merscope" in inspect_site(merscope)[1][0]
    assert "NanoString CosMx" in inspect_site(cosmx)[1][0]


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def federation() -> dict[str, list[ad.AnnData]]:
    spec = SyntheticSpec(seed=11, sections_per_site=(1, 1, 1), spots_per_section=(110, 140), n_features=50)
    return make_synthetic_federation(spec)


def _as_spaceranger(adata: ad.AnnData, root: Path) -> Path:
    """A synthetic section written as a Space Ranger run (plus two spots outside the tissue)."""
    counts = np.vstack([adata.X.toarray(), np.ones((2, adata.n_vars))]).astype(np.int64)
    barcodes = [*adata.obs_names, "OUT-1", "OUT-2"]
    xy = np.vstack([adata.obsm["spatial"], [[0.0, 0.0], [1.0, 1.0]]])
    positions = pd.DataFrame({
        "barcode": barcodes, "in_tissue": [1] * adata.n_obs + [0, 0],
        "array_row": np.arange(len(barcodes)), "array_col": np.arange(len(barcodes)),
        "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0],
    })
    return write_spaceranger(root, counts, barcodes, list(adata.var_names), positions)


def _as_xenium(adata: ad.AnnData, root: Path) -> Path:
    """A synthetic section written as a Xenium run, with two control features."""
    counts = np.hstack([adata.X.toarray(), np.ones((adata.n_obs, 2))]).astype(np.int64)
    names = [*adata.var_names, "NegControlProbe_00001", "BLANK_0001"]
    types = [GEX] * adata.n_vars + ["Negative Control Probe", "Blank Codeword"]
    xy = np.asarray(adata.obsm["spatial"])
    cells = pd.DataFrame({"cell_id": list(adata.obs_names), "x_centroid": xy[:, 0], "y_centroid": xy[:, 1]})
    return write_xenium(root, counts, list(adata.obs_names), names, types, cells, tables=("csv.gz",))


@pytest.fixture
def three_sites(federation, tmp_path) -> tuple[Path, list[str]]:
    """hospital_a: an .h5ad folder; hospital_b: a Space Ranger run; hospital_c: a Xenium run."""
    data = tmp_path / "data"
    (data / "hospital_a").mkdir(parents=True)
    federation["hospital_a"][0].write_h5ad(data / "hospital_a" / "s1.h5ad")
    _as_spaceranger(federation["hospital_b"][0], data / "hospital_b")
    _as_xenium(federation["hospital_c"][0], data / "hospital_c")
    return data, [str(data / s) for s in ("hospital_a", "hospital_b", "hospital_c")]


def test_inspect_accepts_10x_folders(three_sites, federation, capsys):
    data, paths = three_sites
    before = _state(data)
    assert main(["inspect", *paths]) == 0
    out = capsys.readouterr().out
    assert "3 site(s)" in out and "50 feature(s) shared by the federation" in out
    assert "Traceback" not in out
    sections = {name: load_site(path)[0].adata for name, path in zip("abc", paths, strict=True)}
    for name in "bc":
        truth = federation[f"hospital_{name}"][0]
        a = sections[name]
        assert a.obs_names.tolist() == truth.obs_names.tolist()  # out-of-tissue spots dropped
        assert a.var_names.tolist() == truth.var_names.tolist()  # control features dropped
        np.testing.assert_array_equal(a.X.toarray(), truth.X.toarray())
        np.testing.assert_allclose(a.obsm["spatial"], truth.obsm["spatial"])
    assert _state(data) == before


@pytest.mark.flower
def test_simulate_with_a_space_ranger_and_a_xenium_site(three_sites, tmp_path, capsys):
    data, paths = three_sites
    before = _state(data)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({
        "run-name": "tenx", "results-dir": str(tmp_path / "results"),
        "features": {"n-top-features": 40}, "model": {"hidden-dim": 16, "latent-dim": 4},
        "training": {"local-epochs": 1, "batch-size": 64},
        "clustering": {"n-domains": 3}, "markers": {"marker-genes": False},
    }))
    rc = main(["simulate", str(cfg), "--data", *paths, "--mode", "federated", "--set", "training.num-rounds=1"])
    assert rc == 0, capsys.readouterr().err
    run = tmp_path / "results" / "tenx"
    assert [s["name"] for s in json.loads((run / "federation.json").read_text())["sites"]] == [
        "hospital_a", "hospital_b", "hospital_c"]
    report = json.loads((run / "federated" / "metrics.json").read_text())
    assert set(report["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert [r["round"] for r in report["rounds"]] == [1]
    assert _state(data) == before  # inputs unchanged, nothing written next to them
