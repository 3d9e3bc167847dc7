"""Phase ``finalize``: every site assigns its cells to the federation's domains, refines
them spatially, writes its annotated sections and plots at home, and returns scores
and label x domain counts only.

Fields each annotated section gains (a copy of the input; the input is never modified):
``obsm["X_fedspatial"]`` (embedding), ``obsm["X_fedspatial_uncorrected"]`` (before
Harmony, when it ran), ``obs["fedspatial_domain"]`` (categorical ``"0"``..``"K-1"``),
``obs["fedspatial_confidence"]`` (posterior of that domain) and ``uns["fedspatial"]``.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from typing import Any

import numpy as np
import pandas as pd

from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.algorithms.mixture import MixtureParams
from fedspatial.shared.evaluation import metrics
from fedspatial.shared.phases.base import Federation, Phase, Run, Site
from fedspatial.shared.phases.embedding import embedding_of, uncorrected_embedding
from fedspatial.shared.plots import plot_section_domains
from fedspatial.shared.protocol.names import NUM_EXAMPLES, Query
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.storage.atomic import write_atomic

logger = logging.getLogger(__name__)


class Finalize(Phase):
    name = "finalize"
    queries = (Query.FINALIZE,)

    def run(self, fed: Federation, run: Run) -> None:
        assert run.domains is not None
        c = run.cfg.clustering
        config = {**run.message_config(), "variance": run.domains.variance, "refine": c.refine, "mixture": c.mixture}
        replies = fed.ask(Query.FINALIZE, Payload(arrays=run.domains.arrays, config=config))  # type: ignore[arg-type]
        run.site_reports = [json.loads(r.string("report")) for r in replies.values()]
        sizes = np.sum([r.array("domain-counts") for r in replies.values()], axis=0)
        run.report["domain-sizes"] = sizes.astype(int).tolist()

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        report, counts = finalize_site(site, request)
        return Payload(arrays={"domain-counts": counts}, config={"report": json.dumps(report)}, metrics={NUM_EXAMPLES: site.n_cells})


def finalize_site(site: Site, request: Payload) -> tuple[dict[str, Any], np.ndarray]:
    """Domains, confidence and outputs written at the site; returns (report, domain counts)."""
    z = embedding_of(site.state)
    before = uncorrected_embedding(site.state)
    data = site.graph_data(site.setup())
    centroids = request.array("centroids")
    mixture = request.string("mixture", "none")
    if mixture != "none":  # centroids are then the mixture's means, sent with its other parameters
        posterior = MixtureParams.from_arrays(request.arrays, mixture).predict_proba(z)
        labels = posterior.argmax(axis=1)
    else:
        labels, _ = clustering.assign_clusters(z, centroids)
        posterior = clustering.isotropic_posterior(z, centroids, request.number("variance"))
    neighbors = data.neighbors.numpy()
    refine = request.flag("refine", True)
    run_name = request.string("run-name", site.cfg.run_name)
    label_key, out_dir = site.cfg.data.label_key, site.output_dir
    report: dict[str, Any] = {"site": site.name, "sections": {}, "contingency": {}, "outputs": []}
    per_site: dict[str, list[metrics.Contingency]] = {}
    for section, (key, start, stop) in zip(site.sections, data.sections, strict=True):
        dom = labels[start:stop]
        if refine:
            local = neighbors[start:stop]
            dom = clustering.refine_labels(dom, np.where(local >= 0, local - start, -1))
        conf = posterior[start:stop][np.arange(stop - start), dom]
        annotated = section.adata.copy()
        annotated.obsm["X_fedspatial"] = z[start:stop]
        if before is not None:
            annotated.obsm["X_fedspatial_uncorrected"] = before[start:stop]
        annotated.obs["fedspatial_domain"] = pd.Categorical(dom.astype(str), categories=[str(i) for i in range(len(centroids))])
        annotated.obs["fedspatial_confidence"] = conf.astype(np.float32)
        annotated.uns["fedspatial"] = {"run": run_name, "n_domains": len(centroids), "refine": refine}
        path = out_dir / f"{section.site}__{section.name}.h5ad"
        write_atomic(path, annotated.write_h5ad)
        entry: dict[str, Any] = {"site": section.site, "n_cells": int(stop - start), "output": str(path), "peak_rss_mb": peak_rss_mb()}
        truth = section.adata.obs.get(label_key)
        if truth is not None:
            entry.update(metrics.section_scores(truth.to_numpy(), dom))
            per_site.setdefault(section.site, []).append(metrics.contingency(truth.to_numpy(), dom))
        png = out_dir / f"{section.site}__{section.name}_domains.png"
        coords = np.asarray(section.adata.obsm[site.cfg.data.spatial_key])[:, :2]
        plot_section_domains(coords, dom, truth.to_numpy() if truth is not None else None, title=section.key, path=png)
        entry["plot"] = str(png)
        report["sections"][key] = entry
        report["outputs"] += [str(path), str(png)]
    for name, tables in per_site.items():
        merged = metrics.merge_contingency(tables)
        report["contingency"][name] = {
            "labels": merged.labels, "domains": [int(d) for d in merged.domains], "counts": merged.counts.tolist(),
        }
    logger.info("%s: wrote %d annotated sections to %s", site.name, len(site.sections), out_dir)
    return report, np.bincount(labels, minlength=len(centroids)).astype(np.int64)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (what a site's IT staff must provision;
    the process that served the site, so with other sites in the same process an upper bound)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak / 2**20 if sys.platform == "darwin" else peak / 1024)  # bytes on macOS, KiB on Linux
