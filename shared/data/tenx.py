"""Readers for 10x Genomics output folders: Space Ranger (Visium) and Xenium.

A folder is one tissue section, read fully into memory; nothing is ever written to it
(HDF5 files are opened read-only, tables are read with pandas).

* **Space Ranger** (``outs/``): ``filtered_feature_bc_matrix.h5`` (or, without it,
  ``raw_feature_bc_matrix.h5``) and the spot positions ``spatial/tissue_positions.csv``
  (Space Ranger >= 2.0, with a header), ``spatial/tissue_positions_list.csv`` (1.x, no
  header) or ``spatial/tissue_positions.parquet`` (Visium HD bins; needs pyarrow). Spots
  in the matrix and in tissue are kept; ``obsm[spatial_key]`` holds
  ``(pxl_col_in_fullres, pxl_row_in_fullres)``, i.e. x, y in full-resolution image
  pixels, as scanpy and squidpy store them; ``obs`` gets ``in_tissue``, ``array_row``,
  ``array_col``; ``spatial/scalefactors_json.json`` goes to
  ``uns["spatial"][name]["scalefactors"]`` (images are not read).
* **Xenium** (instrument bundle or Xenium Ranger ``outs/``): ``cell_feature_matrix.h5``
  restricted to the ``Gene Expression`` features (negative-control probes and
  codewords, blank/unassigned codewords are dropped), and ``cells.parquet`` (needs
  pyarrow) or ``cells.csv.gz``, matched on ``cell_id``; ``obsm[spatial_key]`` holds
  ``(x_centroid, y_centroid)`` in microns, ``obs`` the other columns of the cells table.

Both give ``var_names`` the gene symbols (made unique: ``GENE``, ``GENE-1``, ...),
``var["gene_ids"]`` the Ensembl ids and ``var["feature_types"]``, and ``X`` the raw counts
as a float32 CSR matrix, as :func:`scanpy.read_10x_h5` does.

Dependencies
------------
The 10x HDF5 matrix (``matrix/{barcodes,data,indices,indptr,shape,features/...}``) is
read here with h5py, scipy and pandas, which anndata already requires, following
:func:`scanpy.read_10x_h5` (the tests check the two agree). ``spatialdata-io`` was not
used: it pulls scanpy, spatialdata (dask, xarray, zarr, geopandas), scikit-image,
dask-image, imagecodecs, ome-types and readfcs, to build image and shape elements that a
section does not need, and it would make Visium and Xenium need an extra. Nor is scanpy
imported: it is not a dependency of fedspatial (only of its tests), and it imports numba
and umap for one ~50-line function. Only parquet files need an optional package
(``pyarrow``); a Xenium folder also holding ``cells.csv.gz`` is read without it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import anndata
import h5py
import numpy as np
import pandas as pd
from anndata.utils import make_index_unique
from scipy import sparse

__all__ = ["TenxError", "read_10x_h5", "read_spaceranger", "read_tenx", "read_xenium", "tenx_folder"]

log = logging.getLogger(__name__)

TenxKind = Literal["spaceranger", "xenium"]
# Files that identify 10x output folders (any one is enough; the reader then names
# whatever else is missing).
SPACERANGER_MARKERS = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5", "spatial/tissue_positions.csv",
                       "spatial/tissue_positions_list.csv", "spatial/tissue_positions.parquet")
XENIUM_MARKERS = ("experiment.xenium", "cell_feature_matrix.h5", "cells.parquet", "cells.csv.gz",
                  "transcripts.parquet")

GENE_EXPRESSION = "Gene Expression"
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
INSTALL_PARQUET = "pip install pyarrow  (or: pip install 'fedspatial[io]')"
_POSITION_FILES = ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv",
                   "spatial/tissue_positions.parquet")
_CELL_FILES = ("cells.parquet", "cells.csv.gz", "cells.csv")
_MAX_SHOWN = 3


class TenxError(ValueError):
    """A 10x output folder cannot be read as a section; the message names the file and the fix."""


def tenx_folder(path: Path) -> tuple[TenxKind, Path] | None:
    """The kind and output folder of a Space Ranger / Xenium output folder, else None.

    ``path`` may be the output folder itself (Space Ranger's or Xenium Ranger's ``outs/``,
    or a Xenium instrument bundle) or the folder holding ``outs/``. A Visium HD ``outs/``
    (with ``binned_outputs/``) is not one section: each bin size's folder is.
    """
    if not path.is_dir() or path.suffix.lower() == ".zarr":
        return None
    for root in (path, path / "outs"):
        if not root.is_dir() or (root / "binned_outputs").is_dir():
            continue
        if any((root / name).exists() for name in XENIUM_MARKERS):
            return "xenium", root
        if any((root / name).exists() for name in SPACERANGER_MARKERS):
            return "spaceranger", root
    return None


def _shown(values: Any) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:_MAX_SHOWN]) + (f" (+{len(values) - _MAX_SHOWN} more)" if len(values) > _MAX_SHOWN else "")


def _strings(values: np.ndarray) -> np.ndarray:
    """HDF5 / parquet text (bytes, str or ids) -> an object array of ``str``."""
    values = np.asarray(values)
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    if values.dtype.kind == "O":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values.astype(str).astype(object)


# ----------------------------------------------------------------------------- 10x HDF5


def _read_matrix_group(file: h5py.File, path: Path) -> tuple[sparse.csr_matrix, pd.Index, pd.DataFrame]:
    group = file["matrix"]
    features = group["features"]
    n_features, n_barcodes = (int(n) for n in group["shape"][()])
    barcodes = _strings(group["barcodes"][()])
    data, indices, indptr = group["data"][()], group["indices"][()], group["indptr"][()]
    if len(barcodes) != n_barcodes or len(indptr) != n_barcodes + 1 or len(data) != len(indices):
        raise TenxError(
            f"{path}: the 10x matrix is inconsistent (shape {n_features} x {n_barcodes}, "
            f"{len(barcodes)} barcodes, {len(indptr)} indptr entries): the file is truncated or "
            "damaged. Fix: copy it again from the instrument's output"
        )
    var = pd.DataFrame(index=pd.Index(_strings(features["name"][()]), name=None))
    if "gene_id" in features:  # a probe-barcode matrix: ids are probe ids
        var["gene_ids"] = _strings(features["gene_id"][()])
        var["probe_ids"] = _strings(features["id"][()])
    else:
        var["gene_ids"] = _strings(features["id"][()])
    var["feature_types"] = _strings(features["feature_type"][()])
    for key, item in features.items():
        skip = key in ("name", "id", "gene_id", "feature_type", "_all_tag_keys")
        if not skip and isinstance(item, h5py.Dataset) and item.shape == (n_features,):
            var[key] = item[()].astype(bool) if item.dtype.kind == "b" else _strings(item[()])
    # 10x stores features x barcodes in CSC, i.e. barcodes x features in CSR.
    x = sparse.csr_matrix((data.astype(np.float32, copy=False), indices, indptr), shape=(n_barcodes, n_features))
    return x, pd.Index(barcodes), var


def read_10x_h5(path: Path, *, gex_only: bool = True) -> anndata.AnnData:
    """A 10x Genomics HDF5 feature-barcode matrix (Cell Ranger >= 3 layout) in memory.

    Parameters
    ----------
    path
        ``filtered_feature_bc_matrix.h5`` (Space Ranger) or ``cell_feature_matrix.h5``
        (Xenium).
    gex_only
        Keep only ``Gene Expression`` features (drops control probes and codewords).

    Returns
    -------
    anndata.AnnData
        ``X`` of shape (n_barcodes, n_features), float32 CSR counts; ``obs_names`` the
        barcodes (cell ids); ``var_names`` the (unique) feature names; ``var`` with
        ``gene_ids``, ``feature_types`` and the other per-feature datasets (``genome``).

    Raises
    ------
    TenxError
        When the file is not a 10x matrix, lacks a dataset, or is inconsistent.
    """
    try:
        with h5py.File(path, "r") as file:
            if "matrix" not in file:
                raise TenxError(
                    f"{path}: no 'matrix' group, so not a 10x HDF5 feature-barcode matrix of Space "
                    "Ranger, Xenium or Cell Ranger >= 3 (groups found: "
                    f"{_shown(file.keys()) or 'none'}). Fix: use the .h5 matrix the instrument wrote"
                )
            x, barcodes, var = _read_matrix_group(file, path)
    except KeyError as exc:
        raise TenxError(
            f"{path}: the 10x matrix lacks a dataset ({exc}). Fix: copy the file again from the "
            "instrument's output; it is incomplete or not a 10x feature-barcode matrix"
        ) from None
    except OSError as exc:
        raise TenxError(
            f"{path}: cannot open as HDF5 ({exc}). Fix: copy the file again; it is truncated or damaged"
        ) from None
    if gex_only:
        keep = (var["feature_types"] == GENE_EXPRESSION).to_numpy()
        if not keep.all():
            dropped = var.loc[~keep, "feature_types"].value_counts()
            log.info("%s: dropping %d non-gene features (%s)", path, int((~keep).sum()),
                     ", ".join(f"{k}: {v}" for k, v in dropped.items()))
        x, var = x[:, np.flatnonzero(keep)], var.loc[keep]
    names = var.index
    if not names.is_unique:
        log.info("%s: %d duplicated feature name(s) made unique (e.g. %s -> %s-1)", path,
                 int(names.duplicated().sum()), names[names.duplicated()][0], names[names.duplicated()][0])
        var.index = make_index_unique(pd.Index(names.astype(str)))
    obs = pd.DataFrame(index=barcodes)
    return anndata.AnnData(X=x, obs=obs, var=var)


# ----------------------------------------------------------------------------- tables


def _read_parquet(path: Path) -> pd.DataFrame | None:
    """The table, or None when pyarrow is not installed."""
    try:
        import pyarrow.parquet  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return None
    return pd.read_parquet(path, engine="pyarrow")


def _no_parquet(path: Path, instead: str) -> TenxError:
    return TenxError(
        f"{path}: reading parquet needs the pyarrow package, which is not installed. Fix: "
        f"{INSTALL_PARQUET}, or provide {instead}"
    )


def _tissue_positions(root: Path) -> tuple[pd.DataFrame, Path]:
    """The spot table indexed by barcode, and the file it came from."""
    file = next((root / name for name in _POSITION_FILES if (root / name).is_file()), None)
    if file is None:
        raise TenxError(
            f"no spatial/tissue_positions.csv (nor tissue_positions_list.csv) in {root}: is this a "
            "Space Ranger outs/ folder? Cell Ranger (single-cell) output has no spot coordinates. "
            "Fix: point at Space Ranger's outs/ folder (or the folder holding it), copied with its "
            "spatial/ subfolder"
        )
    if file.suffix == ".parquet":
        table = _read_parquet(file)
        if table is None:
            raise _no_parquet(file, "spatial/tissue_positions.csv")
    else:
        with file.open() as handle:  # header in Space Ranger >= 2.0; tolerate either way
            has_header = handle.readline().split(",")[0].strip() == "barcode"
        table = pd.read_csv(file, header=0 if has_header else None)
        if not has_header:
            table.columns = [*POSITION_COLUMNS, *table.columns[len(POSITION_COLUMNS):]][: table.shape[1]]
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise TenxError(
            f"{file}: columns {_shown(missing)} are missing (found {_shown(table.columns)}). Fix: "
            f"use Space Ranger's file unchanged: columns {', '.join(POSITION_COLUMNS)}"
        )
    table["barcode"] = _strings(table["barcode"].to_numpy())
    return table.set_index("barcode"), file


def _scalefactors(root: Path) -> dict[str, Any] | None:
    file = root / "spatial" / "scalefactors_json.json"
    if not file.is_file():
        return None
    try:
        values = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: not read (%s); the section is read without scale factors", file, exc)
        return None
    return values if isinstance(values, dict) else None


# ----------------------------------------------------------------------------- readers


def read_spaceranger(root: Path, *, spatial_key: str = "spatial", name: str | None = None) -> anndata.AnnData:
    """A Space Ranger (Visium) ``outs/`` folder as one in-memory section.

    Parameters
    ----------
    root
        The ``outs/`` folder (holding ``filtered_feature_bc_matrix.h5`` and ``spatial/``).
    spatial_key
        ``obsm`` key for the coordinates.
    name
        Library id under ``uns["spatial"]`` (default: the folder's name).

    Returns
    -------
    anndata.AnnData
        In-tissue spots x gene-expression features; ``obsm[spatial_key]`` of shape
        (n_spots, 2) holds x, y in full-resolution pixels.

    Raises
    ------
    TenxError
        Naming the missing or inconsistent file and the fix.
    """
    matrix = root / "filtered_feature_bc_matrix.h5"
    if not matrix.is_file():
        raw = root / "raw_feature_bc_matrix.h5"
        if not raw.is_file():
            raise TenxError(
                f"{root} looks like a Space Ranger (Visium) output folder, but has no "
                "filtered_feature_bc_matrix.h5 (nor raw_feature_bc_matrix.h5). Fix: point at Space "
                "Ranger's outs/ folder (or the folder holding it), copied whole; the .h5 matrix is "
                "needed (the filtered_feature_bc_matrix/ MEX folder is not read)"
            )
        log.info("%s: no filtered_feature_bc_matrix.h5; reading the in-tissue spots of %s", root, raw.name)
        matrix = raw
    positions, source = _tissue_positions(root)
    adata = read_10x_h5(matrix)
    _check_same_run(adata, positions.index, matrix, source, what="barcodes", table="the positions",
                    fix="use the outs/ folder of one Space Ranger run unchanged")
    spots = positions.loc[adata.obs_names]
    in_tissue = spots["in_tissue"].to_numpy() == 1
    if not in_tissue.all():
        log.info("%s: dropping %d spot(s) outside the tissue", root, int((~in_tissue).sum()))
    adata = adata[in_tissue].copy()
    spots = spots.loc[in_tissue]
    adata.obs = spots[["in_tissue", "array_row", "array_col"]].copy()
    adata.obs.index.name = None
    adata.obsm[spatial_key] = spots[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    if (scalefactors := _scalefactors(root)) is not None:
        adata.uns["spatial"] = {name or root.name: {"scalefactors": scalefactors}}
    return adata


def _cells_table(root: Path) -> tuple[pd.DataFrame, Path]:
    present = [root / name for name in _CELL_FILES if (root / name).is_file()]
    for file in present:
        table = _read_parquet(file) if file.suffix == ".parquet" else pd.read_csv(file)
        if table is not None:
            return table, file
    if present:  # only cells.parquet, and no pyarrow
        raise _no_parquet(present[0], "cells.csv.gz (Xenium writes both; copy it too)")
    raise TenxError(
        f"no cells.parquet (nor cells.csv.gz) in {root}: is this a Xenium output folder? Fix: point "
        "at the Xenium output bundle (or Xenium Ranger's outs/), copied whole; the cells table holds "
        "the cell centroids"
    )


def read_xenium(root: Path, *, spatial_key: str = "spatial") -> anndata.AnnData:
    """A Xenium output folder as one in-memory section of cells.

    Parameters
    ----------
    root
        The output bundle (holding ``cell_feature_matrix.h5`` and ``cells.parquet`` /
        ``cells.csv.gz``).
    spatial_key
        ``obsm`` key for the coordinates.

    Returns
    -------
    anndata.AnnData
        Cells x gene-expression features; ``obsm[spatial_key]`` of shape (n_cells, 2)
        holds the centroids x, y in microns; ``obs`` the cells table's other columns.

    Raises
    ------
    TenxError
        Naming the missing or inconsistent file and the fix.
    """
    matrix = root / "cell_feature_matrix.h5"
    if not matrix.is_file():
        raise TenxError(
            f"{root} looks like a Xenium output folder, but has no cell_feature_matrix.h5. Fix: "
            "point at the Xenium output bundle (or Xenium Ranger's outs/), copied whole; the .h5 "
            "matrix is needed (the cell_feature_matrix/ MEX folder is not read)"
        )
    cells, source = _cells_table(root)
    missing = [c for c in ("cell_id", "x_centroid", "y_centroid") if c not in cells.columns]
    if missing:
        raise TenxError(
            f"{source}: columns {_shown(missing)} are missing (found {_shown(cells.columns)}). Fix: "
            "use the Xenium cells table unchanged (cell_id, x_centroid, y_centroid, ...)"
        )
    cells = cells.assign(cell_id=_strings(cells["cell_id"].to_numpy())).set_index("cell_id")
    adata = read_10x_h5(matrix)
    if adata.n_vars == 0:
        raise TenxError(f"{matrix}: no 'Gene Expression' feature (only controls). Fix: use the "
                          "cell_feature_matrix.h5 of a Xenium run")
    _check_same_run(adata, cells.index, matrix, source, what="cells", table="the cells table",
                    fix="use one Xenium output folder unchanged")
    obs = cells.loc[adata.obs_names]
    obs.index.name = None
    adata.obsm[spatial_key] = obs[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    adata.obs = obs
    return adata


def read_tenx(root: Path, kind: TenxKind, *, spatial_key: str = "spatial", name: str | None = None) -> anndata.AnnData:
    """Read a 10x output folder found by :func:`~fedspatial.shared.data.formats.tenx_folder`."""
    if kind == "xenium":
        return read_xenium(root, spatial_key=spatial_key)
    return read_spaceranger(root, spatial_key=spatial_key, name=name)


def _check_same_run(adata: Any, ids: Any, matrix: Path, source: Any, *, what: str, table: str, fix: str) -> None:
    """TenxError unless every row of the matrix is in ``ids`` (the positions or cells table)."""
    unknown = adata.obs_names[~adata.obs_names.isin(ids)]
    if len(unknown):
        raise TenxError(
            f"{matrix}: {len(unknown)} of {adata.n_obs} {what} (e.g. {_shown(unknown)}) are not in "
            f"{source}: the matrix and {table} come from different runs. Fix: {fix}"
        )
