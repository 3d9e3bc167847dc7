"""Phase ``dp k-means``: the federation's domains under local DP (``privacy.local-dp``).

Every site release is a Gaussian mechanism on per-cluster statistics of the per-cell
embedding (``z-cell``, unit rows; :mod:`fedspatial.shared.algorithms.dp_kmeans` has the
sensitivity argument), with the noise multiplier of the site's own budget plan
(:func:`~fedspatial.shared.privacy.budget.budget_plan`: never anything in the request),
checked against and recorded in the site's privacy ledger before anything leaves. A site
releases exactly the plan's ``cluster_releases`` iterations, in order, once each; it
refuses any other (:class:`PrivacyBudgetExceeded`) and re-sends its last reply, free,
when the server repeats the same request (a lost reply).

The server runs :func:`~fedspatial.shared.algorithms.dp_kmeans.fit_dp_kmeans`: an
over-clustered start from public centres (2 releases), its reduction to
``clustering.n-domains`` on the server, then ``privacy.kmeans-iterations`` DP Lloyd
iterations. Centroids are unit length (spherical k-means); each site later assigns its
smoothed unit embedding ``z`` to them (``finalize``: nearest centroid = largest cosine).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from fedspatial.shared.algorithms.dp_kmeans import (
    MAX_CENTROIDS_PER_DOMAIN,
    SENSITIVITY,
    DPClusterStats,
    cluster_statistics,
    fit_dp_kmeans,
    merge_statistics,
    noisy_statistics,
)
from fedspatial.shared.phases.base import DomainModel, Federation, Phase, Run, Site
from fedspatial.shared.phases.embedding import per_cell_embedding_of
from fedspatial.shared.privacy.accounting import PrivacyBudgetExceeded
from fedspatial.shared.privacy.budget import KMEANS_INIT_ITERATIONS, budget_plan
from fedspatial.shared.privacy.ledger import PrivacyLedger, Release
from fedspatial.shared.protocol.names import NUM_EXAMPLES, Query
from fedspatial.shared.protocol.payload import Payload

logger = logging.getLogger(__name__)

KIND = "dp-kmeans"
"""Ledger kind of a DP k-means release."""
NOISE_STD = "noise-std"
"""Reply metric: std of the noise on every entry of the site's release (public)."""
ITERATION = "iteration"
"""Request config entry: which release of the plan (0-based) the server asks for."""
LAST_RELEASE = "dp-kmeans-last-release"
"""Site state key of the last reply, re-sent when the same request comes again."""


class DPKMeansPhase(Phase):
    name = "dp k-means"
    queries = (Query.DP_CLUSTER_STATS,)

    def enabled(self, run: Run) -> bool:
        return run.cfg.privacy.local_dp

    def run(self, fed: Federation, run: Run) -> None:
        k = run.cfg.clustering.n_domains
        dim = int(run.model_config.get("latent_dim") or run.cfg.model.latent_dim)
        releases = KMEANS_INIT_ITERATIONS + run.cfg.privacy.kmeans_iterations  # the sites' plan: public

        def release(centroids: np.ndarray, iteration: int) -> DPClusterStats:
            request = Payload(arrays={"centroids": centroids}, config={ITERATION: iteration})
            replies = fed.ask(Query.DP_CLUSTER_STATS, request, require_all=True)  # a sum needs every site
            return merge_statistics(
                [DPClusterStats.from_arrays(r.arrays, float(r.metrics.get(NOISE_STD, 0.0))) for r in replies.values()]
            )

        result = fit_dp_kmeans(release, k=k, dim=dim, releases=releases, seed=run.cfg.seed)
        run.domains = DomainModel(result.centroids, result.variance, {"centroids": result.centroids})
        run.kmeans_starts = [result.centroids]
        last = result.history[-1]
        run.report.update({
            "kmeans-iterations": run.cfg.privacy.kmeans_iterations,
            "dp-kmeans-releases": result.releases,
            "dp-kmeans-noise-std": float(last["noise-std"]),
            "dp-kmeans-variance": result.variance,
            "dp-kmeans-history": result.history,
        })
        logger.info(
            "dp k-means: %d releases per site, noise std %.3g per entry of the merged sums, %d of %d clusters reliable",
            result.releases, last["noise-std"], last["reliable"], k,
        )

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        return site_release(site, request)


