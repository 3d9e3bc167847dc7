"""Phase ``small-panel mapping``: sections measured with a small feature panel are
mapped onto the federation's model inputs by a federated ridge regression
(:mod:`fedspatial.shared.algorithms.panels`).

For each panel: the panel's standardization comes from the reference sections
(``query.feature_stats``), the reference sites return regression sums between the
panel's features and their model inputs (``query.panel`` stage ``moments``), and the
fitted map goes to the sites holding sections with that panel (stage ``store``).
Deterministic, so a resumed run recomputes it.
"""

from __future__ import annotations

import logging

import numpy as np

from fedspatial.shared.algorithms.panels import (
    PanelMap,
    fit_panel_map,
    merge_panel_moments,
    panel_moments,
)
from fedspatial.shared.data.sections import section_features
from fedspatial.shared.features.selection import build_feature_space
from fedspatial.shared.phases.base import Federation, Phase, Run, Site
from fedspatial.shared.phases.feature_space import federated_feature_stats, section_sites
from fedspatial.shared.phases.setup import store_panel_map
from fedspatial.shared.protocol.feature_space import (
    feature_space_from_config,
    feature_space_to_config,
)
from fedspatial.shared.protocol.names import NUM_EXAMPLES, STAGE, PanelStage, Query
from fedspatial.shared.protocol.payload import Payload

logger = logging.getLogger(__name__)


class PanelPhase(Phase):
    name = "small-panel mapping"
    queries = (Query.PANEL,)

    def enabled(self, run: Run) -> bool:
        return run.plan is not None and bool(run.plan.panels)

    def run(self, fed: Federation, run: Run) -> None:
        plan, cfg = run.plan, run.cfg
        assert plan is not None
        holders = section_sites(run)
        reference_sites = sorted({holders[k] for k in plan.reference})
        report: dict[str, dict[str, object]] = {}
        for panel_id, panel in plan.panels.items():
            keys = [k for k, p in plan.mapped.items() if p == panel_id]
            stats = federated_feature_stats(
                fed, reference_sites, features=panel, target_sum=cfg.features.target_sum, sections=plan.reference
            )
            space = build_feature_space(
                stats, n_top_features=None, target_sum=cfg.features.target_sum, feature_key=cfg.data.feature_key or None
            )
            config = {**feature_space_to_config(space), "panel-id": panel_id}
            replies = fed.ask(Query.PANEL, Payload(config={**config, STAGE: PanelStage.MOMENTS.value}), sites=reference_sites)
            panel_map = fit_panel_map(merge_panel_moments([r.arrays for r in replies.values()]))
            fed.ask(
                Query.PANEL, Payload(arrays=panel_map.to_arrays(), config={**config, STAGE: PanelStage.STORE.value}),
                sites=sorted({holders[k] for k in keys}),
            )
            logger.info(
                "panel %s: %d features mapped onto %d model inputs (R^2 %.2f on average, %.2f for the first)",
                panel_id, len(panel), len(panel_map.r2), float(panel_map.r2.mean()), float(panel_map.r2[0]),
            )
            for key in keys:
                report[key] = {
                    "n-features": len(run.sites[holders[key]].section_features[key]),
                    "n-features-shared": len(panel),
                    "r2-mean": float(panel_map.r2.mean()),
                    "r2": [round(float(v), 4) for v in panel_map.r2],
                }
        run.report["mapped-panels"] = report

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        space = feature_space_from_config(request.config)
        setup = site.setup()
        if PanelStage(request.string(STAGE)) is PanelStage.STORE:
            store_panel_map(site.state, request.string("panel-id"), space, PanelMap.from_arrays(request.arrays))
            return Payload(metrics={NUM_EXAMPLES: site.prepare(site.setup())})
        scale = site.cfg.features.scale
        x = np.concatenate([section_features(s, space, scale=scale) for s in site.reference_sections(setup)])
        moments = panel_moments(x, site.reference_inputs(setup))
        return Payload(arrays=moments, metrics={NUM_EXAMPLES: int(moments["count"][0])})
