"""Phase ``feature space``: one harmonized feature space for the federation.

The sites send per-feature sums over the features they share (``query.feature_stats``;
noised and charged to the site's ledger when ``privacy.feature-stats-noise`` > 0); the
server selects highly variable features and the standardization from the merged sums,
equal to the pooled computation, and sends the result to every site
(``query.setup``). A section with a small panel does not shrink the space: it is
planned here and mapped onto the others by the panel phase.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import numpy as np

from fedspatial.shared.algorithms.panels import plan_panels
from fedspatial.shared.config import ConfigError
from fedspatial.shared.features.selection import (
    FeatureStats,
    build_feature_space,
    compute_feature_stats,
    merge_feature_stats,
)
from fedspatial.shared.phases.base import Federation, Phase, Run, Site
from fedspatial.shared.phases.setup import store_setup
from fedspatial.shared.privacy.dp import Release, noisy_feature_stats
from fedspatial.shared.protocol.feature_space import (
    feature_space_from_config,
    feature_space_to_config,
)
from fedspatial.shared.protocol.names import NUM_EXAMPLES, Query
from fedspatial.shared.protocol.payload import Payload

logger = logging.getLogger(__name__)


def federated_feature_stats(
    fed: Federation,
    sites: Sequence[str],
    *,
    features: list[str],
    target_sum: float,
    sections: list[str] | None = None,
) -> FeatureStats:
    """Per-feature aggregates over ``features`` (only over the named sections when
    given), summed in site-name order."""
    config = {"features": features, "target-sum": target_sum, **({"sections": sections} if sections else {})}
    replies = fed.ask(Query.FEATURE_STATS, Payload(config=config), sites=sites)  # type: ignore[arg-type]
    return merge_feature_stats(
        [FeatureStats.from_arrays(features, int(r.metrics[NUM_EXAMPLES]), r.arrays) for r in replies.values()]
    )


def batch_names(mode: str, run: Run) -> list[str]:
    """Federation-wide batch names for a batch-aware decoder or Harmony ([] for none)."""
    if mode == "none":
        return []
    if mode == "site":
        return sorted({s for d in run.sites.values() for s in d.section_sites})
    return sorted({s for d in run.sites.values() for s in d.sections})


def section_sites(run: Run) -> dict[str, str]:
    """Which site holds each section."""
    return {key: site for site, d in run.sites.items() for key in d.sections}


class FeatureSpacePhase(Phase):
    name = "feature space"
    queries = (Query.FEATURE_STATS, Query.SETUP)

    def run(self, fed: Federation, run: Run) -> None:
        cfg = run.cfg
        features = {key: f for d in run.sites.values() for key, f in d.section_features.items()}
        plan = plan_panels(features, min_fraction=cfg.features.small_panel_fraction)
        if plan.mapped and cfg.privacy.local_dp:
            raise ConfigError(
                f"section(s) {', '.join(plan.mapped)} hold a small feature panel, and mapping it onto the "
                "others releases regression sums outside the privacy ledger: set features.small-panel-fraction: 0 "
                "(plain intersection) when privacy.local-dp is on"
            )
        run.plan = plan
        if run.checkpoint is not None:
            space = feature_space_from_config(run.checkpoint.state["feature-space"])
        else:
            holders = section_sites(run)
            stats = federated_feature_stats(
                fed, sorted({holders[k] for k in plan.reference}), features=plan.shared,
                target_sum=cfg.features.target_sum, sections=plan.reference if plan.mapped else None,
            )
            space = build_feature_space(
                stats, n_top_features=cfg.features.n_top_features, target_sum=cfg.features.target_sum,
                feature_key=cfg.data.feature_key or None,
            )
            logger.info("feature space: %d shared features, %d selected", len(space.shared), len(space.selected))
        run.space = space
        run.in_dim = len(space.selected)
        run.batches = batch_names(cfg.model.batch, run)
        setup = {**feature_space_to_config(space), "batches": run.batches, "mapped-sections": json.dumps(plan.mapped)}
        fed.ask(Query.SETUP, Payload(config=setup))  # type: ignore[arg-type]
        run.report.update({"n-features-shared": len(space.shared), "n-features-selected": len(space.selected)})
        run.report["reference-sections"] = plan.reference

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        if query == Query.SETUP:
            store_setup(site.state, request)
            n_cells = site.prepare(site.setup())  # prepare now: later rounds reuse it
            return Payload(metrics={NUM_EXAMPLES: n_cells})
        sections = request.strings("sections") or None
        stats = site_feature_stats(site, request.strings("features"), target_sum=request.number("target-sum"), sections=sections)
        return Payload(arrays=stats.to_arrays(), metrics={NUM_EXAMPLES: stats.n_cells})


def site_feature_stats(
    site: Site, features: list[str], *, target_sum: float, sections: list[str] | None = None
) -> FeatureStats:
    """Per-feature aggregates (over the named sections only, when given); released
    through the Gaussian mechanism (and charged to the site's ledger) when
    ``privacy.feature-stats-noise`` > 0."""
    chosen = [s for s in site.sections if sections is None or s.key in set(sections)]
    stats = compute_feature_stats([s.adata for s in chosen], features, target_sum=target_sum, feature_key=site.feature_key)
    sigma = site.cfg.privacy.feature_stats_noise
    if sigma <= 0:
        return stats
    ledger = site.ledger()
    equivalent = sigma / np.sqrt(6.0)  # six blocks, see noisy_feature_stats
    try:
        ledger.check("feature-stats", 0, equivalent, 1.0, 1)
    finally:
        site.save_ledger(ledger)
    n, arrays, equivalent = noisy_feature_stats(stats.n_cells, stats.to_arrays(), target_sum=target_sum, noise_multiplier=sigma)
    ledger.record(Release("feature-stats", 0, equivalent, 1.0, 1, details={"noise-multiplier": sigma}))
    site.save_ledger(ledger)
    return FeatureStats.from_arrays(stats.features, n, arrays)