def check_request(centroids: np.ndarray, iteration: float, *, dim: int, n_domains: int) -> int:
    """The request's iteration, after refusing (``ValueError``) centroids that are not a
    finite ``[K, dim]`` array with ``1 <= K <= 4 n_domains``, or an iteration that is not
    a non-negative integer (one beyond the plan is refused at the ledger)."""
    if centroids.ndim != 2 or centroids.shape[1] != dim:
        raise ValueError(f"dp k-means: centroids must have shape (K, {dim}) (the embedding's), got {centroids.shape}")
    limit = MAX_CENTROIDS_PER_DOMAIN * n_domains
    if not 1 <= centroids.shape[0] <= limit:
        raise ValueError(
            f"dp k-means: {centroids.shape[0]} centroids asked; this site answers 1 to {limit} "
            f"({MAX_CENTROIDS_PER_DOMAIN} x clustering.n-domains {n_domains})"
        )
    if not np.all(np.isfinite(centroids)):
        raise ValueError("dp k-means: centroids must be finite")
    if not (float(iteration).is_integer() and iteration >= 0):
        raise ValueError(f"dp k-means: iteration must be a non-negative integer, got {iteration}")
    return int(iteration)


def _refuse(ledger: PrivacyLedger, iteration: int, reason: str) -> PrivacyBudgetExceeded:
    """Record a refusal in the ledger (as :meth:`PrivacyLedger.check` does) and return the error."""
    if not any(r["round"] == iteration and r["kind"] == KIND for r in ledger.refusals):
        ledger.refusals.append({"round": iteration, "kind": KIND, "reason": reason, "time": time.time()})
    return PrivacyBudgetExceeded(reason)


def site_release(site: Site, request: Payload, *, seed: int | None = None) -> Payload:
    """A site's noisy statistics for one DP k-means iteration (charged to its ledger).

    ``seed`` fixes the noise (tests only); otherwise it is drawn from ``os.urandom``.
    """
    u = per_cell_embedding_of(site.state)
    centroids = np.asarray(request.array("centroids"), dtype=np.float64)
    plan = budget_plan(site.cfg.privacy)  # the site's own settings: the server is not trusted
    iteration = check_request(
        centroids, request.number(ITERATION), dim=u.shape[1], n_domains=site.cfg.clustering.n_domains
    )
    cached = site.state.get(LAST_RELEASE)
    if (cached is not None and int(cached.number(ITERATION)) == iteration
            and np.array_equal(cached.array("centroids"), centroids)):
        logger.info("%s: dp k-means iteration %d asked again; the same noisy reply re-sent", site.name, iteration)
        return Payload(arrays={k: v for k, v in cached.arrays.items() if k != "centroids"},
                       metrics={NUM_EXAMPLES: site.n_cells, NOISE_STD: cached.metrics[NOISE_STD]})
    sigma = plan.cluster_noise
    ledger = site.ledger()
    try:
        done = sum(r.kind == KIND for r in ledger.releases)
        if iteration < done:
            raise _refuse(ledger, iteration, (
                f"site {site.name} already released dp k-means iteration {iteration}; another release of it "
                "is not in the privacy budget plan; the site refuses"
            ))
        if iteration >= plan.cluster_releases or done >= plan.cluster_releases:
            raise _refuse(ledger, iteration, (
                f"privacy budget plan exhausted at site {site.name}: dp k-means release {iteration} asked after "
                f"{done} of the plan's {plan.cluster_releases}; the site refuses"
            ))
        if iteration > done:
            raise ValueError(f"dp k-means: iteration {iteration} asked before iteration {done} (releases go in order)")
        ledger.check(KIND, iteration, sigma, 1.0, 1)
    finally:
        site.save_ledger(ledger)
    stats = noisy_statistics(cluster_statistics(u, centroids), sigma, seed=seed)
    ledger.record(Release(KIND, iteration, sigma, 1.0, 1, details={
        "clusters": int(centroids.shape[0]), "dim": int(u.shape[1]), "sensitivity": SENSITIVITY,
        "noise-std": stats.noise_std, "of-plan": plan.cluster_releases,
    }))
    site.save_ledger(ledger)
    site.state.put(LAST_RELEASE, Payload(
        arrays={"centroids": centroids, **stats.to_arrays()}, config={ITERATION: iteration},
        metrics={NOISE_STD: stats.noise_std},
    ))
    logger.info("%s: dp k-means release %d of %d (noise multiplier %.3g, epsilon now %.3f)",
                site.name, iteration + 1, plan.cluster_releases, sigma, ledger.releases[-1].epsilon_after)
    return Payload(arrays=stats.to_arrays(), metrics={NUM_EXAMPLES: site.n_cells, NOISE_STD: stats.noise_std})

