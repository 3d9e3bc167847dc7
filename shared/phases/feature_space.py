"""Phase ``feature space``: one harmonized feature space for the federation.

The sites send per-feature sums over the features they share (``query.feature_stats``);
the server selects highly variable features and the standardization from the merged
sums, equal to the pooled computation, and sends the result to every site
(``query.setup``). A section with a small panel does not shrink the space: it is
planned here and mapped onto the others by the panel phase.

Under ``privacy.local-dp`` (or ``privacy.feature-stats-noise`` > 0) a site answers with
its one private release (:mod:`fedspatial.shared.privacy.feature_release`: noisy sums of
clipped values, charged once to its ledger, kept in its state), and under local DP
each of its sections is centred by that release's section mean
(:func:`section_centres`), so that a cell's model input depends only on its own counts
and released statistics.

With ``model.init-from`` the loaded model's feature space is the run's (its genes and
standardization; :mod:`fedspatial.shared.storage.pretrained`): nothing is selected and no
statistics are asked for here; under local DP each site still releases its section means
(charged) when it prepares its inputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedspatial.shared.algorithms.panels import plan_panels
from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.features.feature_stats import (
    CLIPPED_FIELDS,
    ClippedStats,
    merge_clipped_stats,
    to_numpy,
)
from fedspatial.shared.features.selection import (
    FeatureStats,
    build_feature_space,
    compute_feature_stats,
    merge_feature_stats,
)
from fedspatial.shared.phases.base import Federation, Phase, Run, Site
from fedspatial.shared.phases.setup import SiteSetup, store_setup
from fedspatial.shared.phases.training import resolved_encoder
from fedspatial.shared.privacy.budget import budget_plan
from fedspatial.shared.privacy.feature_release import (
    FeatureRelease,
    release_bounds,
    release_features,
    release_key,
)
from fedspatial.shared.privacy.ledger import Release
from fedspatial.shared.protocol.feature_space import (
    feature_space_from_config,
    feature_space_to_config,
)
from fedspatial.shared.protocol.names import NUM_EXAMPLES, Query
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.storage.pretrained import pretrained_space, read_pretrained

if TYPE_CHECKING:
    from fedspatial.shared.data.sections import SiteSection

logger = logging.getLogger(__name__)

NOISE_VAR_SUM, NOISE_VAR_SUMSQ = "noise-var-sum", "noise-var-sumsq"
CLIP_NORM, CLIP_SQUARE = "clip-norm", "clip-square"


def private_release(cfg: ExperimentConfig) -> bool:
    """Whether the sites answer ``query.feature_stats`` with a private release."""
    return cfg.privacy.local_dp or cfg.privacy.feature_stats_noise > 0


def federated_feature_stats(
    fed: Federation,
    sites: Sequence[str],
    *,
    features: list[str],
    target_sum: float,
    sections: list[str] | None = None,
) -> FeatureStats | ClippedStats:
    """Per-feature aggregates over ``features`` (only over the named sections when
    given), summed in site-name order: exact :class:`FeatureStats`, or the merged private
    releases (:class:`ClippedStats`) when the sites answer with those."""
    config = {"features": features, "target-sum": target_sum, **({"sections": sections} if sections else {})}
    replies = fed.ask(Query.FEATURE_STATS, Payload(config=config), sites=sites)  # type: ignore[arg-type]
    if replies and all(CLIPPED_FIELDS[0] in r.arrays for r in replies.values()):
        return merge_clipped_stats([_clipped_reply(features, r) for r in replies.values()])
    return merge_feature_stats(
        [FeatureStats.from_arrays(features, int(r.metrics[NUM_EXAMPLES]), r.arrays) for r in replies.values()]
    )


def _clipped_reply(features: list[str], reply: Payload) -> ClippedStats:
    m = reply.metrics
    return ClippedStats(
        features, int(m[NUM_EXAMPLES]), to_numpy(reply.array(CLIPPED_FIELDS[0])), to_numpy(reply.array(CLIPPED_FIELDS[1])),
        clip_norm=float(m[CLIP_NORM]), clip_square=float(m[CLIP_SQUARE]),
        noise_var_sum=float(m[NOISE_VAR_SUM]), noise_var_sumsq=float(m[NOISE_VAR_SUMSQ]),
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
        elif cfg.model.init_from:  # the loaded model's genes: no selection, nothing asked here
            space = pretrained_space(read_pretrained(cfg, encoder=resolved_encoder(cfg)), cfg, features)
            logger.info("feature space: the %d features of %s", len(space.selected), cfg.model.init_from)
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
        features, target_sum = request.strings("features"), request.number("target-sum")
        if private_release(site.cfg):
            stats = site_feature_release(site, features, target_sum=target_sum, sections=sections).site_stats()
            metrics: dict[str, int | float] = {
                NUM_EXAMPLES: stats.n_cells, CLIP_NORM: stats.clip_norm, CLIP_SQUARE: stats.clip_square,
                NOISE_VAR_SUM: stats.noise_var_sum, NOISE_VAR_SUMSQ: stats.noise_var_sumsq,
            }
            return Payload(arrays=stats.to_arrays(), metrics=metrics)
        exact = site_feature_stats(site, features, target_sum=target_sum, sections=sections)
        return Payload(arrays=exact.to_arrays(), metrics={NUM_EXAMPLES: exact.n_cells})


def site_feature_stats(
    site: Site, features: list[str], *, target_sum: float, sections: list[str] | None = None
) -> FeatureStats:
    """Exact per-feature aggregates (over the named sections only, when given); a private
    run answers with :func:`site_feature_release` instead."""
    chosen = [s for s in site.sections if sections is None or s.key in set(sections)]
    return compute_feature_stats([s.adata for s in chosen], features, target_sum=target_sum, feature_key=site.feature_key)


def site_feature_release(
    site: Site, features: list[str], *, target_sum: float, sections: list[str] | None = None
) -> FeatureRelease:
    """The site's private release over ``features`` (the named sections only, when given).

    Drawn and charged to the ledger (kind ``feature-stats``, noise multiplier
    ``budget_plan(cfg.privacy).feature_noise``; refused past the budget) the first time
    only: it is kept in the site's state under :func:`release_key`, and the same request
    (a restarted message) gets the same values back without a new draw or charge.
    """
    p = site.cfg.privacy
    chosen = [s for s in site.sections if sections is None or s.key in set(sections)]
    bounds = release_bounds(p.feature_clip, target_sum)
    sigma = budget_plan(p).feature_noise
    key = release_key(features, [s.key for s in chosen], target_sum, bounds, sigma)
    stored = site.state.get(key)
    if stored is not None:
        return FeatureRelease.from_payload(stored)
    ledger = site.ledger()
    try:
        ledger.check("feature-stats", 0, sigma, 1.0, 1)
    finally:
        site.save_ledger(ledger)
    release = release_features(
        [(s.key, s.adata) for s in chosen], features, target_sum=target_sum, bounds=bounds,
        noise_multiplier=sigma, feature_key=site.feature_key,
    )
    details = {
        "noise-multiplier": sigma, "clip-norm": bounds.clip_norm, "clip-square": bounds.clip_square,
        "sections": len(chosen), "features": len(features),
    }
    ledger.record(Release("feature-stats", 0, sigma, 1.0, 1, details=details))
    site.save_ledger(ledger)
    site.state.put(key, release.to_payload())
    return release


def section_centres(site: Site, setup: SiteSetup, sections: Sequence[SiteSection]) -> dict[str, np.ndarray]:
    """Each section's released mean over ``setup.space.selected`` (``float64``), the centre
    of its model inputs under local DP with ``features.scale: section``.

    Taken from the release that answered ``query.feature_stats``; a site that lost its
    state (a resumed run whose server kept the feature space) releases again, charged.
    """
    space = setup.space
    if space.clip_norm is None:
        raise RuntimeError(f"{site.name}: under privacy.local-dp the feature space must come from a private release")
    release = site_feature_release(site, space.shared, target_sum=space.target_sum, sections=[s.key for s in sections])
    if (release.bounds.clip_norm, release.bounds.clip_square) != (space.clip_norm, space.clip_square):
        raise RuntimeError(f"{site.name}: the feature space's clip bounds differ from this site's release")
    position = {f: i for i, f in enumerate(release.features)}
    cols = np.array([position[f] for f in space.selected], dtype=np.int64)
    return {s.key: release.section_mean(s.key)[cols] for s in sections}

