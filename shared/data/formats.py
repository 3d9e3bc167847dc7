"""Section formats besides ``.h5ad``: SpatialData ``.zarr`` stores, and a clear message
for raw instrument output (Space Ranger Visium folders, Xenium output).

A SpatialData store is read into memory (never opened for writing): its table becomes
the section, and when the table has no ``obsm[spatial_key]`` the coordinates are the
centroids of the shapes/points/labels the table annotates. The ``spatialdata`` package
is an optional extra (``pip install 'fedspatial[io]'``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata
import numpy as np

log = logging.getLogger(__name__)

ZARR_SUFFIX = ".zarr"
INSTALL_IO = "pip install 'fedspatial[io]'  (or: pip install spatialdata)"

# Files that identify raw instrument output folders.
_SPACERANGER = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5", "spatial/tissue_positions.csv",
                "spatial/tissue_positions_list.csv", "spatial/tissue_positions.parquet")
_XENIUM = ("experiment.xenium", "cell_feature_matrix.h5", "cells.parquet", "transcripts.parquet")


class FormatError(ValueError):
    """A store cannot be turned into a section; the message names the fix."""


def is_spatialdata_store(path: Path) -> bool:
    """A folder named ``*.zarr`` (a SpatialData store)."""
    return path.is_dir() and path.suffix.lower() == ZARR_SUFFIX


def vendor_folder_hint(path: Path) -> str | None:
    """A fix for a raw Space Ranger / Xenium output folder, or None for any other folder."""
    found = [name for name in _SPACERANGER if (path / name).exists()]
    if found:
        return (
            f"{path} looks like a Space Ranger (Visium) output folder ({found[0]}), not a site folder. "
            "Fix: convert it to a SpatialData store or .h5ad first, e.g. "
            "`spatialdata_io.visium(PATH).write('section.zarr')` (pip install spatialdata-io) or "
            "`scanpy.read_visium(PATH).write_h5ad('section.h5ad')`, and put the result in the site's folder"
        )
    found = [name for name in _XENIUM if (path / name).exists()]
    if found:
        return (
            f"{path} looks like a Xenium output folder ({found[0]}), not a site folder. Fix: convert it "
            "first, e.g. `spatialdata_io.xenium(PATH).write('section.zarr')` (pip install spatialdata-io), "
            "and put the .zarr store in the site's folder"
        )
    return None


def read_spatialdata(path: Path, *, spatial_key: str = "spatial") -> anndata.AnnData:
    """The table of a SpatialData store as an in-memory AnnData with coordinates.

    Raises
    ------
    FormatError
        When ``spatialdata`` is not installed, the store has no table, or coordinates
        cannot be found for every observation.
    """
    try:
        import spatialdata  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        raise FormatError(
            f"{path} is a SpatialData store, and reading it needs the spatialdata package. Fix: {INSTALL_IO}"
        ) from None
    sdata = spatialdata.read_zarr(path)
    tables = dict(sdata.tables)
    if not tables:
        raise FormatError(
            f"{path}: the SpatialData store has no table (no cells x features matrix). Fix: add the "
            "expression table (spatialdata.models.TableModel) or export the section as .h5ad"
        )
    name = "table" if "table" in tables else sorted(tables)[0]
    if len(tables) > 1:
        log.warning("%s holds tables %s; reading %r", path, sorted(tables), name)
    adata = tables[name].copy()
    if spatial_key not in adata.obsm:
        adata.obsm[spatial_key] = _centroids(sdata, adata, path, name)
    return adata


def _centroids(sdata: Any, table: anndata.AnnData, path: Path, name: str) -> np.ndarray:
    """Coordinates of each table row: the centroid of the element instance it annotates."""
    import spatialdata  # type: ignore[import-untyped,import-not-found,unused-ignore]

    attrs = table.uns.get("spatialdata_attrs") or {}
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    fix = (f"Fix: store coordinates in tables[{name!r}].obsm['spatial'], or annotate the shapes/points "
           "with the table (TableModel.parse(region=..., region_key=..., instance_key=...))")
    if region_key not in table.obs or instance_key not in table.obs:
        raise FormatError(f"{path}: table {name!r} has no coordinates and annotates no element. {fix}")
    coords = np.full((table.n_obs, 2), np.nan)
    regions = table.obs[region_key].astype(str).to_numpy()
    for region in np.unique(regions):
        if region not in sdata:
            raise FormatError(f"{path}: table {name!r} annotates {region!r}, which the store lacks. {fix}")
        centers = spatialdata.get_centroids(sdata[region]).compute()
        rows = regions == region
        ids = table.obs[instance_key].to_numpy()[rows]
        missing = ~np.isin(ids, centers.index.to_numpy())
        if missing.any():
            raise FormatError(
                f"{path}: {int(missing.sum())} observation(s) of table {name!r} have no instance in "
                f"{region!r} ({instance_key} not found). {fix}"
            )
        coords[rows] = centers.loc[ids, ["x", "y"]].to_numpy(dtype=np.float64)
    return coords


def read_section_file(file: Path, *, spatial_key: str = "spatial") -> anndata.AnnData:
    """Read one section (``.h5ad`` file or SpatialData store) fully into memory."""
    if is_spatialdata_store(file):
        return read_spatialdata(file, spatial_key=spatial_key)
    return anndata.read_h5ad(file)
