"""Phase ``Harmony`` (with ``clustering.harmony``): federated Harmony batch correction of
the embeddings kept at the sites (:mod:`fedspatial.shared.algorithms.harmony`).

Sites only ever return sums over their cells (cluster x batch masses, R-weighted
embedding sums, k-means sums and counts); the only per-site message carries the
positions of that site's own cells in each pass's block order. The corrected embedding
replaces the site's embedding for the domain clustering that follows; the uncorrected
one is kept beside it.

Steps of ``query.harmony`` (``config["harmony-kind"]``), in the order the server sends them:

============  ==============================================  ==============================
step          the server sends                                the site replies
============  ==============================================  ==============================
load          batch mode (``section``/``site``), global       ``n_cells`` (it keeps its
              batch names                                     embedding and batch codes)
init-propose  K, seed                                         local k-means of its
                                                              cosine-normalized cells
init-stats    centroids (and previous ones)                   cluster sums and counts
counts ...    the Harmony protocol requests                   cluster-level sums
store         number of domains, seed                         k-means proposal of the
                                                              corrected embedding
============  ==============================================  ==============================

A site's Harmony state (:class:`HarmonySite`) lives in its :class:`SiteState` between
messages: Flower may route each message to a different process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.algorithms.harmony import (
    COUNTS,
    FederatedHarmony,
    HarmonyRequest,
    HarmonySite,
    cosine_normalize,
    default_n_clusters,
)
from fedspatial.shared.data.sections import SiteSection
from fedspatial.shared.phases.base import Federation, Phase, Run, Site, SiteState
from fedspatial.shared.phases.embedding import (
    EMBEDDING_KEY,
    UNCORRECTED,
    propose_domains,
    store_embedding,
)
from fedspatial.shared.phases.feature_space import batch_names
from fedspatial.shared.protocol.names import NUM_EXAMPLES, HarmonyStep, Query
from fedspatial.shared.protocol.payload import Payload

logger = logging.getLogger(__name__)

KIND_KEY = "harmony-kind"
SCALAR_PREFIX = "harmony-arg-"
"""Config prefix of a request's scalar arguments (``n_batches``, ``block``, ``reassign``)."""
STATE_KEY = "fedspatial-harmony"
BATCH_MODES = ("section", "site")
INIT_MAX_ITER = 10  # Lloyd rounds of the initialization (harmonypy refines its seeds with 10)
# Scalar replies travel as shape (1,); the protocol sums shape ().
_SCALAR_REPLIES = frozenset({"error", "entropy", "n_cells"})
# HarmonySite attributes kept in the state; the rest of its state is n_batches (config).
_ARRAYS = ("Z_orig", "batches", "corrected", "_sigma", "_R", "_dist", "_pass_cells", "_pass_starts")


class HarmonyPhase(Phase):
    name = "Harmony"
    queries = (Query.HARMONY,)

    def enabled(self, run: Run) -> bool:
        return run.cfg.clustering.harmony != "none"

    def run(self, fed: Federation, run: Run) -> None:
        c = run.cfg.clustering
        info = federated_harmony_rounds(
            fed, batches=batch_names(c.harmony, run), batch=c.harmony, seed=run.cfg.seed,
            n_clusters=c.harmony_clusters or None, n_domains=c.n_domains,
            theta=c.harmony_theta, sigma=c.harmony_sigma, max_iter_harmony=c.harmony_max_iter,
        )
        run.proposals = info.pop("proposals")
        run.report["harmony"] = {key: v for key, v in info.items() if key != "objective"}

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        reply = harmony_reply(site.sections, site.state, request)
        return Payload(arrays=reply, metrics={NUM_EXAMPLES: site.n_cells})


