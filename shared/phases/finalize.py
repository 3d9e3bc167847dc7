"""Phase ``finalize``: every site assigns its cells to the federation's domains, refines
them spatially, writes its annotated sections and plots at home, and returns scores,
label x domain counts (under local DP only those, through a Gaussian mechanism:
:mod:`fedspatial.shared.privacy.tables`) and, for the confidence's calibration, the same counts per
confidence bin only. The final domains stay in the site's state for the markers phase.

Fields each annotated section gains (a copy of the input; the input is never modified):
``obsm["X_fedspatial"]`` (embedding), ``obsm["X_fedspatial_uncorrected"]`` (before
Harmony, when it ran), ``obs["fedspatial_domain"]`` (categorical ``"0"``..``"K-1"``),
``obs["fedspatial_confidence"]`` (posterior of that domain), ``uns["fedspatial_domain_colors"]``
(the federation's palette, ``"#rrggbb"`` per domain id: scanpy's ``<key>_colors`` convention,
so ``sc.pl.spatial(adata, color="fedspatial_domain")`` draws the same colours at every site)
and ``uns["fedspatial"]`` (:func:`run_record`).
"""

from __future__ import annotations

import copy
import json
import logging
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.algorithms.mixture import MixtureParams
from fedspatial.shared.evaluation import metrics
from fedspatial.shared.evaluation.calibration import (
    CalibrationTable,
    calibration_table,
    merge_calibration_tables,
)
from fedspatial.shared.phases.base import Federation, Phase, Run, Site
from fedspatial.shared.phases.embedding import (
    embedding_of,
    per_cell_embedding_of,
    uncorrected_embedding,
)
from fedspatial.shared.plots import domain_palette, plot_section_domains
from fedspatial.shared.privacy.tables import label_vocabulary, private_tables, vocabulary_table
from fedspatial.shared.protocol.names import NUM_EXAMPLES, Query
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.storage.atomic import write_atomic

if TYPE_CHECKING:
    from fedspatial.shared.config import ExperimentConfig
    from fedspatial.shared.data.sections import SiteSection
    from fedspatial.shared.phases.setup import SiteSetup

logger = logging.getLogger(__name__)

