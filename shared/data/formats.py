"""Section formats besides ``.h5ad``: SpatialData ``.zarr`` stores, 10x Genomics output
folders (Space Ranger Visium, Xenium), and a clear message for other raw instrument output.

A SpatialData store is read into memory (never opened for writing): its table becomes
the section, and when the table has no ``obsm[spatial_key]`` the coordinates are the
centroids of the shapes/points/labels the table annotates. The ``spatialdata`` package
is an optional extra (``pip install 'fedspatial[io]'``).

A Space Ranger ``outs/`` folder or a Xenium output folder (or a folder holding ``outs/``)
is one section, read in memory by :mod:`fedspatial.shared.data.tenx` (see there for
the files read and why neither spatialdata-io nor scanpy is needed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata
import numpy as np

from fedspatial.shared.data.tenx import TenxError, read_tenx, tenx_folder

log = logging.getLogger(__name__)

ZARR_SUFFIX = ".zarr"
INSTALL_IO = "pip install 'fedspatial[io]'  (or: pip install spatialdata)"

# Raw output that fedspatial does not read itself: (marker glob patterns, what, converter).
_OTHER_VENDORS = (
    (("cell_by_gene.csv", "cell_metadata.csv", "detected_transcripts.csv"), "Vizgen MERSCOPE", "merscope"),
    (("*exprMat_file.csv*", "*metadata_file.csv*", "*fov_positions_file.csv*"), "NanoString CosMx", "cosmx"),
)


class FormatError(ValueError):
    """A store cannot be turned into a section; the message names the fix."""


def is_spatialdata_store(path: Path) -> bool:
    """A folder named ``*.zarr`` (a SpatialData store)."""
    return path.is_dir() and path.suffix.lower() == ZARR_SUFFIX


def is_section_folder(path: Path) -> bool:
    """A folder that is one section: a SpatialData store or a 10x output folder."""
    return is_spatialdata_store(path) or tenx_folder(path) is not None


def section_stem(path: Path) -> str:
    """A section's default name: the file/store name without suffix, or the 10x folder's
    name (the name of the folder holding ``outs/`` for an ``outs/`` folder)."""
    if (found := tenx_folder(path)) is not None:
        root = found[1]
        return root.resolve().parent.name if root.name == "outs" else root.resolve().name
    return path.stem


def vendor_folder_hint(path: Path) -> str | None:
    """A fix for raw instrument output fedspatial does not read itself, or None."""
    for root in (path, path / "outs"):
        if (root / "binned_outputs").is_dir():
            bins = sorted(p.name for p in (root / "binned_outputs").iterdir() if p.is_dir())
            example = root / "binned_outputs" / (bins[-1] if bins else "square_016um")
            return (
                f"{path} looks like a Visium HD output folder (binned_outputs/), which holds one "
                f"section per bin size ({', '.join(bins) or 'none found'}). Fix: give one bin size's "
                f"folder as the section, e.g. {example} (reading its tissue_positions.parquet needs "
                "pyarrow: pip install pyarrow)"
            )
    for patterns, what, reader in _OTHER_VENDORS:
        found = [name for pattern in patterns for name in sorted(p.name for p in path.glob(pattern))]
        if found:
            return (
                f"{path} looks like a {what} output folder ({found[0]}), which fedspatial does not "
                f"read directly. Fix: convert it first, e.g. `spatialdata_io.{reader}(PATH)"
                ".write('section.zarr')` (pip install spatialdata-io), and put the .zarr store (or an "
                ".h5ad with coordinates in obsm['spatial']) in the site's folder"
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
    """Read one section fully into memory, never writing to it.

    Parameters
    ----------
    file
        A ``.h5ad`` file, a SpatialData ``.zarr`` store, or a Space Ranger / Xenium output
        folder (see :func:`~fedspatial.shared.data.tenx.tenx_folder`).
    spatial_key
        ``obsm`` key that receives the coordinates when the reader derives them.

    Returns
    -------
    anndata.AnnData
        Observations x features, in memory (never backed).

    Raises
    ------
    FormatError
        When a store or folder cannot be turned into a section; the message names the fix.
    """
    if is_spatialdata_store(file):
        return read_spatialdata(file, spatial_key=spatial_key)
    if (found := tenx_folder(file)) is not None:
        try:
            return read_tenx(found[1], found[0], spatial_key=spatial_key, name=section_stem(file))
        except TenxError as exc:
            raise FormatError(str(exc)) from None
    return anndata.read_h5ad(file)
