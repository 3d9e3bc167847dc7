"""What a cross-site report compares: per-site facts, identifier schemes, label schemes.

Used by :mod:`fedspatial.shared.data.preflight`; nothing here reads files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from fedspatial.shared.data.validation import _x_blocks

# Kinds a user may accept with `fedspatial simulate --allow KIND` (the rest are errors).
KINDS: dict[str, str] = {
    "low-overlap": "a site keeps less than half of its features",
    "non-counts": "X is not integer counts while data.expect-counts is true",
    "zero-section": "a section whose X is all zeros",
    "tiny-section": "a section with fewer cells than n-neighbors + 1 or n-domains",
    "same-coordinates": "most cells of a section share coordinates",
    "label-schemes": "the label column holds different categories at different sites",
    "mixed-species": "sites name features in different species or identifier schemes",
    "no-labels": "the label column (data.label-key) is missing at every site",
}
ALLOW_HINT = "`fedspatial simulate` refuses these unless told --allow KIND"

_SCAN_VALUES = 4_000_000  # values of X looked at for count-likeness (the first rows)
_SCHEMES = (
    ("Ensembl human (ENSG)", re.compile(r"^ENSG\d{6,}(\.\d+)?$")),
    ("Ensembl mouse (ENSMUSG)", re.compile(r"^ENSMUSG\d{6,}(\.\d+)?$")),
    ("human symbols (upper case)", re.compile(r"^(?=(?:.*[A-Z]){2})[A-Z][A-Z0-9.\-]*$")),
    ("mouse symbols (capitalized)", re.compile(r"^(?=.*[a-z])[A-Z][a-z0-9][a-z0-9.\-]*$")),
)
UNKNOWN_SCHEME = "other"
_SCHEME_MAJORITY = 0.6


@dataclass(frozen=True)
class Finding:
    """One problem. ``kind`` is one of :data:`KINDS` (allowable) or an error kind."""

    kind: str
    site: str
    message: str

    @property
    def allowable(self) -> bool:
        return self.kind in KINDS


@dataclass
class SectionFacts:
    name: str
    source: str
    n_obs: int
    features: list[str]
    count_like: bool | None
    counts_layer: bool = False


@dataclass
class SiteFacts:
    name: str
    path: str
    sections: list[SectionFacts]
    labels: dict[str, dict[str, int]]
    scheme: str
    label_key: str
    kept: int | None = None
    """Features the federation keeps of this site (None: not computed)."""
    features: list[str] = field(init=False)
    summary: Any = None
    """The site's :class:`~fedspatial.shared.data.io.SiteSummary` (None: nothing readable)."""

    def __post_init__(self) -> None:
        self.features = sorted({f for sec in self.sections for f in sec.features})

    @property
    def n_cells(self) -> int:
        return sum(sec.n_obs for sec in self.sections)

    @property
    def x_kind(self) -> str:
        kinds = {sec.count_like for sec in self.sections if sec.count_like is not None}
        if kinds == {True}:
            return "counts"
        layer = any(sec.counts_layer for sec in self.sections)
        label = "non-integer" if kinds == {False} else "mixed"
        return label + (" (counts layer)" if layer else "") if kinds else "-"


@dataclass(frozen=True)
class XStats:
    max_value: float
    count_like: bool
    all_zero: bool


def x_stats(x: Any) -> XStats:
    """Max, integer-ness and all-zero of a matrix (its first ~4M values; never densified)."""
    seen = 0
    max_value, non_integer, nonzero = 0.0, False, False
    for block in _x_blocks(x):
        values = np.asarray(block).reshape(-1)
        values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if values.size:
            max_value = max(max_value, float(values.max()))
            nonzero = nonzero or bool((values != 0).any())
            if values.dtype.kind == "f":
                non_integer = non_integer or bool((values != np.round(values)).any())
        seen += values.size
        if seen >= _SCAN_VALUES:
            break
    return XStats(max_value=max_value, count_like=not non_integer, all_zero=not nonzero)


def detect_scheme(names: Sequence[str]) -> str:
    """The species / identifier scheme most feature names follow (:data:`UNKNOWN_SCHEME` if none)."""
    if not names:
        return UNKNOWN_SCHEME
    sample = list(names)[:: max(1, len(names) // 2000)]
    for label, pattern in _SCHEMES:
        if sum(1 for n in sample if pattern.match(n)) >= _SCHEME_MAJORITY * len(sample):
            return label
    return UNKNOWN_SCHEME


def species_findings(sites: Sequence[SiteFacts]) -> list[Finding]:
    schemes: dict[str, list[str]] = {}
    for site in sites:
        if site.scheme != UNKNOWN_SCHEME:
            schemes.setdefault(site.scheme, []).append(site.name)
    if len(schemes) < 2:
        return []
    listed = "; ".join(f"{scheme}: {', '.join(names)}" for scheme, names in schemes.items())
    return [Finding("mixed-species", "", (
        f"the sites name their features in different schemes ({listed}); features match by exact name, "
        "so few are shared and a mouse and a human site are compared on homonyms. Fix: use data of one "
        "species, and one identifier at every site (data.feature-key: gene_ids for Ensembl ids, or "
        "symbols in var_names)"))]


def label_findings(sites: Sequence[SiteFacts], label_key: str) -> list[Finding]:
    """``no-labels`` when no site has the label column; ``label-schemes`` when two sites'
    categories overlap by less than half of the smaller set."""
    if not sites:
        return []
    having = [s for s in sites if s.labels.get(label_key)]
    if not having:
        others = sorted({c for s in sites for c in s.labels})
        hint = (f"--set data.label-key=COLUMN (label-like columns: {', '.join(repr(c) for c in others[:6])})"
                if others else "add the ground-truth column to obs")
        return [Finding("no-labels", "", (
            f"obs[{label_key!r}] (data.label-key) is missing at every site: ARI/NMI would all be nan. "
            f"Fix: {hint}, or --allow no-labels to train without scores"))]
    findings = []
    for a, b in combinations(having, 2):
        ca, cb = set(a.labels[label_key]), set(b.labels[label_key])
        if len(ca & cb) < 0.5 * min(len(ca), len(cb)):
            findings.append(Finding("label-schemes", a.name, (
                f"obs[{label_key!r}] holds different categories at site {a.name!r} "
                f"({_preview(ca)}) and site {b.name!r} ({_preview(cb)}), {len(ca & cb)} in common; scored "
                "jointly they would mix two labelings. Fix: map both to one scheme, or point "
                "data.label-key at a column with the same categories everywhere")))
    return findings


def _preview(categories: set[str], limit: int = 4) -> str:
    shown = sorted(categories)[:limit]
    return ", ".join(shown) + (f", ... ({len(categories)})" if len(categories) > limit else "")
