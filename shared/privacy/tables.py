"""The evaluation's label x domain tables under local DP: one Gaussian mechanism.

At ``finalize`` a site releases, per original site of its sections, the table of cells per
(label, domain) and its cells per domain. Adding or removing one cell changes one entry of
one table by 1 (when it has a label) and one domain count by 1: L2 sensitivity sqrt(2).
Every entry gets Gaussian noise of std ``budget_plan(...).table_noise * sqrt(2)``, then is
rounded and clipped at 0 (post-processing). The tables' shapes must not depend on the cells
either: rows are the label column's vocabulary (its categories when categorical, which the
file declares; treated as public, like gene names) and columns every domain id ``0..K-1``.

The release is charged once to the site's ledger (kind ``dp-table``) and kept in the
site's state: a repeated ``finalize`` with the same domains returns the same noisy tables
without a second charge; different domains are a new release (and a new charge).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fedspatial.shared.evaluation.metrics import Contingency
from fedspatial.shared.privacy.budget import budget_plan
from fedspatial.shared.privacy.ledger import Release
from fedspatial.shared.protocol.payload import Payload

if TYPE_CHECKING:
    from fedspatial.shared.phases.base import Site

__all__ = ["SENSITIVITY", "TABLES_STATE", "label_vocabulary", "private_tables", "vocabulary_table"]

SENSITIVITY = math.sqrt(2.0)
TABLES_STATE = "dp-tables"
_MISSING = {"", "nan", "None", "<NA>"}


def label_vocabulary(columns: Sequence[pd.Series]) -> list[str]:
    """The rows of a private table: the categories of the label columns (their union,
    sorted), or their values when a column is not categorical."""
    names: set[str] = set()
    for col in columns:
        values = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else col.dropna().unique()
        names |= {str(v) for v in values if str(v) not in _MISSING}
    return sorted(names)


def vocabulary_table(truth: Any, domains: np.ndarray, labels: list[str], n_domains: int) -> Contingency:
    """``(len(labels), n_domains)`` counts of cells per (label, domain); cells whose label is
    missing or outside ``labels`` are not counted."""
    row = {name: i for i, name in enumerate(labels)}
    counts = np.zeros((len(labels), n_domains), dtype=np.int64)
    for value, dom in zip(pd.Series(truth).astype(str).to_numpy(), np.asarray(domains, dtype=np.int64), strict=True):
        i = row.get(value)
        if i is not None:
            counts[i, dom] += 1
    return Contingency(labels=labels, domains=list(range(n_domains)), counts=counts)


def _fingerprint(tables: Mapping[str, Contingency], domain_counts: np.ndarray, release_key: str) -> str:
    h = hashlib.sha256(release_key.encode())
    for name in sorted(tables):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tables[name].counts, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(domain_counts, dtype="<i8").tobytes())
    return h.hexdigest()[:32]


def private_tables(
    site: Site, tables: Mapping[str, Contingency], domain_counts: np.ndarray, *, seed: int | None = None
) -> tuple[dict[str, Contingency], np.ndarray]:
    """The noisy ``tables`` and ``domain_counts`` this site releases (see the module
    docstring); charged to its ledger, or refused with
    :class:`~fedspatial.shared.privacy.accounting.PrivacyBudgetExceeded` past its budget."""
    sigma = budget_plan(site.cfg.privacy).table_noise
    names = sorted(tables)
    key = _fingerprint(tables, domain_counts, f"{sigma!r}")
    kept = site.state.get(TABLES_STATE)
    if kept is not None and kept.string("fingerprint") == key:
        noisy = {name: Contingency(tables[name].labels, tables[name].domains, kept.array(f"table-{name}")) for name in names}
        return noisy, kept.array("domain-counts").astype(np.int64)
    ledger = site.ledger()
    step = sum(1 for r in ledger.releases if r.kind == "dp-table")
    try:
        ledger.check("dp-table", step, sigma, 1.0, 1)
    finally:
        site.save_ledger(ledger)
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    std = sigma * SENSITIVITY

    def noised(counts: np.ndarray) -> np.ndarray:
        values = np.asarray(counts, dtype=np.float64)
        return np.maximum(np.rint(values + rng.normal(0.0, std, size=values.shape)), 0).astype(np.int64)

    noisy = {name: Contingency(tables[name].labels, tables[name].domains, noised(tables[name].counts)) for name in names}
    counts = noised(domain_counts)
    ledger.record(Release("dp-table", step, sigma, 1.0, 1, details={"noise-std": std, "tables": len(names)}))
    site.save_ledger(ledger)
    arrays = {f"table-{name}": noisy[name].counts for name in names} | {"domain-counts": counts}
    site.state.put(TABLES_STATE, Payload(arrays=arrays, config={"fingerprint": key}))
    return noisy, counts
