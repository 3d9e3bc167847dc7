"""Phase ``markers``: the genes that mark each domain, equal to pooled scanpy.

Runs after ``finalize``, when every site holds its cells' final domains (they never
leave it). Two steps of ``query.markers``:

1. ``sums``: each site returns, per domain and per gene shared by every section, the
   cell count, the sum and the sum of squares of the log-normalized expression and the
   number of expressing cells (``K x G`` arrays,
   :func:`~fedspatial.shared.algorithms.markers.domain_gene_sums`). The server adds them
   in site-name order and ranks the genes of every domain against the rest
   (:func:`~fedspatial.shared.algorithms.markers.rank_markers`: scanpy's
   ``rank_genes_groups`` t-test on the pooled data), then writes ``markers.csv`` and
   ``markers_dotplot.png`` into the mode's results folder.
2. ``store``: each site adds the ranking to its annotated sections as
   ``uns["rank_genes_groups"]`` (scanpy's layout, ``groupby="fedspatial_domain"``).

Under ``privacy.local-dp`` the sums are not covered by the site's privacy ledger: the
server skips the phase (a log line and ``metrics.json: markers.skipped``) and a site
refuses to answer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedspatial.shared.algorithms.markers import (
    DomainGeneSums,
    Markers,
    domain_gene_sums,
    merge_domain_gene_sums,
    rank_markers,
)
from fedspatial.shared.features.harmonization import feature_names, shared_features
from fedspatial.shared.phases.base import Federation, Phase, Run, Site
from fedspatial.shared.phases.finalize import annotated_path, final_domains
from fedspatial.shared.plots import plot_marker_dots
from fedspatial.shared.protocol.names import NUM_EXAMPLES, STAGE, MarkerStage, Query
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.storage.atomic import write_atomic

logger = logging.getLogger(__name__)

GROUPBY = "fedspatial_domain"
"""The ``obs`` column the ranking refers to (written by ``finalize``)."""
CSV_NAME, PLOT_NAME = "markers.csv", "markers_dotplot.png"
LOCAL_DP_REFUSAL = (
    "marker genes need per-domain expression sums, which the privacy ledger does not cover; "
    "refused under privacy.local-dp (set markers.marker-genes: false to silence this)"
)


class MarkersPhase(Phase):
    name = "markers"
    queries = (Query.MARKERS,)
    rides_with = "finalize"  # the sums need only the final domains

    @staticmethod
    def sums_request(run: Run) -> Payload:
        assert run.domains is not None
        return Payload(config={  # type: ignore[arg-type]
            STAGE: MarkerStage.SUMS, "genes": marker_genes(run), "target-sum": run.cfg.features.target_sum,
            "n-domains": len(run.domains.centroids),
        })

    def early_requests(self, run: Run) -> list[tuple[str, Payload]]:
        if run.cfg.privacy.local_dp or run.domains is None:
            return []
        return [(Query.MARKERS, self.sums_request(run))]

    def enabled(self, run: Run) -> bool:
        return run.cfg.markers.marker_genes

    def run(self, fed: Federation, run: Run) -> None:
        cfg = run.cfg
        if cfg.privacy.local_dp:
            logger.warning("marker genes skipped: %s", LOCAL_DP_REFUSAL)
            run.report["markers"] = {"skipped": LOCAL_DP_REFUSAL}
            return
        request = self.sums_request(run)
        genes = request.strings("genes")
        replies = fed.ask(Query.MARKERS, request, require_all=True)  # a sum needs every site
        sums = merge_domain_gene_sums([DomainGeneSums.from_arrays(genes, r.arrays) for r in replies.values()])
        try:
            markers = rank_markers(sums, method=cfg.markers.marker_method)
        except ValueError as err:  # e.g. every cell in one domain: nothing to compare
            logger.warning("marker genes skipped: %s", err)
            run.report["markers"] = {"skipped": str(err)}
            return
        write_markers(run.folder, markers, sums, n_plot=cfg.markers.marker_plot_genes)
        fed.ask(Query.MARKERS, Payload(arrays=markers.to_arrays(), config={  # type: ignore[arg-type]
            STAGE: MarkerStage.STORE, "genes": genes, "groups": markers.groups, "method": markers.method,
        }))
        run.report["markers"] = {
            "method": markers.method, "n-genes": len(genes), "domains": markers.groups,
            "top": markers.top(cfg.markers.marker_plot_genes), "files": [CSV_NAME, PLOT_NAME],
        }
        logger.info("marker genes (%s, %d genes): %s", markers.method, len(genes), markers.top(3))

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        if site.cfg.privacy.local_dp:  # the site's own check, whatever the server asks
            raise PermissionError(f"{site.name}: {LOCAL_DP_REFUSAL}")
        genes = request.strings("genes")
        if request.string(STAGE) == MarkerStage.SUMS:
            sums = site_marker_sums(site, genes, n_domains=int(request.number("n-domains")),
                                    target_sum=request.number("target-sum"))
            return Payload(arrays=sums.to_arrays(), metrics={NUM_EXAMPLES: site.n_cells})
        markers = Markers.from_arrays(request.string("method"), genes, request.strings("groups"), request.arrays)
        store_markers(site, markers)
        return Payload(metrics={NUM_EXAMPLES: site.n_cells})


def marker_genes(run: Run) -> list[str]:
    """The genes every section of every site holds (all of them, not only the model's
    inputs), in the first section's order."""
    features = {key: names for d in run.sites.values() for key, names in d.section_features.items()}
    return shared_features(features)


