"""Federated Harmony (Korsunsky et al. 2019) that reproduces ``harmonypy`` 2.1.0.

Each site holds the embeddings ``Z_s`` (cells x d) of its own cells and each cell's
batch, an integer code ``0..B-1`` that means the same batch at every site (a batch,
e.g. a section or a protocol, may span sites; a site may hold several). Harmony's
soft k-means with a diversity penalty and its ridge ("mixture of experts")
correction only ever need *sums over cells*, so the server runs the algorithm on
cluster-level aggregates and each site corrects its own cells:

=========  =================================  ===========================================
request    server sends                       a site replies (summed over its cells)
=========  =================================  ===========================================
counts     number of batches B                cells per batch, ``(B,)``
assign     centroids ``Y (K, d)``, sigma      ``O_kb = sum_{i in b} R_ki`` ``(K, B)``;
                                              k-means error and entropy terms (scalars)
pass       its cells' positions in this       per block, ``O`` of the block's cells
           pass's random block order          before the update ``(n_blocks, K, B)``
block      block index, log diversity         ``O`` of the block's cells after their
           penalty ``(K, B)``                 update ``(K, B)``; error, entropy (scalars)
ridge      (nothing)                          ``sum_{i in b} R_ki z_i`` ``(B, K, d)`` and
                                              ``sum_{i in b} R_ki`` ``(B, K)``
correct    correction directions              nothing, or the ``assign`` reply for the
           ``(B, K, d)``, centroids, sigma    next iteration
=========  =================================  ===========================================

Every reply has a shape fixed by ``B``, ``K``, ``d`` and the number of blocks per
pass (``ceil(1 / block_size)``), never by the number of cells, and the server only
needs the *sum over sites* of each reply, so the protocol also runs under secure
aggregation. Note that the per-block sums cover few cells (``block_size`` of the
pooled cells, split over sites and batches); without secure aggregation a block
sum from one site can be close to one cell's soft assignment, so prefer secure
aggregation or a larger ``block_size`` (which then no longer reproduces a given
harmonypy run) when the server is not trusted with that. The only cell-level
message goes from the server to a site: the positions of that site's own cells
in the block order, derived from cell counts (no data).

Exactness. harmonypy 2.1.0 runs a C++ backend (``harmonypy._harmony_cpp``; the
Python file only prepares arguments). Its arithmetic is reproduced step by step:

* cells are cosine-normalized for clustering; distances ``2 (1 - y.z)``;
  ``R = softmax(-dist / sigma)`` at the start of each Harmony iteration, with
  ``O`` and ``E = (sum_i R_ki) Pr_b`` rebuilt from it;
* each k-means pass shuffles the pooled cell indices with ``std::shuffle`` on a
  ``std::mt19937`` seeded with ``random_state`` and updates ``R`` block by block,
  taking the block out of ``O``/``E``, recomputing its cells with the penalty
  ``theta_b (log(2E + 1) - log(O + E + 1))``, then putting them back;
  ``ceil(1 / block_size)`` blocks of ``floor(N * block_size)`` cells (float32
  product), the last one taking the rest. The server reproduces libstdc++'s
  shuffle (Lemire's bounded integers, two swap positions per draw) over global
  cell indices (site offset + local index), which needs only the site sizes;
* the ridge step keeps, per cluster, the batches with ``O_kb / N_b >
  batch_prop_cutoff`` (a cluster with fewer than two is left alone), solves the
  (B+1) x (B+1) system by the same Schur complement, sets the cluster's centroid
  to the intercept and corrects ``Z_orig``; centroids are then normalized;
* the objective and both convergence rules (k-means window of 3, Harmony
  relative decrease) are the same.

harmonypy's initialization cannot be passed in, nor federated: it seeds each
centroid with an individual cell (K random cells, then per centroid the cell
minimizing ``-log(u) / |2 (1 - y.z)|`` for uniform ``u``), refined by 10 Lloyd
steps on the normalized cells. ``init_centroids`` (K x d) is passed instead
(production: federated k-means on cosine-normalized embeddings, see
:func:`federated_harmony`). harmonypy's initialization consumes ``K (N + 1)``
draws of the generator before the first shuffle; the server skips as many
(``skip_init_draws=True``) so that, given harmonypy's initial centroids (its
``Harmony.Y`` after ``max_iter_harmony=0``), the block orders are identical.
The remaining difference is precision: harmonypy computes in float32 (its ridge
sums in float64), this module in float64; on test data the corrected embeddings
agree to 1e-6 to 1e-5 (max abs). A convergence test that falls within float32
rounding of its threshold could stop at a different iteration (not observed).

Not supported (harmonypy options outside this module's use): several batch
variables at once, and ``max_iter_harmony=0`` (harmonypy then returns the
cosine-normalized input).

Server loop, one Flower round per request::

    server = FederatedHarmony(init_centroids, n_batches=B, n_sites=S)
    while (request := server.next_request()) is not None:
        replies = [send(site, request.for_site(s)) for s, site in enumerate(sites)]
        server.receive(replies)          # replies in site order

    # at each site:  reply = HarmonySite(Z, batches).handle(message)

With the defaults a Harmony iteration takes ``4 x (1 + 20) + 2`` rounds (the
block updates are sequential by design: each block sees the others' updates).

The code lives in modules by concern; this module holds the in-memory driver
(:func:`federated_harmony`, :func:`run_protocol`) and re-exports the public names
of the others, so ``from fedspatial.shared.algorithms.harmony import ...`` keeps
working:

* :mod:`~fedspatial.shared.algorithms.harmony_protocol`: request kinds and
  :class:`HarmonyRequest`;
* :mod:`~fedspatial.shared.algorithms.harmony_kernels`: the per-cell arithmetic
  (soft assignment, objective terms, penalized update, ridge sums, correction);
* :mod:`~fedspatial.shared.algorithms.harmony_site`: :class:`HarmonySite`;
* :mod:`~fedspatial.shared.algorithms.harmony_server`: :class:`FederatedHarmony`;
* :mod:`~fedspatial.shared.algorithms.harmony_block_order`: ``std::mt19937``,
  ``std::shuffle`` and the block boundaries;
* :mod:`~fedspatial.shared.algorithms.harmony_init`: initial centroids by federated
  k-means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedspatial.shared.algorithms.harmony_block_order import (
    StdMt19937,
    block_bounds,
    std_shuffle,
)
from fedspatial.shared.algorithms.harmony_init import (
    default_n_clusters,
    federated_init_centroids,
)
from fedspatial.shared.algorithms.harmony_kernels import (
    apply_correction,
    batch_sums,
    cosine_normalize,
    objective_terms,
    reassign_cells,
    ridge_sums,
    soft_assign,
)
from fedspatial.shared.algorithms.harmony_protocol import (
    ASSIGN,
    BLOCK,
    CORRECT,
    COUNTS,
    PASS,
    RIDGE,
    HarmonyRequest,
)
from fedspatial.shared.algorithms.harmony_server import FederatedHarmony
from fedspatial.shared.algorithms.harmony_site import HarmonySite

__all__ = [
    "ASSIGN",
    "BLOCK",
    "CORRECT",
    "COUNTS",
    "PASS",
    "RIDGE",
    "FederatedHarmony",
    "HarmonyRequest",
    "HarmonySite",
    "StdMt19937",
    "apply_correction",
    "batch_sums",
    "block_bounds",
    "cosine_normalize",
    "default_n_clusters",
    "federated_harmony",
    "federated_init_centroids",
    "objective_terms",
    "reassign_cells",
    "ridge_sums",
    "run_protocol",
    "soft_assign",
    "std_shuffle",
]


def run_protocol(server: FederatedHarmony, sites: Sequence[HarmonySite]) -> None:
    """Drive the protocol with in-memory sites until the server is done."""
    while (request := server.next_request()) is not None:
        server.receive([site.handle(request.for_site(s)) for s, site in enumerate(sites)])


def federated_harmony(
    site_Z: Sequence[np.ndarray],
    site_batches: Sequence[np.ndarray],
    *,
    init_centroids: np.ndarray | None = None,
    n_batches: int | None = None,
    nclust: int | None = None,
    **params: Any,
) -> list[np.ndarray]:
    """Run federated Harmony with sites as in-memory arrays (reference, local modes).

    Parameters
    ----------
    site_Z : Sequence[np.ndarray]
        Embeddings of each site (n_s x d).
    site_batches : Sequence[np.ndarray]
        Global batch code of each site's cells (n_s,).
    init_centroids : np.ndarray or None, default None
        Initial centroids (K x d); None runs :func:`federated_init_centroids` with
        ``nclust`` clusters.
    n_batches : int or None, default None
        B; None takes the largest code + 1.
    nclust : int or None, default None
        K when ``init_centroids`` is None; None is harmonypy's
        ``min(round(N / 30), 100)``.
    **params
        Keyword arguments of :class:`FederatedHarmony` (sigma, theta, lamb, alpha,
        tau, block_size, max_iter_harmony, max_iter_kmeans, epsilon_cluster,
        epsilon_harmony, batch_prop_cutoff, random_state, skip_init_draws).

    Returns
    -------
    list[np.ndarray]
        Corrected embeddings of each site, float64 (n_s x d).
    """
    if len(site_Z) != len(site_batches) or not site_Z:
        raise ValueError("need one batch vector per site, at least one site")
    sites = [HarmonySite(Z, b) for Z, b in zip(site_Z, site_batches, strict=True)]
    if n_batches is None:
        n_batches = 1 + max((int(s.batches.max()) for s in sites if s.n_cells), default=0)
    if init_centroids is None:
        n_cells = sum(s.n_cells for s in sites)
        k = nclust if nclust is not None else default_n_clusters(n_cells)
        init_centroids = federated_init_centroids(
            [s.Z_orig for s in sites], k, seed=int(params.get("random_state", 0))
        )
    elif nclust is not None and nclust != len(init_centroids):
        raise ValueError(f"nclust={nclust} but init_centroids has {len(init_centroids)} rows")
    server = FederatedHarmony(init_centroids, n_batches=n_batches, n_sites=len(sites), **params)
    run_protocol(server, sites)
    return [site.corrected for site in sites]
