"""Server side of federated Harmony over Flower messages (``query.harmony``).

After ``query.embed`` every site holds its embedding; this phase corrects it for
batch effects (sections or sites) with the Harmony protocol of
:mod:`fedspatial.shared.algorithms.harmony`, one message round per request, and leaves the
corrected embedding at each site for the domain clustering that follows
(:mod:`fedspatial.client.harmony_state` is the site side). Sites only ever return
sums over their cells (cluster x batch masses, R-weighted embedding sums, k-means
sums and counts); the only per-site message carries the positions of that site's
own cells in each pass's block order.

Rounds: ``load`` (sites keep embedding and batch codes, report their size), the
initial centroids by federated k-means on cosine-normalized embeddings
(``init-propose``: local k-means proposals, seeded into K centroids; ``init-stats``:
at most 10 Lloyd rounds, as :func:`~fedspatial.shared.algorithms.harmony.federated_init_centroids`),
the Harmony requests, and ``store`` (the corrected embedding replaces the site's
embedding; sites propose k-means centroids of it for the domains).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedspatial.client.harmony_state import (
    INIT_PROPOSE,
    INIT_STATS,
    KIND_KEY,
    LOAD,
    SCALAR_PREFIX,
    STORE,
)
from fedspatial.client.payload import arrays_record, record_arrays
from fedspatial.server.messaging import SiteError, ask
from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.algorithms.harmony import (
    FederatedHarmony,
    HarmonyRequest,
    default_n_clusters,
)

logger = logging.getLogger(__name__)

INIT_MAX_ITER = 10  # Lloyd rounds of the initialization (harmonypy refines its seeds with 10)
# Scalar replies: arrays_record sends a 0-d array as shape (1,), the protocol sums shape ().
_SCALAR_REPLIES = frozenset({"error", "entropy", "n_cells"})


class _Rounds:
    """Sends one kind of request to every site, replies in site-name order."""

    def __init__(self, grid: Grid, nodes: Sequence[int], names: Mapping[int, str], common: Mapping[str, Any]) -> None:
        # A fixed order (site name) maps the protocol's site index to a node.
        self.order = sorted(nodes, key=lambda n: names.get(n, str(n)))
        self.grid, self.names, self.common = grid, names, common
        self.count = 0

    def __call__(
        self,
        kind: str,
        arrays: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        record: ArrayRecord | dict[int, ArrayRecord] | None
        if arrays is None or isinstance(arrays, Mapping):
            record = arrays_record(arrays) if arrays else None
        else:
            record = {node: arrays_record(a) for node, a in zip(self.order, arrays, strict=True)}
        replies = ask(
            self.grid, self.order, "harmony",
            config={**self.common, **(config or {}), KIND_KEY: kind},
            arrays=record, names=self.names,
        )
        self.count += 1
        missing = [self.names.get(n, f"node {n}") for n in self.order if n not in replies]
        if missing:
            # Harmony's sums need every site's cells: no site can leave mid-protocol.
            raise SiteError(
                f"federated Harmony ({kind}) lost site(s) {', '.join(missing)}: the protocol needs "
                "every site that holds cells; rerun the run (or turn clustering.harmony off)"
            )
        return [_reply_arrays(replies[n]) for n in self.order]

    def request(self, request: HarmonyRequest) -> list[dict[str, np.ndarray]]:
        """One Harmony request: 0-d arrays travel as config scalars, the rest as arrays."""
        shared, scalars = _split(request.payload)
        if request.site_payloads is None:
            return self(request.kind, shared, scalars)
        per_site = []
        for payload in request.site_payloads:
            arrays, site_scalars = _split(payload)
            if site_scalars:
                raise ValueError(f"per-site scalars are not supported ({sorted(site_scalars)})")
            per_site.append({**shared, **arrays})
        return self(request.kind, per_site, scalars)


def _reply_arrays(reply: Any) -> dict[str, np.ndarray]:
    arrays = record_arrays(reply["arrays"]) if "arrays" in reply else {}
    for key in _SCALAR_REPLIES & arrays.keys():
        arrays[key] = arrays[key].reshape(())
    return arrays


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
    """Harmony's initial centroids: federated k-means on cosine-normalized embeddings.

    Sites propose local k-means centroids, the server seeds K centroids from them and
    refines them with federated Lloyd rounds; the same arithmetic as
    :func:`~fedspatial.shared.algorithms.harmony.federated_init_centroids`.
    """
    proposals = send(INIT_PROPOSE, config={"harmony-n-clusters": n_clusters, "harmony-seed": seed})
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
        stats = [clustering.ClusterStats.from_arrays(r) for r in send(INIT_STATS, payload)]
        kmeans.step(clustering.merge_cluster_stats(stats))
    return kmeans.centroids


def federated_harmony_rounds(
    grid: Grid,
    nodes: Sequence[int],
    names: Mapping[int, str],
    common: Mapping[str, Any],
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
    grid : Grid
        The run's grid (a :class:`~fedspatial.server.messaging.SiteGroup`).
    nodes : Sequence[int]
        The sites taking part (every site that holds cells).
    names : Mapping[int, str]
        Site name of each node; the protocol orders sites by name.
    common : Mapping[str, Any]
        Config entries every message carries (``run-config``).
    batches : Sequence[str]
        The federation's batch names: sorted section keys (``site/section``) for
        ``batch="section"``, sorted site names for ``batch="site"``.
    batch : str, default "section"
        What a batch is: ``section`` or ``site``.
    seed : int, default 0
        Seed of the initialization's k-means and (unless given) Harmony's
        ``random_state`` (block order).
    n_clusters : int or None, default None
        Harmony's K; None is harmonypy's ``min(round(N / 30), 100)``.
    n_domains : int, default 0
        When > 0, the ``store`` step returns each site's k-means proposal of its
        corrected embedding with that many clusters (the ``query.embed`` reply format),
        to initialize the domain clustering from corrected embeddings.
    init_centroids : np.ndarray or None, default None
        Harmony's initial centroids (K x d); None computes them by federated k-means
        (e.g. given harmonypy's own initialization, the result equals harmonypy's).
    **harmony_params
        :class:`~fedspatial.shared.algorithms.harmony.FederatedHarmony` parameters (theta, sigma,
        lamb, max_iter_harmony, ...).

    Returns
    -------
    dict[str, Any]
        ``iterations``, ``converged``, ``rounds`` (message rounds), ``seconds``,
        ``n_clusters``, ``n_cells``, ``objective`` (Harmony objective per iteration)
        and ``proposals`` (``{node: arrays}`` in site-name order; empty without
        ``n_domains``).
    """
    if not batches:
        raise ValueError("federated Harmony needs the federation's batch names")
    t0 = time.perf_counter()
    send = _Rounds(grid, nodes, names, common)
    sizes = send(LOAD, config={"harmony-batch": batch, "harmony-batches": list(batches)})
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
    stored = send(STORE, config={"harmony-n-domains": int(n_domains), "harmony-seed": seed})
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
        "proposals": {node: arrays for node, arrays in zip(send.order, stored, strict=True)} if n_domains > 0 else {},
    }