def site_marker_sums(site: Site, genes: list[str], *, n_domains: int, target_sum: float) -> DomainGeneSums:
    """The site's per-domain sums over ``genes`` from its final domains."""
    domains, _ = final_domains(site)
    bounds = np.cumsum([s.adata.n_obs for s in site.sections])[:-1]
    return domain_gene_sums(
        [s.adata for s in site.sections], np.split(domains, bounds), genes,
        n_domains=n_domains, target_sum=target_sum, feature_key=site.feature_key,
    )


def store_markers(site: Site, markers: Markers) -> None:
    """Add ``uns["rank_genes_groups"]`` to every annotated section of the site (read
    back from ``finalize``'s output and replaced atomically)."""
    import anndata as ad

    for section in site.sections:
        path = annotated_path(site.output_dir, section)
        annotated = ad.read_h5ad(path)
        names = None
        if site.feature_key:  # the site's var_names, so that scanpy finds the genes
            names = dict(zip(feature_names(annotated, site.feature_key), map(str, annotated.var_names), strict=True))
        annotated.uns["rank_genes_groups"] = markers.to_uns(groupby=GROUPBY, names=names)
        write_atomic(path, annotated.write_h5ad)
    logger.info("%s: marker genes added to %d annotated section(s)", site.name, len(site.sections))


def write_markers(folder: Path, markers: Markers, sums: DomainGeneSums, *, n_plot: int) -> dict[str, Any]:
    """``markers.csv`` (every gene of every tested domain, ranked) and the dot plot of
    the top ``n_plot`` genes per domain."""
    csv = write_atomic(folder / CSV_NAME, lambda tmp: markers.to_frame().to_csv(tmp, index=False))
    top = markers.top(n_plot)
    genes = list(dict.fromkeys(g for group in markers.groups for g in top[group]))
    rows = [int(g) for g in markers.groups]
    cols = [markers.genes.index(g) for g in genes]
    plot = plot_marker_dots(
        markers.means[np.ix_(rows, cols)], markers.fractions[np.ix_(rows, cols)],
        domains=markers.groups, genes=genes, path=folder / PLOT_NAME,
        title=f"top {n_plot} marker genes per domain ({markers.method}, {int(sums.n_cells.sum())} cells)",
    )
    return {"csv": str(csv), "plot": str(plot)}
