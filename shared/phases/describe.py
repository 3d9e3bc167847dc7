"""Phase ``describe``: each site reports its sections, sizes, feature names and label
names (no cells); the server learns the sites' names."""

from __future__ import annotations

import json
import logging

from fedspatial.shared.features.selection import feature_names
from fedspatial.shared.phases.base import Federation, Phase, Run, Site, SiteDescription
from fedspatial.shared.protocol.names import NUM_EXAMPLES, Query
from fedspatial.shared.protocol.payload import Payload

logger = logging.getLogger(__name__)


class Describe(Phase):
    name = "describe"
    queries = (Query.DESCRIBE,)

    def run(self, fed: Federation, run: Run) -> None:
        replies = fed.ask(Query.DESCRIBE)
        admitted = fed.rename({key: reply.string("site") for key, reply in replies.items()})
        for reply in (replies[key] for key in admitted):  # never an impostor's description
            run.sites[reply.string("site")] = SiteDescription(
                n_cells=int(reply.metrics[NUM_EXAMPLES]),
                sections=reply.strings("sections"),
                section_sites=reply.strings("section-sites"),
                section_sizes=[int(v) for v in reply.config.get("section-sizes", [])],  # type: ignore[union-attr]
                section_features=json.loads(reply.string("section-features")),
                labels=reply.strings("labels"),
            )
        logger.info("sites: %s", ", ".join(f"{name} ({d.n_cells} cells)" for name, d in sorted(run.sites.items())))

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        names = [feature_names(s.adata, site.feature_key) for s in site.sections]
        labels: set[str] = set()
        label_key = site.cfg.data.label_key
        for s in site.sections:
            if label_key in s.adata.obs:
                labels |= {str(v) for v in s.adata.obs[label_key].dropna().unique()}
        return Payload(
            config={
                "site": site.name,
                "sections": [s.key for s in site.sections],
                "section-sites": [s.site for s in site.sections],
                "section-sizes": [int(s.adata.n_obs) for s in site.sections],
                # JSON: the server may map a section with a small panel instead of intersecting
                "section-features": json.dumps({s.key: n for s, n in zip(site.sections, names, strict=True)}),
                "labels": sorted(labels),
            },
            metrics={NUM_EXAMPLES: site.n_cells},
        )