# ------------------------------------------------------------------- server half
class _Rounds:
    """Sends one kind of request to every site; every site must answer."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.order = list(fed.sites)
        self.count = 0

    def __call__(
        self,
        kind: str,
        arrays: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        settings = {**(config or {}), KIND_KEY: kind}
        payload: Payload | dict[str, Payload]
        if arrays is None or isinstance(arrays, Mapping):
            payload = Payload(arrays=dict(arrays or {}), config=settings)
        else:
            payload = {site: Payload(arrays=dict(a), config=settings) for site, a in zip(self.order, arrays, strict=True)}
        # Harmony's sums need every site's cells: no site can leave mid-protocol.
        replies = self.fed.ask(Query.HARMONY, payload, sites=self.order, require_all=True)
        self.count += 1
        out = []
        for site in self.order:
            values = dict(replies[site].arrays)
            for key in _SCALAR_REPLIES & values.keys():
                values[key] = values[key].reshape(())
            out.append(values)
        return out

    def request(self, request: HarmonyRequest) -> list[dict[str, np.ndarray]]:
        """One Harmony request: 0-d arrays travel as config scalars, the rest as arrays."""
        shared, scalars = _split(request.payload)
        if request.site_payloads is None:
            return self(request.kind, shared, scalars)
        per_site = []
        for site_payload in request.site_payloads:
            arrays, site_scalars = _split(site_payload)
            if site_scalars:
                raise ValueError(f"per-site scalars are not supported ({sorted(site_scalars)})")
            per_site.append({**shared, **arrays})
        return self(request.kind, per_site, scalars)


def _split(payload: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, scalars = {}, {}
    for key, value in payload.items():
        value = np.asarray(value)
        if value.ndim == 0:
            scalars[f"{SCALAR_PREFIX}{key}"] = value.item()
        else:
            arrays[key] = value
    return arrays, scalars


def init_centroids_rounds(send: _Rounds, n_clusters: int, *, seed: int, max_iter: int = INIT_MAX_ITER) -> np.ndarray:
    """Harmony's initial centroids: federated k-means on cosine-normalized embeddings
    (the arithmetic of :func:`~fedspatial.shared.algorithms.harmony.federated_init_centroids`)."""
    proposals = send(HarmonyStep.INIT_PROPOSE, config={"harmony-n-clusters": n_clusters, "harmony-seed": seed})
    proposals = [p for p in proposals if len(p.get("counts", ()))]  # sites without cells
    seeds = clustering.init_from_site_centroids(
        [p["centroids"] for p in proposals], [p["counts"] for p in proposals], n_clusters, seed=seed
    )
    kmeans = clustering.FederatedKMeans(max_iter=max_iter)
    kmeans.init(seeds)
    while not kmeans.done:
        payload = {"centroids": kmeans.centroids}
        if kmeans.previous_centroids is not None:
            payload["previous"] = kmeans.previous_centroids
        stats = [clustering.ClusterStats.from_arrays(r) for r in send(HarmonyStep.INIT_STATS, payload)]
        kmeans.step(clustering.merge_cluster_stats(stats))
    return kmeans.centroids


def federated_harmony_rounds(
    fed: Federation,
    *,
    batches: Sequence[str],
    batch: str = "section",
    seed: int = 0,
    n_clusters: int | None = None,
    n_domains: int = 0,
    init_centroids: np.ndarray | None = None,
    **harmony_params: Any,
) -> dict[str, Any]:
    """Correct the embeddings kept at the sites with federated Harmony.

    Parameters
    ----------
    fed : Federation
        The run's sites (every site that holds cells); the protocol orders them by name.
    batches : Sequence[str]
        The federation's batch names: sorted section keys (``site/section``) for
        ``batch="section"``, sorted site names for ``batch="site"``.
    batch : str, default "section"
        What a batch is: ``section`` or ``site``.
    seed : int, default 0
        Seed of the initialization's k-means and (unless given) Harmony's ``random_state``.
    n_clusters : int or None, default None
        Harmony's K; None is harmonypy's ``min(round(N / 30), 100)``.
    n_domains : int, default 0
        When > 0, ``store`` returns each site's k-means proposal of its corrected
        embedding with that many clusters (the ``query.embed`` reply format).
    init_centroids : np.ndarray or None, default None
        Harmony's initial centroids (K x d); None computes them by federated k-means.
    **harmony_params
        :class:`~fedspatial.shared.algorithms.harmony.FederatedHarmony` parameters.

    Returns
    -------
    dict[str, Any]
        ``iterations``, ``converged``, ``rounds`` (message rounds), ``init-rounds``,
        ``seconds``, ``n_clusters``, ``n_cells``, ``objective`` and ``proposals``
        (``{site: arrays}`` in site-name order; empty without ``n_domains``).
    """
    if not batches:
        raise ValueError("federated Harmony needs the federation's batch names")
    t0 = time.perf_counter()
    send = _Rounds(fed)
    sizes = send(HarmonyStep.LOAD, config={"harmony-batch": batch, "harmony-batches": list(batches)})
    n_cells = int(sum(int(s["n_cells"]) for s in sizes))
    if n_cells == 0:
        raise ValueError("the sites hold no cells for federated Harmony")
    if init_centroids is not None:
        init = np.asarray(init_centroids, dtype=np.float64)
        if n_clusters and n_clusters != len(init):
            raise ValueError(f"n_clusters={n_clusters} but init_centroids has {len(init)} rows")
        k = len(init)
    else:
        k = int(n_clusters) if n_clusters else default_n_clusters(n_cells)
        init = init_centroids_rounds(send, k, seed=seed)
    harmony_params.setdefault("random_state", seed)
    init_rounds = send.count
    server = FederatedHarmony(init, n_batches=len(batches), n_sites=len(send.order), **harmony_params)
    while (request := server.next_request()) is not None:
        server.receive(send.request(request))
    stored = send(HarmonyStep.STORE, config={"harmony-n-domains": int(n_domains), "harmony-seed": seed})
    seconds = time.perf_counter() - t0
    logger.info(
        "federated Harmony over %d %s batches: %d iteration(s), %s, %d rounds (%d for the initialization), %.1f s",
        len(batches), batch, server.n_iter, "converged" if server.converged else "not converged",
        send.count, init_rounds, seconds,
    )
    return {
        "iterations": server.n_iter,
        "converged": server.converged,
        "rounds": send.count,
        "init-rounds": init_rounds,
        "seconds": seconds,
        "n_clusters": k,
        "n_cells": n_cells,
        "objective": list(server.objective_harmony),
        "proposals": dict(zip(send.order, stored, strict=True)) if n_domains > 0 else {},
    }


# ------------------------------------------------------------------- site half
def save_harmony_site(state: SiteState, site: HarmonySite) -> None:
    arrays = {name.lstrip("_"): getattr(site, name) for name in _ARRAYS}
    state.put(STATE_KEY, Payload(arrays=arrays, config={"n-batches": int(site._n_batches)}))


def load_harmony_site(state: SiteState) -> HarmonySite:
    """The :class:`HarmonySite` :func:`save_harmony_site` kept, as it was."""
    stored = state.get(STATE_KEY)
    if stored is None:
        raise RuntimeError(
            "no federated Harmony state at this site: the server must start with the "
            f"{HarmonyStep.LOAD.value!r} step (the node may have restarted mid-run)"
        )
    site = HarmonySite(stored.array("Z_orig"), stored.array("batches"))
    for name in _ARRAYS:
        setattr(site, name, np.array(stored.array(name.lstrip("_")), copy=True))
    site._n_batches = int(stored.number("n-batches"))
    return site


def has_harmony_site(state: SiteState) -> bool:
    return state.get(STATE_KEY) is not None


def cell_batches(sections: Iterable[SiteSection], mode: str, names: Sequence[str]) -> np.ndarray:
    """Global batch code (index into ``names``) of every cell, sections concatenated
    in order; ``mode`` is ``section`` (a batch per section) or ``site``."""
    if mode not in BATCH_MODES:
        raise ValueError(f"Harmony batch must be one of {BATCH_MODES}, got {mode!r}")
    codes = {name: i for i, name in enumerate(names)}
    parts = []
    for section in sections:
        name = section.key if mode == "section" else section.site
        if name not in codes:
            raise ValueError(f"batch {name!r} of this site is not among the federation's batches {list(names)}")
        parts.append(np.full(int(section.adata.n_obs), codes[name], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _original_embedding(state: SiteState) -> np.ndarray:
    """The model's embedding: the uncorrected one when Harmony already ran (a repeated
    run starts over instead of correcting twice)."""
    stored = state.get(EMBEDDING_KEY)
    if stored is None:
        raise RuntimeError("no embedding at this site: the server must send query.embed before Harmony")
    z = stored.arrays.get(UNCORRECTED, stored.array("z"))
    return np.asarray(z, dtype=np.float64)


def harmony_reply(sections: Sequence[SiteSection], state: SiteState, request: Payload) -> dict[str, np.ndarray]:
    """Answer one ``query.harmony`` message with sums over this site's cells
    (``sections`` in the order of the embedding's rows)."""
    kind = request.string(KIND_KEY)
    if kind == HarmonyStep.LOAD:
        z = _original_embedding(state)
        batches = cell_batches(sections, request.string("harmony-batch", ""), request.strings("harmony-batches"))
        if batches.size != z.shape[0]:
            raise RuntimeError(f"the embedding has {z.shape[0]} rows but the sections {batches.size} cells")
        save_harmony_site(state, HarmonySite(z, batches))
        return {"n_cells": np.asarray(z.shape[0], dtype=np.int64)}
    if kind == HarmonyStep.INIT_PROPOSE:
        normalized = cosine_normalize(load_harmony_site(state).Z_orig)
        k = int(request.number("harmony-n-clusters"))
        centroids, counts = clustering.local_kmeans(normalized, k, seed=int(request.number("harmony-seed", 0)))
        return {"centroids": centroids, "counts": counts}
    if kind == HarmonyStep.INIT_STATS:
        normalized = cosine_normalize(load_harmony_site(state).Z_orig)
        return clustering.cluster_stats(
            normalized, request.array("centroids"), previous_centroids=request.arrays.get("previous")
        ).to_arrays()
    harmony = load_harmony_site(state)
    if kind == HarmonyStep.STORE:
        # The corrected embedding becomes the site's embedding; the Harmony state goes.
        store_embedding(state, harmony.corrected, uncorrected=harmony.Z_orig)
        state.delete(STATE_KEY)
        logger.info("federated Harmony: corrected embedding of %d cells stored", harmony.n_cells)
        n_domains = int(request.number("harmony-n-domains", 0))
        return propose_domains(harmony.corrected, n_domains, int(request.number("harmony-seed", 0))) if n_domains > 0 else {}
    if kind == COUNTS and harmony.n_cells == 0:
        raise RuntimeError("this site holds no cells for federated Harmony")
    arguments = {key[len(SCALAR_PREFIX):]: v for key, v in request.config.items() if key.startswith(SCALAR_PREFIX)}
    reply = harmony.handle({"kind": kind, **request.arrays, **arguments})
    save_harmony_site(state, harmony)
    return reply
