"""Phase ``k-means``: federated k-means on the embeddings kept at the sites, so that
"domain 3" means the same at every site; the server only sees per-cluster sums.

Several starts run side by side in the same messages (scikit-learn's ``n_init``): start
0 is the k-means++ seeding of the sites' proposals with 10 tries, the others single
seedings. Without a mixture every start runs k-means and the lowest inertia is kept;
with one, only start 0 runs k-means and the mixture phase starts EM from every start.
"""

from __future__ import annotations

import logging

import numpy as np

from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.phases.base import DomainModel, Federation, Phase, Run, Site
from fedspatial.shared.phases.embedding import embedding_of
from fedspatial.shared.protocol.names import NUM_EXAMPLES, Query
from fedspatial.shared.protocol.payload import Payload, chain_arrays, split_chains

logger = logging.getLogger(__name__)


class KMeansPhase(Phase):
    name = "k-means"
    queries = (Query.CLUSTER_STATS,)

    def enabled(self, run: Run) -> bool:
        return not run.cfg.privacy.local_dp  # DP k-means instead (phases/dp_kmeans.py)

    def run(self, fed: Federation, run: Run) -> None:
        c, k = run.cfg.clustering, run.cfg.clustering.n_domains
        props = [run.proposals[site] for site in sorted(run.proposals)]  # site-name order: no reply-order effects
        centroids, counts = [p["centroids"] for p in props], [p["counts"] for p in props]
        inits = [
            clustering.init_from_site_centroids(centroids, counts, k, seed=run.cfg.seed + i, n_init=10 if i == 0 else 1)
            for i in range(c.n_init)
        ]
        moments = [clustering.FeatureMoments.from_arrays({m: p[f"moments-{m}"] for m in ("count", "mean", "m2")}) for p in props]
        feature_variance = clustering.pooled_feature_variance_from_sites(moments)
        chains = [
            clustering.FederatedKMeans(max_iter=c.kmeans_max_iter, tol=c.kmeans_tol)
            for _ in (inits if c.mixture == "none" else inits[:1])
        ]
        for chain, init in zip(chains, inits, strict=False):
            chain.init(init, feature_variance=feature_variance)

        def stats(payloads: dict[int, dict[str, np.ndarray]]) -> dict[int, clustering.ClusterStats]:
            replies = fed.ask(Query.CLUSTER_STATS, Payload(arrays=chain_arrays(payloads)))
            per_site = [split_chains(r.arrays) for r in replies.values()]
            return {i: clustering.merge_cluster_stats([clustering.ClusterStats.from_arrays(s[i]) for s in per_site]) for i in payloads}

        while not all(chain.done for chain in chains):
            payloads: dict[int, dict[str, np.ndarray]] = {}
            for i, chain in enumerate(chains):
                if not chain.done:
                    payloads[i] = {"centroids": chain.centroids}
                    if chain.previous_centroids is not None:
                        payloads[i]["previous"] = chain.previous_centroids
            for i, merged in stats(payloads).items():
                chains[i].step(merged)
        # Confidence uses the spread of the final assignment (one more stats round).
        finals = stats({i: {"centroids": chain.centroids} for i, chain in enumerate(chains)})
        best = min(finals, key=lambda i: finals[i].inertia)
        kmeans, final = chains[best], finals[best]
        if len(chains) > 1:
            logger.info(
                "federated k-means: start %d of %d kept (inertia %.6g; all: %s)",
                best + 1, len(chains), final.inertia, ", ".join(f"{finals[i].inertia:.6g}" for i in finals),
            )
        variance = clustering.shared_variance(final, kmeans.centroids.shape[1])
        run.domains = DomainModel(kmeans.centroids, variance, {"centroids": kmeans.centroids})
        run.kmeans_starts = [kmeans.centroids, *inits[1:]]
        run.report.update({
            "kmeans-iterations": kmeans.n_iter,
            "kmeans-inertias": [float(finals[i].inertia) for i in finals],
            "kmeans-inertia": final.inertia,
        })

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        z = embedding_of(site.state)
        replies = {
            i: clustering.cluster_stats(z, arrays["centroids"], previous_centroids=arrays.get("previous")).to_arrays()
            for i, arrays in split_chains(request.arrays).items()
        }
        return Payload(arrays=chain_arrays(replies), metrics={NUM_EXAMPLES: site.n_cells})