DOMAINS_STATE = "final-domains"
"""Site state key of the final domains (read by the markers phase)."""


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
    setup = site.setup()
    data = site.graph_data(setup)
    centroids = request.array("centroids")
    mixture = request.string("mixture", "none")
    logits: np.ndarray | None = None  # log weighted densities: what the calibration phase tempers
    if mixture != "none":  # centroids are then the mixture's means, sent with its other parameters
        params = MixtureParams.from_arrays(request.arrays, mixture)
        posterior, logits = params.predict_proba(z), params.weighted_log_prob(z)
        labels = posterior.argmax(axis=1)
    else:
        labels, _ = clustering.assign_clusters(z, centroids)
        variance = request.number("variance")
        posterior = clustering.isotropic_posterior(z, centroids, variance)
        if variance > 0:  # -||z - c||^2 / (2 variance) up to a per-cell constant, which softmax ignores
            logits = (z @ centroids.T - 0.5 * (centroids**2).sum(axis=1)) / variance
    neighbors = data.neighbors.numpy()
    refine = request.flag("refine", True)
    run_name = request.string("run-name", site.cfg.run_name)
    label_key, out_dir = site.cfg.data.label_key, site.output_dir
    private = site.cfg.privacy.local_dp
    # Under local DP the released tables count each cell's own assignment (its per-cell
    # embedding's nearest centroid): a smoothed or refined domain depends on the cell's
    # neighbours, so one cell could move many entries and the table's sensitivity sqrt(2)
    # would not hold. The smoothed, refined domains are written at the site only.
    cell_labels = clustering.assign_clusters(per_cell_embedding_of(site.state), centroids)[0] if private else labels
    vocabulary = label_vocabulary([s.adata.obs[label_key] for s in site.sections if label_key in s.adata.obs]) if private else []
    report: dict[str, Any] = {"site": site.name, "sections": {}, "contingency": {}, "calibration": {}, "outputs": []}
    per_site: dict[str, list[metrics.Contingency]] = {}
    calibration: dict[str, list[CalibrationTable]] = {}
    final: list[np.ndarray] = []
    for section, (key, start, stop) in zip(site.sections, data.sections, strict=True):
        dom = labels[start:stop]
        if refine:
            local = neighbors[start:stop]
            dom = clustering.refine_labels(dom, np.where(local >= 0, local - start, -1))
        final.append(dom)
        conf = posterior[start:stop][np.arange(stop - start), dom]
        annotated = _annotated_copy(section.adata)
        annotated.obsm["X_fedspatial"] = z[start:stop]
        if before is not None:
            annotated.obsm["X_fedspatial_uncorrected"] = before[start:stop]
        annotated.obs["fedspatial_domain"] = pd.Categorical(dom.astype(str), categories=[str(i) for i in range(len(centroids))])
        annotated.obs["fedspatial_confidence"] = conf.astype(np.float32)
        annotated.uns["fedspatial_domain_colors"] = np.asarray(domain_palette(len(centroids)), dtype=object)
        annotated.uns["fedspatial"] = run_record(site.cfg, run_name, n_domains=len(centroids), refine=refine)
        path = annotated_path(out_dir, section)
        write_atomic(path, annotated.write_h5ad)
        entry: dict[str, Any] = {"site": section.site, "n_cells": int(stop - start), "output": str(path), **features_used(section, setup)}
        if not private:  # memory and scores are statistics of the cells outside the ledger
            entry["peak_rss_mb"] = peak_rss_mb()
        truth = section.adata.obs.get(label_key)
        if truth is not None and private:
            own = cell_labels[start:stop]
            per_site.setdefault(section.site, []).append(vocabulary_table(truth.to_numpy(), own, vocabulary, len(centroids)))
        elif truth is not None:
            entry.update(metrics.section_scores(truth.to_numpy(), dom))
            per_site.setdefault(section.site, []).append(metrics.contingency(truth.to_numpy(), dom))
            # the confidence as written (float32), per (bin, label, domain): see evaluation/calibration.py.
            # Not under local DP: a finer table than the contingency, outside the privacy ledger.
            table = calibration_table(truth.to_numpy(), dom, conf.astype(np.float32))
            calibration.setdefault(section.site, []).append(table)
        png = out_dir / f"{section.site}__{section.name}_domains.png"
        coords = np.asarray(section.adata.obsm[site.cfg.data.spatial_key])[:, :2]
        plot_section_domains(coords, dom, truth.to_numpy() if truth is not None else None, title=section.key, path=png,
                             n_domains=len(centroids))
        entry["plot"] = str(png)
        report["sections"][key] = entry
        report["outputs"] += [str(path), str(png)]
    merged_tables = {name: metrics.merge_contingency(tables) for name, tables in per_site.items()}
    domain_counts = np.bincount(cell_labels, minlength=len(centroids)).astype(np.int64)
    if private:  # one Gaussian mechanism over every table and the domain sizes, charged to the ledger
        merged_tables, domain_counts = private_tables(site, merged_tables, domain_counts)
        report["private-tables"] = "Gaussian mechanism, charged to the site's privacy ledger (dp-table)"
        ledger = site.ledger()  # the whole run's spend: every release is charged by now
        report["privacy"] = {"epsilon": ledger.epsilon, "delta": ledger.delta, "status": "exhausted" if ledger.refusals else "within budget"}
    for name, merged in merged_tables.items():
        report["contingency"][name] = {
            "labels": merged.labels, "domains": [int(d) for d in merged.domains], "counts": merged.counts.tolist(),
        }
        if name in calibration:
            report["calibration"][name] = merge_calibration_tables(calibration[name]).to_json()
    # the final (refined) domains, and the logits, stay at the site for the phases after this one
    kept = {"domains": np.concatenate(final).astype(np.int64), **({"logits": logits} if logits is not None else {})}
    site.state.put(DOMAINS_STATE, Payload(arrays=kept, config={"n-domains": len(centroids)}))
    logger.info("%s: wrote %d annotated sections to %s", site.name, len(site.sections), out_dir)
    return report, domain_counts


