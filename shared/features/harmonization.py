"""Which features the sites share, matched by name, and each section's counts for them.

:func:`feature_names` reads a section's identifiers, :func:`shared_features` intersects
the sites' lists and :func:`restrict_counts` takes a section's counts for a feature list,
in its order. Every mismatch raises :class:`HarmonizationError`, naming what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from fedspatial.shared.features.normalization import as_matrix

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "HarmonizationError",
    "check_features",
    "count_blocks",
    "duplicate_names",
    "feature_names",
    "preview_names",
    "restrict_counts",
    "row_block_size",
    "shared_features",
]

# Entries of one block of rows: 2**24 float64 values are 128 MiB, so a whole-section
# computation's temporaries stay bounded however many cells a section holds.
BLOCK_ENTRIES = 1 << 24

logger = logging.getLogger(__name__)


class HarmonizationError(ValueError):
    """The sites' feature spaces cannot be harmonized (no overlap, duplicates, missing)."""


def feature_names(adata: AnnData, feature_key: str | None = None) -> list[str]:
    """Names identifying the features of ``adata`` across sites.

    Parameters
    ----------
    adata
        Annotated data matrix (cells x features).
    feature_key
        Column of ``adata.var`` holding the identifiers (e.g. ``"gene_ids"`` to match
        Ensembl IDs across panels whose symbols differ). Default ``None``: use
        ``adata.var_names``.

    Returns
    -------
    list of str
        One name per feature, in ``adata.var`` order.

    Raises
    ------
    KeyError
        If ``feature_key`` is not a column of ``adata.var``.
    HarmonizationError
        If the column has missing values.
    """
    if feature_key is None:
        return [str(name) for name in adata.var_names]
    if feature_key not in adata.var.columns:
        msg = (
            f"feature_key {feature_key!r} is not a column of adata.var; available "
            f"columns: {list(map(str, adata.var.columns))} (use feature_key=None for var_names)."
        )
        raise KeyError(msg)
    column = adata.var[feature_key]
    n_missing = int(column.isna().sum())
    if n_missing:
        msg = f"adata.var[{feature_key!r}] has {n_missing} missing value(s); every feature needs an identifier."
        raise HarmonizationError(msg)
    return [str(name) for name in column]


def duplicate_names(names: Sequence[str]) -> list[str]:
    """Names that occur more than once."""
    counts = pd.Series(list(names), dtype=object).value_counts()
    return [str(n) for n in counts.index[counts > 1]]


