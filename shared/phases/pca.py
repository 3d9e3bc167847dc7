"""Phase ``PCA`` (with ``features.n-pcs``): federated PCA of the standardized features
by subspace iteration; the model then trains on the principal components. With
``model.encoder: novae`` the same PCA starts the encoder's gene embeddings instead (one
row per input gene: its loadings on the leading axes, as ``novae``'s ``pca_init`` does
centrally) and the model keeps training on the genes.

Sites return column sums, ``D x r`` products and the ``r x r`` Rayleigh matrix of their
cells (:mod:`fedspatial.shared.algorithms.pca`), summed in site-name order with a seeded
start, so a resumed run recomputes the same basis instead of storing it.
"""

from __future__ import annotations

import logging

import numpy as np

from fedspatial.shared.algorithms.pca import (
    FederatedPCA,
    PCABasis,
    site_column_sums,
    site_power_product,
    site_rayleigh,
)
from fedspatial.shared.model_config import novae_embedding_size
from fedspatial.shared.phases.base import Federation, Phase, Run, Site
from fedspatial.shared.phases.feature_space import section_sites
from fedspatial.shared.phases.setup import store_pca
from fedspatial.shared.protocol.names import NUM_EXAMPLES, STAGE, PCAStage, Query
from fedspatial.shared.protocol.payload import Payload

logger = logging.getLogger(__name__)


class PCAPhase(Phase):
    name = "PCA"
    queries = (Query.PCA,)

    def enabled(self, run: Run) -> bool:
        return run.cfg.features.n_pcs > 0 or run.cfg.model.encoder == "novae"

    def run(self, fed: Federation, run: Run) -> None:
        assert run.plan is not None
        holders = section_sites(run)
        sites = sorted({holders[k] for k in run.plan.reference})
        novae = run.cfg.features.n_pcs == 0  # only the novae encoder enables the phase without n-pcs
        n_components = novae_embedding_size(run.cfg) if novae else run.cfg.features.n_pcs
        if novae and run.in_dim <= n_components:  # as novae's pca_init: too few genes, random start
            logger.warning("novae: %d input genes, not more than the %d-d gene embedding: no PCA start", run.in_dim, n_components)
            return
        pca = FederatedPCA(run.in_dim, n_components, seed=run.cfg.seed)

        def stage(name: PCAStage, arrays: dict[str, np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
            replies = fed.ask(Query.PCA, Payload(arrays=arrays or {}, config={STAGE: name.value}), sites=sites)
            return [r.arrays for r in replies.values() if r.arrays]

        sums = stage(PCAStage.SUMS)
        mean = pca.set_mean([s["sums"] for s in sums], [float(s["count"][0]) for s in sums])
        while pca.iterating:
            pca.step([r["product"] for r in stage(PCAStage.POWER, {"mean": mean, "basis": pca.basis})])
        basis = pca.finish([r["rayleigh"] for r in stage(PCAStage.RAYLEIGH, {"mean": mean, "basis": pca.basis})])
        if novae:
            run.gene_embedding = basis.components.T.astype(np.float32)
            logger.info("novae: gene embeddings start from %d federated principal axes of %d genes", n_components, run.in_dim)
            return
        stage(PCAStage.STORE, basis.to_arrays())
        n = pca.n_cells
        total = (sum(float(s["sumsq"][0]) for s in sums) - n * float(mean @ mean)) / (n - 1)
        kept = basis.explained_variance.sum() / max(total, 1e-12)
        logger.info("federated PCA: %d components of %d features (%.0f%% of the variance)", n_components, run.in_dim, 100 * kept)
        run.in_dim = n_components

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        stage = PCAStage(request.string(STAGE))
        setup = site.setup()
        if stage is PCAStage.STORE:
            store_pca(site.state, PCABasis.from_arrays(request.arrays))
            return Payload(metrics={NUM_EXAMPLES: site.prepare(site.setup())})  # project now: later rounds reuse it
        x = site.feature_graph_data(setup).x.numpy()
        if stage is PCAStage.SUMS:
            sums, count = site_column_sums(x)
            sumsq = float(np.square(x, dtype=np.float64).sum())
            reply = {"sums": sums, "count": np.array([count]), "sumsq": np.array([sumsq])}
        elif stage is PCAStage.POWER:
            reply = {"product": site_power_product(x, request.array("mean"), request.array("basis"))}
        else:
            reply = {"rayleigh": site_rayleigh(x, request.array("mean"), request.array("basis"))}
        return Payload(arrays=reply, metrics={NUM_EXAMPLES: site.n_cells})
