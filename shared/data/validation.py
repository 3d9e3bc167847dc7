"""Validation of user-supplied spatial sections (AnnData) before any training.

Every check returns human-readable problems that name the source file, the offending
field and the fix, so a hospital data manager can repair the data without reading code.
Checks never densify a large ``X``: sparse matrices are checked through their stored
values and dense arrays in row blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

log = logging.getLogger(__name__)

_DENSE_BLOCK_ELEMENTS = 2**22  # ~32 MB of float64 per block when scanning dense X
_MAX_LISTED = 5
# A log1p-transformed count matrix rarely exceeds this; raw counts and MSI intensities do.
_LOG_MAX_VALUE = 20.0


class DataValidationError(ValueError):
    """One or more sections failed validation; ``problems`` lists every issue found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        header = f"input data failed validation ({len(self.problems)} problem(s)):"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


def _x_blocks(x: Any) -> Iterator[np.ndarray]:
    """Yield the values of ``X`` (dense array or scipy sparse) worth checking, never densifying."""
    if sparse.issparse(x):
        # Implicit zeros are valid; only stored values can be NaN, inf or negative.
        if x.format not in {"csr", "csc", "coo"}:
            x = x.tocsr()
        yield np.asarray(x.data)
        return
    x = np.asarray(x)
    if x.ndim != 2 or x.size == 0:
        yield x.reshape(-1)
        return
    rows = max(1, _DENSE_BLOCK_ELEMENTS // max(x.shape[1], 1))
    for start in range(0, x.shape[0], rows):
        yield x[start : start + rows]


def _format_names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _check_shape(adata: anndata.AnnData, source: str) -> list[str]:
    if adata.n_obs > 0 and adata.n_vars > 0:
        return []
    return [
        f"{source}: the section is empty ({adata.n_obs} observations x {adata.n_vars} features). "
        "Fix: export the section with its spots/cells as rows and its features (genes, proteins, "
        "m/z bins) as columns, or remove the file from the site folder."
    ]


def _check_spatial(adata: anndata.AnnData, source: str, spatial_key: str) -> list[str]:
    field = f"obsm[{spatial_key!r}]"
    if spatial_key not in adata.obsm:
        present = ", ".join(repr(k) for k in adata.obsm) or "none"
        return [
            f"{source}: {field} is missing (obsm keys present: {present}). Fix: store spot/cell "
            f"coordinates as an (n_obs, 2) array in adata.obsm[{spatial_key!r}] (squidpy/scanpy "
            "convention), or pass the key that holds them (--spatial-key)."
        ]
    coords = adata.obsm[spatial_key]
    coords = coords.to_numpy() if isinstance(coords, pd.DataFrame) else np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] not in (2, 3) or coords.shape[0] != adata.n_obs:
        return [
            f"{source}: {field} has shape {coords.shape}; expected (n_obs={adata.n_obs}, 2) or "
            f"(n_obs, 3). Fix: store one row of x, y (optionally z) coordinates per observation."
        ]
    if not (np.issubdtype(coords.dtype, np.number) and not np.issubdtype(coords.dtype, np.bool_)):
        return [
            f"{source}: {field} has non-numeric dtype {coords.dtype}. Fix: store coordinates as "
            "float numbers, e.g. adata.obsm[...] = coords.astype('float64')."
        ]
    bad_rows = int((~np.isfinite(coords)).any(axis=1).sum())
    if bad_rows:
        return [
            f"{source}: {field} has NaN or infinite coordinates in {bad_rows} of {adata.n_obs} "
            "observations. Fix: drop those observations (adata = adata[np.isfinite(coords).all(1)]) "
            "or repair their coordinates."
        ]
    return []


def _looks_log_transformed(adata: anndata.AnnData, max_value: float, non_integer: bool) -> bool:
    return "log1p" in adata.uns or (non_integer and 0.0 < max_value <= _LOG_MAX_VALUE)


def _check_x(adata: anndata.AnnData, source: str) -> list[str]:
    x = adata.X
    if x is None:
        return [
            f"{source}: X is missing. Fix: store raw counts/intensities in adata.X "
            "(observations x features)."
        ]
    if not (np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)):
        return [
            f"{source}: X has non-numeric dtype {x.dtype}. Fix: store numeric raw values in adata.X."
        ]

    n_nan = n_inf = n_neg = 0
    max_value = -np.inf
    non_integer = False
    for block in _x_blocks(x):
        if block.size == 0:
            continue
        if np.issubdtype(block.dtype, np.integer) or block.dtype == np.bool_:
            n_neg += int((block < 0).sum())
            max_value = max(max_value, float(block.max()))
            continue
        finite = np.isfinite(block)
        block_nan = int(np.isnan(block).sum())
        n_nan += block_nan
        n_inf += int(block.size - finite.sum()) - block_nan
        values = block[finite]
        if values.size:
            n_neg += int((values < 0).sum())
            max_value = max(max_value, float(values.max()))
            non_integer = non_integer or bool((values != np.round(values)).any())

    problems = []
    if n_nan or n_inf:
        problems.append(
            f"{source}: X contains {n_nan} NaN and {n_inf} infinite values. Fix: store raw, finite "
            "counts/intensities in adata.X (replace missing measurements with 0 or drop them)."
        )
    if n_neg:
        problems.append(
            f"{source}: X contains {n_neg} negative values. Fix: X must hold non-negative raw "
            "counts/intensities, not scaled or centred data; store the raw matrix in adata.X "
            "(e.g. adata.X = adata.layers['counts'] or adata.raw.X)."
        )
    if not problems and _looks_log_transformed(adata, max_value, non_integer):
        log.warning(
            "%s: X looks log-transformed (max value %.3g, non-integer values%s); fedspatial "
            "normalises raw data itself, so pass raw counts/intensities if you have them.",
            source,
            max_value,
            ", uns['log1p'] set" if "log1p" in adata.uns else "",
        )
    return problems


def _check_feature_names(adata: anndata.AnnData, source: str) -> list[str]:
    names = adata.var_names
    if names.is_unique:
        return []
    duplicated = names[names.duplicated()].unique().astype(str).tolist()
    return [
        f"{source}: var_names (feature names) has {len(duplicated)} duplicated name(s): "
        f"{_format_names(duplicated)}. Fix: call adata.var_names_make_unique() before saving, "
        "or pass a unique feature column with --feature-key."
    ]


def validate_section(
    adata: anndata.AnnData, *, source: str, spatial_key: str = "spatial"
) -> list[str]:
    """Check one section and return every problem found (empty list: valid).

    Parameters
    ----------
    adata
        The section, fully loaded in memory.
    source
        Name shown in messages (usually the file path).
    spatial_key
        ``adata.obsm`` key holding the coordinates.

    Returns
    -------
    list of str
        One message per problem, each naming ``source``, the field and the fix.
    """
    empty = _check_shape(adata, source)
    problems = [*empty, *_check_spatial(adata, source, spatial_key)]
    if not empty:
        problems += _check_x(adata, source)
    problems += _check_feature_names(adata, source)
    return problems