def preview_names(names: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` names for a message, with the total when there are more."""
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in total)" if len(names) > limit else "")


def shared_features(site_features: Mapping[str, Sequence[str]]) -> list[str]:
    """Features present at every site.

    Parameters
    ----------
    site_features
        Feature names of each site, keyed by site name.

    Returns
    -------
    list of str
        The intersection, in the order of the first site.

    Raises
    ------
    HarmonizationError
        If no site is given, if a site lists a feature twice, or if no feature is
        shared by all sites (the message names every site and its feature count).
    """
    if not site_features:
        msg = "no sites given; cannot build a shared feature space."
        raise HarmonizationError(msg)
    sites = {str(site): [str(n) for n in names] for site, names in site_features.items()}
    for site, names in sites.items():
        dups = duplicate_names(names)
        if dups:
            msg = (
                f"site {site!r} has duplicate feature names ({len(dups)}): {preview_names(dups)}; "
                "feature names must be unique (consider a different feature_key)."
            )
            raise HarmonizationError(msg)
    common = set.intersection(*(set(names) for names in sites.values()))
    first = next(iter(sites.values()))
    shared = [name for name in first if name in common]
    summary = ", ".join(f"{site!r} ({len(names)} features)" for site, names in sites.items())
    if not shared:
        msg = (
            f"no features shared with the federation: {summary}. Check that all sites "
            "use the same identifiers (feature_key, e.g. 'gene_ids')."
        )
        raise HarmonizationError(msg)
    logger.info(
        "shared_features: %d features shared by %d site(s): %s", len(shared), len(sites), summary
    )
    return shared


def _counts(adata: AnnData, layer: str | None) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        msg = f"layer {layer!r} not found in adata.layers; available: {list(adata.layers.keys())}."
        raise KeyError(msg)
    return adata.layers[layer]


def restrict_counts(
    adata: AnnData, features: Sequence[str], feature_key: str | None, layer: str | None
) -> np.ndarray | sparse.csr_matrix:
    """Counts of ``adata`` for ``features``, in that order (CSR or dense)."""
    return _take(_counts(adata, layer), slice(None), _positions(adata, features, feature_key))


def row_block_size(n_features: int, block_entries: int | None = None) -> int:
    """Rows per block so that a dense block of ``n_features`` columns holds about
    ``block_entries`` values (default :data:`BLOCK_ENTRIES`; at least one row)."""
    entries = BLOCK_ENTRIES if block_entries is None else int(block_entries)
    return max(1, entries // max(int(n_features), 1))


def count_blocks(
    adata: AnnData,
    features: Sequence[str],
    feature_key: str | None,
    layer: str | None,
    *,
    block_rows: int | None = None,
) -> Iterator[tuple[slice, np.ndarray | sparse.csr_matrix]]:
    """:func:`restrict_counts` of consecutive blocks of rows: ``(rows, counts)`` pairs.

    Per-cell steps (normalization, ``log1p``, standardization) and sums over cells give
    the same result block by block, with temporaries bounded by the block instead of
    the section (a Xenium section holds 10^5-10^6 cells).

    Parameters
    ----------
    block_rows
        Rows per block; default :func:`row_block_size` of ``len(features)``.
    """
    positions = _positions(adata, features, feature_key)
    x = _counts(adata, layer)
    step = int(block_rows or row_block_size(len(positions)))
    if step < 1:
        raise ValueError(f"block_rows must be >= 1; got {block_rows}")
    n = adata.n_obs
    for start in range(0, max(n, 1), step):
        rows = slice(start, min(start + step, n))
        yield rows, _take(x, rows, positions)


def _positions(adata: AnnData, features: Sequence[str], feature_key: str | None) -> np.ndarray:
    """Column of each of ``features`` in ``adata`` (HarmonizationError if missing or ambiguous)."""
    names = pd.Index(feature_names(adata, feature_key))
    wanted = pd.Index([str(f) for f in features])
    missing = [f for f in wanted if f not in names]
    if missing:
        where = "adata.var_names" if feature_key is None else f"adata.var[{feature_key!r}]"
        msg = f"{len(missing)} feature(s) of the feature space are missing from {where}: {preview_names(missing)}."
        raise HarmonizationError(msg)
    if not names.is_unique:
        dups = set(duplicate_names(list(names))) & set(wanted)
        if dups:
            msg = f"feature(s) appear more than once in the data: {preview_names(sorted(dups))}."
            raise HarmonizationError(msg)
        return np.array([names.get_loc(f) for f in wanted], dtype=np.int64)
    return names.get_indexer(wanted).astype(np.int64)


def _take(x: Any, rows: slice, positions: np.ndarray) -> np.ndarray | sparse.csr_matrix:
    """Rows ``rows`` and columns ``positions`` of a counts matrix (CSR or dense)."""
    block = x[rows] if rows != slice(None) else x
    out = as_matrix(block)[:, positions]
    if isinstance(out, sparse.csr_matrix):
        out = sparse.csr_matrix(out)
        out.sum_duplicates()
    return out


def check_features(features: Sequence[str]) -> list[str]:
    """``features`` as str; ValueError when empty, HarmonizationError on duplicates."""
    feats = [str(f) for f in features]
    if not feats:
        msg = "features must not be empty."
        raise ValueError(msg)
    dups = duplicate_names(feats)
    if dups:
        msg = f"features must be unique; duplicated: {preview_names(dups)}."
        raise HarmonizationError(msg)
    return feats
