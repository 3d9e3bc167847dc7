"""Tests of site loading, validation and summaries."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from fedspatial.shared.data.io import inspect_site, list_h5ad, load_site, summarize_site
from fedspatial.shared.data.validation import DataValidationError, validate_section


def _make_adata(
    n_obs: int = 30, n_vars: int = 8, *, dense: bool = False, seed: int = 0
) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, size=(n_obs, n_vars)).astype(np.float32)
    adata = anndata.AnnData(
        X=counts if dense else sparse.csr_matrix(counts),
        obs=pd.DataFrame(
            {
                "domain": pd.Categorical(
                    rng.choice(["D0", "D1"], n_obs), categories=["D0", "D1", "D2"]
                )
            },
            index=[f"spot{i}" for i in range(n_obs)],
        ),
        var=pd.DataFrame(index=[f"G{j}" for j in range(n_vars)]),
    )
    adata.obsm["spatial"] = rng.uniform(0, 1000, size=(n_obs, 2))
    return adata


def _write(adata: anndata.AnnData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def _only_problem(path: Path, **kwargs) -> str:
    with pytest.raises(DataValidationError) as info:
        load_site(path, **kwargs)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


# ----------------------------------------------------------------------------- happy path


def test_load_folder_sorted_sections(tmp_path):
    for name in ("s2", "s1"):
        _write(_make_adata(), tmp_path / "site" / f"{name}.h5ad")
    sections = load_site(tmp_path / "site")
    assert [s.name for s in sections] == ["s1", "s2"]
    assert sections[0].source == tmp_path / "site" / "s1.h5ad"
    assert sections[0].adata.n_obs == 30 and not sections[0].adata.isbacked


def test_load_accepts_file_and_list_of_paths(tmp_path):
    a = _write(_make_adata(), tmp_path / "a" / "s1.h5ad")
    b = _write(_make_adata(), tmp_path / "b" / "s2.h5ad")
    assert [s.name for s in load_site(a)] == ["s1"]
    assert [s.name for s in load_site([a, str(b), a])] == ["s1", "s2"]  # duplicates read once


def test_split_by_section_key(tmp_path):
    adata = _make_adata()
    adata.obs["slice"] = np.where(np.arange(adata.n_obs) < 10, "top", "bottom")
    path = _write(adata, tmp_path / "block.h5ad")
    sections = load_site(path, section_key="slice")
    assert [s.name for s in sections] == ["block/bottom", "block/top"]
    assert [s.adata.n_obs for s in sections] == [20, 10]


def test_section_key_missing_is_reported(tmp_path):
    path = _write(_make_adata(), tmp_path / "block.h5ad")
    message = _only_problem(path, section_key="slice")
    assert str(path) in message and "obs['slice']" in message and "Fix:" in message


def test_custom_spatial_key(tmp_path):
    adata = _make_adata()
    adata.obsm["X_spatial"] = adata.obsm.pop("spatial")
    path = _write(adata, tmp_path / "s1.h5ad")
    assert len(load_site(path, spatial_key="X_spatial")) == 1
    assert "obsm['spatial'] is missing" in _only_problem(path)


# ----------------------------------------------------------------------------- validation problems


def _drop_spatial(a: anndata.AnnData) -> None:
    del a.obsm["spatial"]


def _one_column_spatial(a: anndata.AnnData) -> None:
    a.obsm["spatial"] = a.obsm["spatial"][:, :1]


def _four_column_spatial(a: anndata.AnnData) -> None:
    a.obsm["spatial"] = np.hstack([a.obsm["spatial"], a.obsm["spatial"]])


def _nan_coordinates(a: anndata.AnnData) -> None:
    a.obsm["spatial"][[1, 4, 7], 0] = np.nan
    a.obsm["spatial"][2, 1] = np.inf


def _nan_in_x(a: anndata.AnnData) -> None:
    _set_x(a, 0, 0, np.nan)
    _set_x(a, 1, 1, np.nan)


def _inf_in_x(a: anndata.AnnData) -> None:
    _set_x(a, 0, 0, np.inf)


def _negative_x(a: anndata.AnnData) -> None:
    _set_x(a, 0, 0, -1.5)
    _set_x(a, 2, 3, -0.2)


def _duplicate_features(a: anndata.AnnData) -> None:
    a.var_names = ["G0", "G1", "G0", "G3", "G1", "G5", "G6", "G7"]


def _set_x(a: anndata.AnnData, i: int, j: int, value: float) -> None:
    x = a.X.toarray() if sparse.issparse(a.X) else a.X.copy()
    x[i, j] = value
    a.X = sparse.csr_matrix(x) if sparse.issparse(a.X) else x


PROBLEMS: dict[str, tuple[Callable[[anndata.AnnData], None], str, str]] = {
    # case: (mutation, field named in the message, detail the message must carry)
    "missing-spatial": (_drop_spatial, "obsm['spatial']", "is missing"),
    "one-column-spatial": (_one_column_spatial, "obsm['spatial']", "(30, 1)"),
    "four-column-spatial": (_four_column_spatial, "obsm['spatial']", "(30, 4)"),
    "nan-coordinates": (_nan_coordinates, "obsm['spatial']", "in 4 of 30 observations"),
    "nan-x": (_nan_in_x, "X contains", "2 NaN"),
    "inf-x": (_inf_in_x, "X contains", "1 infinite"),
    "negative-x": (_negative_x, "X contains", "2 negative"),
    "duplicate-features": (_duplicate_features, "var_names", "'G0', 'G1'"),
}


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", list(PROBLEMS))
def test_each_problem_names_file_field_and_fix(tmp_path, case, dense):
    mutate, field, detail = PROBLEMS[case]
    adata = _make_adata(dense=dense)
    mutate(adata)
    path = _write(adata, tmp_path / "site_a" / "s1.h5ad")
    message = _only_problem(tmp_path / "site_a")
    assert message.startswith(str(path)), message
    assert field in message and detail in message and "Fix:" in message, message


def test_empty_section_is_reported(tmp_path):
    path = _write(_make_adata()[:0].copy(), tmp_path / "empty.h5ad")
    message = _only_problem(path)
    assert str(path) in message and "empty" in message and "Fix:" in message


def test_validate_section_accepts_valid_data_and_non_integer_values(caplog):
    adata = _make_adata(dense=True)
    adata.X = adata.X * 1234.567  # MALDI-like intensities: non-integer but not log-scaled
    with caplog.at_level(logging.WARNING):
        assert validate_section(adata, source="x.h5ad") == []
    assert "log-transformed" not in caplog.text


def test_log_transformed_data_only_warns(caplog):
    adata = _make_adata()
    adata.X = adata.X.log1p()
    with caplog.at_level(logging.WARNING):
        assert validate_section(adata, source="logged.h5ad") == []
    assert "logged.h5ad" in caplog.text and "log-transformed" in caplog.text


def test_dense_x_is_scanned_in_blocks(monkeypatch):
    import fedspatial.shared.data.validation as validation

    monkeypatch.setattr(validation, "_DENSE_BLOCK_ELEMENTS", 16)
    adata = _make_adata(n_obs=50, dense=True)
    adata.X[49, 7] = -3.0
    adata.X[0, 0] = np.nan
    problems = validate_section(adata, source="big.h5ad")
    assert any("1 negative" in p for p in problems) and any("1 NaN" in p for p in problems)


def test_error_message_lists_every_problem():
    error = DataValidationError(["a.h5ad: first", "b.h5ad: second"])
    assert isinstance(error, ValueError)
    assert error.problems == ["a.h5ad: first", "b.h5ad: second"]
    assert (
        "2 problem" in str(error)
        and "  - a.h5ad: first" in str(error)
        and "  - b.h5ad: second" in str(error)
    )


# ----------------------------------------------------------------------------- files


def test_corrupt_file_is_reported_with_all_other_problems(tmp_path):
    site = tmp_path / "site"
    corrupt = site / "a_corrupt.h5ad"
    site.mkdir()
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    bad = _make_adata()
    _drop_spatial(bad)
    _write(bad, site / "b_nospatial.h5ad")
    _write(_make_adata(), site / "c_ok.h5ad")
    with pytest.raises(DataValidationError) as info:
        load_site(site)
    problems = info.value.problems
    assert len(problems) == 2
    assert (
        problems[0].startswith(f"cannot read {corrupt} as AnnData (.h5ad)")
        and "Fix:" in problems[0]
    )
    assert "b_nospatial.h5ad" in problems[1]


def test_loading_never_modifies_inputs(tmp_path):
    site = tmp_path / "site"
    paths = [_write(_make_adata(seed=i), site / f"s{i}.h5ad") for i in range(2)]
    adata = _make_adata()
    adata.obs["slice"] = ["x"] * 15 + ["y"] * 15
    paths.append(_write(adata, site / "s9.h5ad"))

    def snapshot() -> list[tuple[str, int]]:
        return [(hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths]

    before = snapshot()
    sections = load_site(site)
    sections[0].adata.X[0, 0] = 99.0  # editing the in-memory copy must not touch the file
    load_site(site, section_key=None)
    inspect_site(site, section_key="slice")
    assert snapshot() == before
    assert sorted(p.name for p in site.iterdir()) == ["s0.h5ad", "s1.h5ad", "s9.h5ad"]


def test_list_h5ad(tmp_path):
    site = tmp_path / "site"
    _write(_make_adata(), site / "b.h5ad")
    _write(_make_adata(), site / "a.H5AD")
    _write(_make_adata(), site / ".b.h5ad.tmp.h5ad")  # interrupted write: hidden, skipped
    (site / "notes.txt").write_text("x")
    (site / "nested").mkdir()
    _write(_make_adata(), site / "nested" / "c.h5ad")  # non-recursive
    assert [p.name for p in list_h5ad(site)] == ["a.H5AD", "b.h5ad"]
    assert list_h5ad(site / "b.h5ad") == [site / "b.h5ad"]

    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list_h5ad(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"not a \.h5ad file"):
        list_h5ad(site / "notes.txt")
    (tmp_path / "root" / "hospital_a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="hospital_a"):
        list_h5ad(tmp_path / "root")


def test_missing_path_is_a_validation_problem(tmp_path):
    message = _only_problem(tmp_path / "nowhere")
    assert "nowhere" in message and "no such file or folder" in message


def test_duplicate_section_names_across_folders(tmp_path):
    a = _write(_make_adata(), tmp_path / "a" / "s1.h5ad")
    b = _write(_make_adata(), tmp_path / "b" / "s1.h5ad")
    message = _only_problem([a.parent, b.parent])
    assert "'s1'" in message and str(a) in message and str(b) in message


# ----------------------------------------------------------------------------- summaries


def test_summary_and_format(tmp_path):
    _write(_make_adata(n_obs=30), tmp_path / "s1.h5ad")
    other = _make_adata(n_obs=12, n_vars=6)
    other.obs["sample"] = "patient_7"
    _write(other, tmp_path / "s2.h5ad")
    summary = summarize_site(load_site(tmp_path))

    assert summary.n_sections == 2 and summary.n_spots == 42
    assert summary.n_features_total == 8 and summary.n_features_shared == 6
    first = summary.sections[0]
    assert first.n_spots == 30 and first.n_features == 8
    assert 0 <= first.x_range[0] <= first.x_range[1] <= 1000
    assert set(summary.labels) == {"D0", "D1", "D2"} and summary.labels["D2"] == 0
    assert sum(summary.labels.values()) == 42
    assert summary.label_columns["sample"] == {"patient_7": 12}

    text = summary.format()
    for expected in ("s1", "s2", "42 spots", "domain", "D2=0", "sample", "x range"):
        assert expected in text, text


def test_summary_without_labels(tmp_path):
    adata = _make_adata()
    del adata.obs["domain"]
    _write(adata, tmp_path / "s1.h5ad")
    summary = summarize_site(load_site(tmp_path))
    assert summary.labels is None and summary.sections[0].label_counts is None
    assert "absent" in summary.format()


def test_inspect_site_never_raises(tmp_path):
    _write(_make_adata(), tmp_path / "good.h5ad")
    bad = _make_adata()
    _drop_spatial(bad)
    _write(bad, tmp_path / "bad.h5ad")
    (tmp_path / "junk.h5ad").write_bytes(b"not an h5 file")

    summary, problems = inspect_site(tmp_path)
    assert len(problems) == 2
    assert [s.name for s in summary.sections] == ["bad", "good"]
    assert summary.sections[0].x_range is None and "invalid" in summary.format()

    assert inspect_site(tmp_path / "good.h5ad") == (
        summarize_site(load_site(tmp_path / "good.h5ad")),
        [],
    )
    summary, problems = inspect_site(tmp_path / "missing")
    assert summary is None and "no such file or folder" in problems[0]
