"""Reading a site's spatial sections from ``.h5ad`` files (and the formats of
:mod:`~fedspatial.shared.data.formats`: SpatialData stores, Space Ranger and Xenium folders).

A site's data path is one section (``.h5ad`` file, ``.zarr`` store, 10x output folder) or
a folder of them (one per tissue section, or one file split into sections by an ``obs``
column). Files are read fully into
memory and never written, so input data is never modified. Loading validates every
section and reports all problems at once, so a data manager can fix everything in one go.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from fedspatial.shared.data.formats import (
    FormatError,
    is_section_folder,
    is_spatialdata_store,
    read_section_file,
    section_stem,
    vendor_folder_hint,
)
from fedspatial.shared.data.tenx import tenx_folder
from fedspatial.shared.data.validation import DataValidationError, validate_section

log = logging.getLogger(__name__)

H5AD_SUFFIX = ".h5ad"
_MAX_LABEL_CATEGORIES = 50  # obs columns with more distinct values are IDs, not labels
_MAX_LISTED = 5


@dataclass
class Section:
    """One tissue section of a site.

    Attributes
    ----------
    name
        File stem, or ``"<stem>/<value>"`` when a file is split by ``section_key``.
    source
        File the section was read from.
    adata
        The section, fully in memory.
    """

    name: str
    source: Path
    adata: anndata.AnnData


# ----------------------------------------------------------------------------- reading


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def list_h5ad(path: str | Path) -> list[Path]:
    """Return the ``.h5ad`` files of a data path.

    Parameters
    ----------
    path
        A ``.h5ad`` file, a SpatialData ``.zarr`` store or a Space Ranger / Xenium output
        folder (one section), or a folder whose sections (``.h5ad`` files, ``.zarr`` stores,
        10x output folders; non-recursive) are returned sorted by name. Hidden files (e.g.
        interrupted temporary writes) are skipped.

    Returns
    -------
    list of Path

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or the folder holds no ``.h5ad`` file.
    ValueError
        If ``path`` is a file without the ``.h5ad`` suffix.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder. Fix: point the site's data path at a .h5ad file "
            "or at a folder of .h5ad files (one per tissue section)."
        )
    if path.is_file() or is_spatialdata_store(path):
        if path.suffix.lower() not in (H5AD_SUFFIX, ".zarr"):
            folder = tenx_folder(path.parent)
            fix = (
                f"give the whole output folder {folder[1]} as the section"
                if folder is not None
                else "convert the data to AnnData and save it with adata.write_h5ad('section.h5ad') "
                "(e.g. via scanpy/squidpy readers)"
            )
            raise ValueError(f"{path}: not a .h5ad file. Fix: {fix}.")
        return [path]
    if (found := tenx_folder(path)) is not None and found[1] == path:
        return [path]  # a Space Ranger / Xenium output folder is one section
    entries = sorted(path.iterdir())
    files = [
        p
        for p in entries
        if ((p.is_file() and p.suffix.lower() == H5AD_SUFFIX) or is_section_folder(p))
        and not p.name.startswith(".")
    ]
    if not files and (hint_vendor := vendor_folder_hint(path)):
        raise ValueError(hint_vendor)
    if not files:
        subfolders = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
        hint = (
            f" It has subfolders ({_listing(subfolders)}): pass one site's folder."
            if subfolders
            else ""
        )
        raise FileNotFoundError(
            f"{path}: folder holds no .h5ad files (nor SpatialData .zarr stores, Space Ranger or "
            f"Xenium output folders).{hint} Fix: put one .h5ad file (or .zarr store, or 10x output "
            "folder) per tissue section directly in the site's data folder."
        )
    return files


