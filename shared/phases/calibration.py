"""Phase ``calibration``: how well ``obs["fedspatial_confidence"]`` is calibrated where
the sites hold labels, and a label-free recalibration everywhere.

1. Measured (server only): ``finalize`` returned, per site, labelled cells counted per
   (confidence bin, label, domain) with their summed confidence (no cell); the server adds
   them, matches domains to labels one-to-one and reports the expected calibration error,
   the reliability curve and the coverage above 0.9 (equal to the pooled computation).
2. Recalibrated without labels, ``query.calibration``: ``loss`` — each site returns, for
   every candidate temperature, the cross-entropy of its cells' tempered posteriors
   against their spatial neighbours' final domains (one number per temperature); the
   server keeps the temperature of the lowest summed loss. ``store`` — each site writes
   ``obs["fedspatial_confidence_calibrated"]`` (the tempered posterior of the final
   domain) and ``uns["fedspatial"]["confidence_temperature"]`` into its annotated
   sections, and returns the same binned tables for the recalibrated confidence.

``metrics.json: calibration`` holds ``before``/``after`` and the temperature;
``reliability.png`` draws both. Under ``privacy.local-dp`` the temperature is not fitted
(its loss sums are not covered by the privacy ledger) and a site refuses the query.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from fedspatial.shared.evaluation.calibration import (
    TEMPERATURES,
    CalibrationTable,
    calibration_report,
    calibration_table,
    fit_temperature,
    merge_calibration_tables,
    neighbour_loss,
    tempered_confidence,
)
from fedspatial.shared.phases.base import Federation, Phase, Run, Site
from fedspatial.shared.phases.finalize import annotated_path, final_domains, final_logits
from fedspatial.shared.plots import plot_reliability
from fedspatial.shared.protocol.names import NUM_EXAMPLES, STAGE, CalibrationStage, Query
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.storage.atomic import write_atomic

logger = logging.getLogger(__name__)

PLOT_NAME = "reliability.png"
COLUMN = "fedspatial_confidence_calibrated"
LOCAL_DP_REFUSAL = (
    "the label-free temperature needs loss sums over every cell, which the privacy ledger does not "
    "cover; not fitted under privacy.local-dp"
)


class CalibrationPhase(Phase):
    name = "calibration"
    queries = (Query.CALIBRATION,)
    rides_with = "finalize"  # the loss needs only the final domains

    @staticmethod
    def loss_request() -> Payload:
        return Payload(config={STAGE: CalibrationStage.LOSS, "temperatures": TEMPERATURES.tolist()})

    def early_requests(self, run: Run) -> list[tuple[str, Payload]]:
        return [] if run.cfg.privacy.local_dp else [(Query.CALIBRATION, self.loss_request())]

    def run(self, fed: Federation, run: Run) -> None:
        out: dict[str, Any] = {}
        before = _measure(CalibrationTable.from_json(raw) for rep in run.site_reports for raw in rep.get("calibration", {}).values())
        if before is not None:
            out["before"] = before
        if run.cfg.privacy.local_dp:
            logger.warning("confidence recalibration skipped: %s", LOCAL_DP_REFUSAL)
            out["temperature-skipped"] = LOCAL_DP_REFUSAL
        else:
            replies = fed.ask(Query.CALIBRATION, self.loss_request(), require_all=True)  # a sum needs every site
            losses = [r.array("loss") for r in replies.values() if "loss" in r.arrays]
            if losses:  # none when the domains are a hard assignment (variance 0)
                temperature = fit_temperature(np.sum(losses, axis=0))
                stored = fed.ask(Query.CALIBRATION, Payload(config={STAGE: CalibrationStage.STORE, "temperature": temperature}))
                out["temperature"] = temperature
                after = _measure(CalibrationTable.from_json(raw) for r in stored.values()
                                 for raw in json.loads(r.string("calibration", "{}")).values())
                if after is not None:
                    out["after"] = after
        if not out:
            return
        curves = {name: out[key]["bins"] for key, name in (("before", "posterior"), ("after", "recalibrated")) if key in out}
        if curves:
            eces = ", ".join(f"{key} {out[key]['ece']:.3f}" for key in ("before", "after") if key in out)
            plot_reliability(curves, path=run.folder / PLOT_NAME, title=f"domain confidence: ECE {eces}")
            out["files"] = [PLOT_NAME]
        run.report["calibration"] = out
        for key in ("before", "after"):
            if key in out:
                r = out[key]
                logger.info(
                    "confidence calibration %s: ECE %.3f, accuracy %.3f, mean confidence %.3f; %.1f%% of cells "
                    "above 0.9 (accuracy %.3f)", key, r["ece"], r["accuracy"], r["mean_confidence"],
                    100 * r["coverage_above_0.9"], r["accuracy_above_0.9"],
                )

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        if site.cfg.privacy.local_dp:  # the site's own check, whatever the server asks
            raise PermissionError(f"{site.name}: {LOCAL_DP_REFUSAL}")
        domains, _ = final_domains(site)
        logits = final_logits(site)
        if logits is None:
            return Payload(metrics={NUM_EXAMPLES: site.n_cells})
        if request.string(STAGE) == CalibrationStage.LOSS:
            neighbors = site.graph_data(site.setup()).neighbors.numpy()
            temperatures = np.asarray(request.config["temperatures"], dtype=np.float64)
            loss, pairs = neighbour_loss(logits, domains, neighbors, temperatures)
            return Payload(arrays={"loss": loss}, metrics={NUM_EXAMPLES: site.n_cells, "pairs": pairs})
        tables = store_calibrated(site, tempered_confidence(logits, domains, request.number("temperature")),
                                  domains, request.number("temperature"))
        return Payload(config={"calibration": json.dumps(tables)}, metrics={NUM_EXAMPLES: site.n_cells})


def _measure(tables: Iterable[CalibrationTable]) -> dict[str, Any] | None:
    tables = list(tables)
    if not tables:
        return None
    report = calibration_report(merge_calibration_tables(tables))
    return report if report["n_cells"] else None


def store_calibrated(site: Site, confidence: np.ndarray, domains: np.ndarray, temperature: float) -> dict[str, Any]:
    """Write the recalibrated confidence into the site's annotated sections; returns the
    binned label tables (per site name) where labels exist."""
    import anndata as ad

    bounds = np.cumsum([s.adata.n_obs for s in site.sections])[:-1]
    tables: dict[str, list[CalibrationTable]] = {}
    for section, conf, dom in zip(site.sections, np.split(confidence, bounds), np.split(domains, bounds), strict=True):
        path = annotated_path(site.output_dir, section)
        annotated = ad.read_h5ad(path)
        annotated.obs[COLUMN] = conf.astype(np.float32)
        annotated.uns["fedspatial"] = {**annotated.uns.get("fedspatial", {}), "confidence_temperature": float(temperature)}
        write_atomic(path, annotated.write_h5ad)
        truth = section.adata.obs.get(site.cfg.data.label_key)
        if truth is not None:
            tables.setdefault(section.site, []).append(calibration_table(truth.to_numpy(), dom, conf.astype(np.float32)))
    return {name: merge_calibration_tables(t).to_json() for name, t in tables.items()}
