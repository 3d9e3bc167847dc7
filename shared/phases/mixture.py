"""Phase ``mixture`` (with ``clustering.mixture``): a federated Gaussian mixture fitted to
the embeddings kept at the sites, from the k-means result and every other clustering
start, side by side in the same messages (one round per EM iteration); the start with
the highest log-likelihood is kept (scikit-learn's ``n_init`` rule). Sites return
E-step sums only (:mod:`fedspatial.shared.algorithms.mixture`)."""

from __future__ import annotations

import logging

import numpy as np

from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.algorithms.mixture import (
    FederatedGaussianMixture,
    MixtureParams,
    MixtureStats,
    merge_mixture_stats,
    site_mixture_stats,
)
from fedspatial.shared.phases.base import DomainModel, Federation, Phase, Run, Site
from fedspatial.shared.phases.embedding import embedding_of
from fedspatial.shared.protocol.names import NUM_EXAMPLES, Query
from fedspatial.shared.protocol.payload import Payload, chain_arrays, split_chains

logger = logging.getLogger(__name__)


class MixturePhase(Phase):
    name = "mixture"
    queries = (Query.MIXTURE,)

    def enabled(self, run: Run) -> bool:
        return run.cfg.clustering.mixture != "none"

    def run(self, fed: Federation, run: Run) -> None:
        c = run.cfg.clustering
        chains = [FederatedGaussianMixture(covariance_type=c.mixture, max_iter=c.mixture_max_iter) for _ in run.kmeans_starts]
        config = {"covariance-type": c.mixture}

        def merged(arrays: dict[int, dict[str, np.ndarray]]) -> dict[int, MixtureStats]:
            replies = fed.ask(Query.MIXTURE, Payload(arrays=chain_arrays(arrays), config=config))  # type: ignore[arg-type]
            per_site = [split_chains(r.arrays) for r in replies.values()]
            return {i: merge_mixture_stats([MixtureStats.from_arrays(s[i]) for s in per_site]) for i in arrays}

        starts = {i: {"centroids": centroids} for i, centroids in enumerate(run.kmeans_starts)}
        params = {i: chains[i].init(stats) for i, stats in merged(starts).items()}
        while not all(em.done for em in chains):
            active = {i: params[i].to_arrays() for i, em in enumerate(chains) if not em.done}
            for i, stats in merged(active).items():
                params[i] = chains[i].step(stats)
        best = max(range(len(chains)), key=lambda i: chains[i].lower_bound)
        em = chains[best]
        logger.info(
            "federated Gaussian mixture (%s): start %d of %d kept (mean log-likelihood %.4f; all: %s), %d EM iterations, %s",
            c.mixture, best + 1, len(chains), em.lower_bound,
            ", ".join(f"{m.lower_bound:.4f}" for m in chains), em.n_iter, "converged" if em.converged else "not converged",
        )
        assert run.domains is not None
        kept = params[best]
        run.domains = DomainModel(kept.means, run.domains.variance, {"centroids": kept.means, **kept.to_arrays()})
        likelihoods = [float(m.lower_bound) for m in chains]
        run.report.update({
            "mixture-iterations": max(m.n_iter for m in chains),
            "mixture-log-likelihoods": likelihoods,
            "mixture-start-kept": int(np.argmax(likelihoods)),
        })

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        z = embedding_of(site.state)
        covariance_type = request.string("covariance-type")
        replies = {}
        for i, arrays in split_chains(request.arrays).items():
            if "centroids" in arrays:  # the hard k-means assignment that starts EM
                labels, _ = clustering.assign_clusters(z, arrays["centroids"])
                stats = site_mixture_stats(z, labels=labels, n_components=len(arrays["centroids"]), covariance_type=covariance_type)
            else:
                stats = site_mixture_stats(z, MixtureParams.from_arrays(arrays, covariance_type))
            replies[i] = stats.to_arrays()
        return Payload(arrays=chain_arrays(replies), metrics={NUM_EXAMPLES: site.n_cells})
