"""Pre-flight checks of a whole federation's data, before anything starts.

``fedspatial inspect`` (one site or several), ``fedspatial simulate`` (before Ray or
Flower start, and before a results folder exists) and ``fedspatial client`` (a hospital's
own data, before it connects) run the same checks:

* errors, never allowed: what :func:`~fedspatial.shared.data.validation.validate_section`
  finds (missing/NaN coordinates, negative or NaN X, unreadable files ...), a missing
  ``data.feature-key`` column, no feature shared by the sites, and a config the data
  cannot carry (``features.n-pcs`` above the features the sites share,
  ``clustering.n-domains`` above a site's cells);
* warnings, which ``simulate`` refuses unless told ``--allow KIND``: see :data:`KINDS`.

Every message names the site, the file, the field and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fedspatial.shared.data.crosssite import (
    ALLOW_HINT,
    KINDS,
    Finding,
    SectionFacts,
    SiteFacts,
    detect_scheme,
    label_findings,
    species_findings,
    x_stats,
)

if TYPE_CHECKING:
    from fedspatial.shared.config import ExperimentConfig

__all__ = ["KINDS", "Finding", "Preflight", "Settings", "run_preflight"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """What the run will use of the data (defaults: ``fedspatial inspect`` without a config)."""

    spatial_key: str = "spatial"
    label_key: str = "domain"
    feature_key: str = ""
    n_top_features: int = 300
    n_pcs: int = 0
    n_neighbors: int = 6
    n_domains: int = 5
    small_panel_fraction: float = 0.5
    expect_counts: bool = True
    min_overlap: float = 0.5
    """A site keeping fewer than this fraction of its features is warned about."""
    modes: tuple[str, ...] = ("federated", "local", "centralized")
    config_name: str = "the config"

    @classmethod
    def from_config(cfg_cls, cfg: ExperimentConfig, *, config_name: str = "the config") -> Settings:
        return cfg_cls(
            spatial_key=cfg.data.spatial_key,
            label_key=cfg.data.label_key,
            feature_key=cfg.data.feature_key,
            n_top_features=cfg.features.n_top_features,
            n_pcs=cfg.features.n_pcs,
            n_neighbors=cfg.neighbors.n_neighbors,
            n_domains=cfg.clustering.n_domains,
            small_panel_fraction=cfg.features.small_panel_fraction,
            expect_counts=cfg.data.expect_counts,
            modes=tuple(cfg.simulation.modes),
            config_name=config_name,
        )


@dataclass
class Preflight:
    """The result of :func:`run_preflight`: per-site facts and every finding."""

    settings: Settings
    sites: list[SiteFacts]
    findings: list[Finding] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    pairwise: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if not f.allowable]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.allowable]

    def refusals(self, allow: Iterable[str] = ()) -> list[Finding]:
        """Errors, and warnings whose kind is not in ``allow``."""
        allowed = set(allow)
        return [f for f in self.findings if not f.allowable or f.kind not in allowed]

    def format(self) -> str:
        from fedspatial.shared.data.preflight_report import format_report

        return format_report(self)


def _feature_names(adata: Any, feature_key: str, source: str) -> tuple[list[str] | None, str | None]:
    if not feature_key:
        return [str(n) for n in adata.var_names], None
    if feature_key not in adata.var.columns:
        return None, _MISSING_KEY
    column = adata.var[feature_key]
    if column.isna().any():
        return None, (
            f"{source}: var[{feature_key!r}] (data.feature-key) has {int(column.isna().sum())} missing "
            "value(s). Fix: give every feature an identifier, or --set data.feature-key= (var_names)"
        )
    return [str(n) for n in column], None


_MISSING_KEY = "missing feature key"


def _missing_key_finding(site: str, files: list[str], sections: list[Any], feature_key: str) -> Finding:
    columns = sorted({str(c) for sec in sections for c in sec.adata.var.columns})
    shown = ", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
    return Finding("data", site, (
        f"site {site!r}: var[{feature_key!r}] (data.feature-key) is missing in {len(files)} file(s): {shown} "
        f"(var columns there: {', '.join(repr(c) for c in columns[:8]) or 'none'}). Fix: match features on "
        f"var_names with --set data.feature-key= (empty), or add the {feature_key!r} column to every section"))


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence INFO/WARNING lines that the findings already say better."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _unique_coordinate_rows(adata: Any, spatial_key: str) -> int | None:
    coords = adata.obsm.get(spatial_key)
    if coords is None:
        return None
    coords = coords.to_numpy() if isinstance(coords, pd.DataFrame) else np.asarray(coords)
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or not np.issubdtype(coords.dtype, np.number):
        return None
    return len(np.unique(coords[:, :2], axis=0))


def _section_facts(
    site: str, section: Any, s: Settings, findings: list[Finding], missing: list[str]
) -> SectionFacts | None:
    adata, source = section.adata, str(section.source)
    where = f"site {site!r}: {source}"
    names, problem = _feature_names(adata, s.feature_key, where)
    if problem == _MISSING_KEY:
        missing.append(source)
        return None
    if problem:
        findings.append(Finding("data", site, problem))
        return None
    stats = x_stats(adata.X) if adata.n_obs and adata.n_vars else None
    counts_layer = "counts" in adata.layers and _layer_is_counts(adata.layers["counts"])
    facts = SectionFacts(name=section.name, source=source, n_obs=adata.n_obs, features=names or [],
                         count_like=None if stats is None else stats.count_like, counts_layer=counts_layer)
    if stats is not None and stats.all_zero:
        findings.append(Finding("zero-section", site, (
            f"{where}: X is all zeros ({adata.n_obs} observations x {adata.n_vars} features): every "
            "spot would get the same domain. Fix: export the measured values into X, or remove the "
            "section from the site's folder")))
    elif stats is not None and s.expect_counts and not stats.count_like:
        offer = ("this file has layers['counts']: store it in X (adata.X = adata.layers['counts'])"
                 if counts_layer else "store raw counts in X (adata.raw.X or the instrument's matrix)")
        findings.append(Finding("non-counts", site, (
            f"{where}: X holds non-integer values (max {stats.max_value:.4g}), not raw counts; fedspatial "
            f"normalizes counts itself (normalize_total, log1p). Fix: {offer}; for intensities "
            "(CODEX, IMC, MSI) set data.expect-counts: false (configs/protein.yaml)")))
    minimum = max(s.n_neighbors + 1, s.n_domains)
    if 0 < adata.n_obs < minimum:
        findings.append(Finding("tiny-section", site, (
            f"{where}: only {adata.n_obs} observation(s), fewer than neighbors.n-neighbors + 1 = "
            f"{s.n_neighbors + 1} or clustering.n-domains = {s.n_domains}: its neighbourhoods and scores "
            "are meaningless (a 1-cell section scores ARI 1.0). Fix: remove the section, or lower "
            "--set neighbors.n-neighbors=K")))
    unique = _unique_coordinate_rows(adata, s.spatial_key)
    if unique is not None and adata.n_obs > 1 and unique <= adata.n_obs // 2:
        how = ("all observations share one coordinate" if unique == 1
               else f"only {unique} distinct coordinates for {adata.n_obs} observations")
        findings.append(Finding("same-coordinates", site, (
            f"{where}: obsm[{s.spatial_key!r}]: {how}; the spatial graph would be arbitrary. Fix: store "
            "each spot's/cell's own x, y, or pass the obsm key that holds them (data.spatial-key)")))
    return facts


def _layer_is_counts(layer: Any) -> bool:
    stats = x_stats(layer)
    return stats.count_like and not stats.all_zero


def _site_facts(name: str, path: str, s: Settings, findings: list[Finding]) -> SiteFacts:
    from fedspatial.shared.data.io import _label_like_columns, _merge_counts, _read_site

    with _quiet("fedspatial.shared.data.validation", "fedspatial.shared.data.io"):
        sections, problems = _read_site(path, spatial_key=s.spatial_key, section_key=None)
    findings.extend(Finding("data", name, f"site {name!r}: {p}") for p in problems)
    labels: dict[str, dict[str, int]] = {}
    missing: list[str] = []
    facts = [f for sec in sections if (f := _section_facts(name, sec, s, findings, missing)) is not None]
    if missing:
        findings.append(_missing_key_finding(name, missing, sections, s.feature_key))
    for sec in sections:
        _merge_counts(labels, _label_like_columns(sec.adata.obs))
    features = sorted({f for sec in facts for f in sec.features})
    site = SiteFacts(name=name, path=path, sections=facts, labels=labels,
                     scheme=detect_scheme(features), label_key=s.label_key)
    if sections:
        from fedspatial.shared.data.io import summarize_site

        site.summary = summarize_site(sections, label_key=s.label_key, spatial_key=s.spatial_key)
    return site


def _feature_findings(report: Preflight) -> None:
    from fedspatial.shared.algorithms.panels import plan_panels
    from fedspatial.shared.features.selection import HarmonizationError

    s, sites = report.settings, report.sites
    section_features = {f"{site.name}/{sec.name}": sec.features for site in sites for sec in site.sections}
    if not section_features:
        return
    for a, b in combinations(sites, 2):
        report.pairwise[(a.name, b.name)] = len(set(a.features) & set(b.features))
    try:
        with _quiet("fedspatial.shared.features.harmonization", "fedspatial.shared.algorithms.panels"):
            plan = plan_panels(section_features, min_fraction=s.small_panel_fraction)
    except HarmonizationError:
        counts = ", ".join(f"{site.name} ({len(site.features)}, ids: {site.scheme})" for site in sites)
        report.findings.append(Finding("features", "", (
            f"the sites share no feature: {counts}. Fix: match features on one identifier at every "
            "site (data.feature-key, e.g. gene_ids for Ensembl ids, or var_names), and check that all "
            "sites measure the same species")))
        return
    report.shared = plan.shared
    shared = set(plan.shared)
    for site in sites:
        kept = {f for sec in site.sections for f in sec.features if f in shared}
        site.kept = len(kept)
        n = len(site.features)
        if n and len(kept) < s.min_overlap * n:
            dropped = [f for f in site.features if f not in kept]
            example = ", ".join(repr(f) for f in dropped[:4])
            report.findings.append(Finding("low-overlap", site.name, (
                f"site {site.name!r} keeps {len(kept)} of its {n} features ({100 * len(kept) / n:.0f}%); the "
                f"federation drops {len(dropped)} (e.g. {example}). Fix: match features on a common "
                "identifier (data.feature-key, e.g. gene_ids), check the species and panels, or remove "
                "the site")))
    _config_findings(report)


def _config_findings(report: Preflight) -> None:
    s, sites = report.settings, report.sites
    in_dim = min(s.n_top_features, len(report.shared))
    if s.n_pcs and in_dim and s.n_pcs > in_dim:
        report.findings.append(Finding("config", "", (
            f"features.n-pcs is {s.n_pcs} in {s.config_name}, but the model gets only {in_dim} features "
            f"({len(report.shared)} shared by the sites, features.n-top-features {s.n_top_features}); "
            f"PCA cannot have more components than features. Fix: --set features.n-pcs={max(1, in_dim // 2)} "
            "(at most the shared features) or --set features.n-pcs=0 (no PCA)")))
    total = sum(site.n_cells for site in sites)
    if total and s.n_domains > total:
        report.findings.append(Finding("config", "", (
            f"clustering.n-domains is {s.n_domains} in {s.config_name}, but the federation holds only "
            f"{total} observations. Fix: --set clustering.n-domains=K with K < {total}")))
    elif "local" in s.modes:
        for site in sites:
            if site.n_cells and s.n_domains > site.n_cells:
                report.findings.append(Finding("config", site.name, (
                    f"site {site.name!r}: clustering.n-domains is {s.n_domains} in {s.config_name}, but "
                    f"the site holds only {site.n_cells} observations (the local mode clusters it alone). "
                    "Fix: remove the site, lower clustering.n-domains, or run --mode federated")))


def run_preflight(sites: Sequence[tuple[str, str]], settings: Settings | None = None) -> Preflight:
    """Check every site's data, across sites, and against the run's settings.

    Parameters
    ----------
    sites
        ``(site name, data path)`` pairs: a ``.h5ad`` file, a SpatialData ``.zarr`` store,
        or a folder of them per site.
    settings
        What the run will use; default :class:`Settings` (``fedspatial inspect``).

    Returns
    -------
    Preflight
        Never raises for bad data: every problem is a :class:`Finding`.
    """
    s = settings or Settings()
    report = Preflight(settings=s, sites=[])
    counts: dict[str, int] = {}
    for name, _ in sites:
        counts[name] = counts.get(name, 0) + 1
    for name, n in counts.items():
        if n > 1:
            report.findings.append(Finding("data", name, (
                f"site name {name!r} is given {n} times; the sites would share one results folder. "
                "Fix: give every site its own name (NAME=PATH with --data, or 'name' in the manifest)")))
    report.sites = [_site_facts(name, path, s, report.findings) for name, path in sites]
    _feature_findings(report)
    report.findings += species_findings(report.sites)
    report.findings += label_findings(report.sites, s.label_key)
    return report


def explain_allow() -> str:
    """One line per allowable kind, for ``--help`` and messages."""
    return "; ".join(f"{k}: {v}" for k, v in KINDS.items()) + f". {ALLOW_HINT}"