def run_record(cfg: ExperimentConfig, run_name: str, *, n_domains: int, refine: bool) -> dict[str, Any]:
    """``uns["fedspatial"]`` of an annotated section: ``run`` (the run's name as the user
    gave it), ``mode`` (federated, local or centralized), ``simulation`` (the Flower run's
    own name: the mode, or the site in local mode), ``version`` (fedspatial's),
    ``n_domains``, ``refine`` and ``config`` (the experiment config as a JSON string:
    ``json.loads(adata.uns["fedspatial"]["config"])``). Strings, numbers and bools only,
    which h5py writes."""
    from fedspatial import __version__

    sim = cfg.simulation
    return {
        "run": sim.simulated_run or run_name,
        "mode": sim.simulated_mode or "federated",
        "simulation": run_name if sim.simulated_mode else "",
        "version": __version__,
        "n_domains": int(n_domains),
        "refine": bool(refine),
        "config": json.dumps(cfg.to_dict(), sort_keys=False),
    }


def features_used(section: SiteSection, setup: SiteSetup) -> dict[str, int]:
    """The section's feature counts for the run report: ``n_features`` (in its file),
    ``n_features_shared`` (of those, in the federation's shared space, or in its own
    panel's when mapped from a small panel), ``n_features_used`` (model inputs)."""
    panel = setup.panel_of.get(section.key)
    space = next((s for pid, s, _ in setup.maps if pid == panel), setup.space) if panel else setup.space
    key = space.feature_key
    names = section.adata.var[key] if key and key in section.adata.var else section.adata.var_names
    own = set(map(str, names))
    return {
        "n_features": int(section.adata.n_vars),
        "n_features_shared": sum(f in own for f in space.shared),
        "n_features_used": sum(f in own for f in space.selected),
    }


def _annotated_copy(adata: ad.AnnData) -> ad.AnnData:
    """A new AnnData for the annotated output: its own obs, obsm and uns (what gets
    written to), the input's matrices shared read-only rather than copied (a 500,000-cell
    section's counts are GiBs)."""
    out = ad.AnnData(
        X=adata.X, obs=adata.obs.copy(), var=adata.var.copy(), uns=copy.deepcopy(dict(adata.uns)),
        obsm={k: v.copy() for k, v in adata.obsm.items()}, varm=dict(adata.varm.items()),
        layers=dict(adata.layers.items()), obsp=dict(adata.obsp.items()), varp=dict(adata.varp.items()),
    )
    if adata.raw is not None:
        out.raw = adata.raw.to_adata()
    return out


def annotated_path(out_dir: Path, section: SiteSection) -> Path:
    """Where a site writes a section's annotated copy."""
    return out_dir / f"{section.site}__{section.name}.h5ad"


def final_domains(site: Site) -> tuple[np.ndarray, int]:
    """``(int64 (n_cells,), K)``: the site's cells' final domains, sections in
    ``site.sections`` order, as ``finalize`` wrote them (it must have run)."""
    stored = site.state.get(DOMAINS_STATE)
    if stored is None:
        raise RuntimeError(f"{site.name}: no final domains yet; the finalize phase must run first")
    return stored.array("domains").astype(np.int64), int(stored.number("n-domains"))


def final_logits(site: Site) -> np.ndarray | None:
    """``float64 (n_cells, K)``: log weighted densities of the domain model at the site's
    cells (``None`` for a hard assignment, variance 0)."""
    stored = site.state.get(DOMAINS_STATE)
    return None if stored is None or "logits" not in stored.arrays else np.asarray(stored.array("logits"), dtype=np.float64)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (what a site's IT staff must provision;
    the process that served the site, so with other sites in the same process an upper bound)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak / 2**20 if sys.platform == "darwin" else peak / 1024)  # bytes on macOS, KiB on Linux