def _collect_files(paths: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Expand data paths into unique files, collecting path problems instead of raising."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files: list[Path] = []
    seen: set[Path] = set()
    problems: list[str] = []
    if not paths:
        problems.append("no data path given. Fix: pass a .h5ad file or a folder of .h5ad files.")
    for path in paths:
        try:
            found = list_h5ad(path)
        except (OSError, ValueError) as exc:
            problems.append(str(exc))
            continue
        for file in found:
            key = file.resolve()
            if key in seen:
                log.warning("%s is listed more than once; reading it once", file)
                continue
            seen.add(key)
            files.append(file)
    return files, problems


def _read_h5ad(file: Path, spatial_key: str = "spatial") -> tuple[anndata.AnnData | None, str | None]:
    """Read a whole file into memory (never backed mode, so the file is never opened for writing)."""
    try:
        return read_section_file(file, spatial_key=spatial_key), None
    except FormatError as exc:
        return None, str(exc)
    except Exception as exc:  # h5py/anndata raise many types for corrupt or foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if file.is_dir() and not is_spatialdata_store(file):
            return None, (
                f"cannot read the 10x output folder {file}: {type(exc).__name__}: {reason}. Fix: "
                "check that the folder is a complete, unchanged copy of the instrument's output."
            )
        if file.is_dir():  # a .zarr folder
            return None, (
                f"cannot read the SpatialData store {file}: {type(exc).__name__}: {reason}. Fix: check "
                "that the folder is a complete store written with sdata.write(...) (it needs its "
                "tables/ group); copy it again from the original if it is partial."
            )
        return None, (
            f"cannot read {file} as AnnData (.h5ad): {type(exc).__name__}: {reason}. Fix: check that "
            "the file is complete (not truncated by a copy) and was written with "
            "adata.write_h5ad(...); re-export it from the original data if needed."
        )


def _split_sections(
    adata: anndata.AnnData, file: Path, section_key: str | None
) -> tuple[list[Section], list[str]]:
    """Split one file into sections by ``obs[section_key]`` (or keep it whole)."""
    if section_key is None:
        return [Section(name=section_stem(file), source=file, adata=adata)], []
    if section_key not in adata.obs:
        columns = _listing([str(c) for c in adata.obs.columns]) or "none"
        return [], [
            f"{file}: obs[{section_key!r}] (the section key) is missing (obs columns: {columns}). "
            "Fix: add a column naming each observation's tissue section, pass the right "
            "--section-key, or omit it to treat each file as one section."
        ]
    values = adata.obs[section_key]
    n_missing = int(values.isna().sum())
    if n_missing:
        return [], [
            f"{file}: obs[{section_key!r}] has {n_missing} missing values. Fix: give every "
            "observation a section name, or drop the unlabelled observations."
        ]
    values = values.astype(str).to_numpy()
    return [
        Section(name=f"{section_stem(file)}/{value}", source=file, adata=adata[values == value].copy())
        for value in sorted(set(values))
    ], []


def _duplicate_name_problems(sections: list[Section]) -> list[str]:
    sources: dict[str, list[str]] = {}
    for section in sections:
        sources.setdefault(section.name, []).append(str(section.source))
    return [
        f"section name {name!r} is used by several files ({', '.join(files)}). Fix: rename the "
        "files so that every section of a site has a unique name."
        for name, files in sources.items()
        if len(files) > 1
    ]


def _read_site(
    paths: str | Path | Sequence[str | Path], *, spatial_key: str, section_key: str | None
) -> tuple[list[Section], list[str]]:
    """Read and validate every file; return the readable sections and all problems."""
    files, problems = _collect_files(paths)
    sections: list[Section] = []
    for file in files:
        adata, error = _read_h5ad(file, spatial_key)
        if adata is None:
            problems.append(error or f"cannot read {file}")
            continue
        problems += validate_section(adata, source=str(file), spatial_key=spatial_key)
        pieces, split_problems = _split_sections(adata, file, section_key)
        problems += split_problems
        sections += pieces
    problems += _duplicate_name_problems(sections)
    return sections, problems


def load_site(
    paths: str | Path | Sequence[str | Path],
    *,
    spatial_key: str = "spatial",
    section_key: str | None = None,
) -> list[Section]:
    """Read, validate and return all sections of a site.

    Parameters
    ----------
    paths
        One or more ``.h5ad`` files or folders of them.
    spatial_key
        ``adata.obsm`` key holding the coordinates.
    section_key
        Optional ``obs`` column splitting a file into several sections.

    Returns
    -------
    list of Section
        In file order (and sorted section values within a file).

    Raises
    ------
    DataValidationError
        Listing every problem across all files (missing paths, unreadable files and
        invalid sections) so they can be fixed in one go.
    """
    sections, problems = _read_site(paths, spatial_key=spatial_key, section_key=section_key)
    if problems:
        raise DataValidationError(problems)
    log.info(
        "loaded %d section(s), %d observations", len(sections), sum(s.adata.n_obs for s in sections)
    )
    return sections


# ----------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class SectionSummary:
    """Key facts of one section."""

    name: str
    source: str
    n_spots: int
    n_features: int
    x_range: tuple[float, float] | None  # None when coordinates are missing or invalid
    y_range: tuple[float, float] | None
    label_counts: dict[str, int] | None  # counts of obs[label_key]; None when absent


@dataclass
class SiteSummary:
    """Overview of a site's data, as printed by ``fedspatial inspect``.

    Attributes
    ----------
    sections
        One summary per section.
    label_key
        The ``obs`` column holding ground-truth labels (may be absent).
    n_features_shared
        Features present in every section.
    n_features_total
        Features present in any section.
    label_columns
        Categorical-like ``obs`` columns (at most 50 values) -> category -> count, pooled
        over sections.
    """

    sections: list[SectionSummary]
    label_key: str
    n_features_shared: int
    n_features_total: int
    label_columns: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def n_sections(self) -> int:
        return len(self.sections)

    @property
    def n_spots(self) -> int:
        return sum(s.n_spots for s in self.sections)

    @property
    def labels(self) -> dict[str, int] | None:
        """Pooled counts of ``obs[label_key]``, or None when no section has it."""
        return self.label_columns.get(self.label_key)

    def format(self) -> str:
        """Human-readable table of sections, spots, features, coordinates and labels."""
        header = ["section", "spots", "features", "x range", "y range", self.label_key]
        rows = [header] + [_section_row(s) for s in self.sections]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        right = {1, 2}  # numbers read best right-aligned

        def line(row: list[str]) -> str:
            cells = [
                cell.rjust(width) if i in right else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        lines = [
            f"{self.n_sections} section(s), {self.n_spots:,} spots, {self.n_features_total:,} features "
            f"({self.n_features_shared:,} shared by all sections)",
            "",
            line(header),
            line(["-" * w for w in widths]),
            *(line(r) for r in rows[1:]),
            "",
        ]
        if self.labels is None:
            lines.append(
                f"label column obs[{self.label_key!r}]: absent (fine for unsupervised training)"
            )
        else:
            counts = ", ".join(f"{k}={v:,}" for k, v in self.labels.items())
            lines.append(
                f"label column obs[{self.label_key!r}]: {len(self.labels)} categories: {counts}"
            )
        others = [f"{k} ({len(v)})" for k, v in self.label_columns.items() if k != self.label_key]
        lines.append("other label-like obs columns: " + (", ".join(others) if others else "none"))
        return "\n".join(lines)


def _section_row(s: SectionSummary) -> list[str]:
    def span(r: tuple[float, float] | None) -> str:
        return "invalid" if r is None else f"{r[0]:.6g} .. {r[1]:.6g}"

    if s.label_counts is None:
        labels = "absent"
    else:
        present = sum(1 for v in s.label_counts.values() if v > 0)
        labels = f"{present}/{len(s.label_counts)} present"
    return [s.name, f"{s.n_spots:,}", f"{s.n_features:,}", span(s.x_range), span(s.y_range), labels]


def _coordinate_ranges(
    adata: anndata.AnnData, spatial_key: str
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    coords = adata.obsm.get(spatial_key)
    if coords is None:
        return None, None
    coords = coords.to_numpy() if isinstance(coords, pd.DataFrame) else np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] < 2 or not np.issubdtype(coords.dtype, np.number):
        return None, None
    coords = coords[np.isfinite(coords[:, :2]).all(axis=1), :2].astype(np.float64)
    if len(coords) == 0:
        return None, None
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def _label_like_columns(obs: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Category counts of categorical/string/bool obs columns with few distinct values."""
    columns: dict[str, dict[str, int]] = {}
    for name in obs.columns:
        values = obs[name]
        is_label = (
            isinstance(values.dtype, pd.CategoricalDtype)
            or pd.api.types.is_bool_dtype(values)
            or pd.api.types.is_object_dtype(values)
            or pd.api.types.is_string_dtype(values)
        )
        if not is_label or values.nunique(dropna=True) > _MAX_LABEL_CATEGORIES:
            continue
        counts = values.value_counts(dropna=True, sort=False)
        columns[str(name)] = {str(k): int(v) for k, v in counts.items()}
    return columns


def _merge_counts(into: dict[str, dict[str, int]], new: dict[str, dict[str, int]]) -> None:
    for column, counts in new.items():
        pooled = into.setdefault(column, {})
        for category, n in counts.items():
            pooled[category] = pooled.get(category, 0) + n


def summarize_site(
    sections: Sequence[Section], *, label_key: str = "domain", spatial_key: str = "spatial"
) -> SiteSummary:
    """Summarise a site's sections (works on invalid sections too, for ``inspect``).

    Parameters
    ----------
    sections
        Sections as returned by :func:`load_site`.
    label_key
        ``obs`` column with ground-truth labels, reported separately when present.
    spatial_key
        ``obsm`` key of the coordinates.

    Returns
    -------
    SiteSummary
    """
    summaries: list[SectionSummary] = []
    label_columns: dict[str, dict[str, int]] = {}
    shared: set[str] | None = None
    total: set[str] = set()
    for section in sections:
        adata = section.adata
        features = set(map(str, adata.var_names))
        shared = features if shared is None else shared & features
        total |= features
        columns = _label_like_columns(adata.obs)
        _merge_counts(label_columns, columns)
        x_range, y_range = _coordinate_ranges(adata, spatial_key)
        summaries.append(
            SectionSummary(
                name=section.name,
                source=str(section.source),
                n_spots=adata.n_obs,
                n_features=adata.n_vars,
                x_range=x_range,
                y_range=y_range,
                label_counts=columns.get(label_key),
            )
        )
    # Keep the label column first so the table reads naturally.
    ordered = dict(sorted(label_columns.items(), key=lambda kv: kv[0] != label_key))
    return SiteSummary(
        sections=summaries,
        label_key=label_key,
        n_features_shared=len(shared or ()),
        n_features_total=len(total),
        label_columns=ordered,
    )


def inspect_site(
    path: str | Path | Sequence[str | Path],
    *,
    spatial_key: str = "spatial",
    label_key: str = "domain",
    section_key: str | None = None,
) -> tuple[SiteSummary | None, list[str]]:
    """Summarise a site and list its problems without raising (``fedspatial inspect``).

    Returns
    -------
    tuple
        ``(summary, problems)``: ``problems`` is empty when the data is ready for training;
        ``summary`` covers every readable section and is None when none could be read.
    """
    sections, problems = _read_site(path, spatial_key=spatial_key, section_key=section_key)
    summary = (
        summarize_site(sections, label_key=label_key, spatial_key=spatial_key) if sections else None
    )
    return summary, problems
