"""Differentially private federated k-means on unit-length per-cell embeddings.

The privacy unit is one cell (added or removed). A site's release for one iteration is
the per-cluster statistics of its cells ``u_i`` (unit rows: :func:`unit_rows`) under the
centroids the server sent (clipped to norm <= 1 at the site: :func:`clip_rows`):

- ``sums`` ``[K, d]``: sum of the ``u_i`` nearest each centroid,
- ``counts`` ``[K]``: how many cells are nearest each centroid,
- ``sqdist`` ``[K]``: sum of ``||u_i - c_k||^2 / 4`` over those cells.

A cell's assignment depends on its own row and the centroids only, so adding or
removing one cell changes one row of ``sums`` by a vector of norm <= 1, one count by 1
and one ``sqdist`` by <= 1 (``||u - c|| <= 2`` when ``||u|| <= 1`` and ``||c|| <= 1``):
the release's joint L2 sensitivity is ``sqrt(3)`` (:data:`SENSITIVITY`). The Gaussian
mechanism adds ``N(0, (noise_multiplier * sqrt(3))^2)`` to every entry
(:func:`noisy_statistics`), which is one Gaussian mechanism of multiplier
``noise_multiplier`` for the ledger (Su et al. 2016's DP Lloyd; Google's DP k-means sums).

The server (:func:`fit_dp_kmeans`) does spherical k-means on the noisy sums: a
centroid is the *direction* of its cluster's noisy sum, unit length. That needs no
division by a noisy count, keeps every centroid it sends at norm 1 (the sensitivity
bound), and makes nearest-centroid assignment of the (unit) smoothed embeddings a
cosine assignment, the same at every site. Start: no cell may leave a site, so the
first :data:`START_RELEASES` releases over-cluster from public, data-free centres
(release 0: seeded directions on the sphere; release 1: seeded directions around
release 0's noisy overall mean, on the sphere at the radius that mean implies), and the
server reduces the reliable noisy centroids of both to ``k`` by weighted spherical
k-means++ / k-means (post-processing, free). Then DP Lloyd iterations, whose centroids
average the noisy sums of earlier iterations (:data:`MEMORY`) and which repair a
start's local optimum from the noisy statistics alone: a dead centroid splits the
largest cluster, and a merge-and-split move fires when it pays beyond the noise.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedspatial.shared.algorithms.kmeans_stats import assign_clusters

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_CENTROIDS_PER_DOMAIN",
    "OVERCLUSTER",
    "SENSITIVITY",
    "START_RELEASES",
    "DPClusterStats",
    "DPKMeansResult",
    "clip_rows",
    "cluster_statistics",
    "fit_dp_kmeans",
    "lloyd_update",
    "merge_statistics",
    "noisy_statistics",
    "public_centres",
    "reduce_centroids",
    "reliable_clusters",
    "split_largest",
    "spread_around",
    "start_from",
    "unit_rows",
]

SENSITIVITY = math.sqrt(3.0)
"""L2 sensitivity of one release (sums, counts, squared distances / 4) to one cell."""
START_RELEASES = 2
"""Releases of the over-clustered start (``privacy.budget.KMEANS_INIT_ITERATIONS``)."""
OVERCLUSTER = 4
"""Centroids of the start per domain (``OVERCLUSTER * n_domains``), at most."""
MAX_CENTROIDS_PER_DOMAIN = 4
"""A site refuses a request with more than this many centroids per domain."""
RELIABLE_STDS = 3.0
"""A cluster's noisy statistics are used when its count exceeds this many noise stds."""
DIRECTION_STDS = 2.0
"""... and its sum's norm this many times the norm of the noise on it (``std * sqrt(d)``)."""
GROUP_STDS = 3.0
"""Release 1 over-clusters only as far as groups of ``N / K'`` cells keep sums this many
times longer than their noise (``std * sqrt(d)``)."""
MEMORY = 0.5
"""A Lloyd centroid is the direction of ``S_t + MEMORY * S_{t-1} + MEMORY^2 ...``: the
sums of earlier releases (post-processing) average the noise once the clusters settle."""
MOVE_STDS = 4.0
"""Margin of a merge-and-split move over the noise on a cluster's statistics."""
SPLIT_STEP = 0.05
"""How far (chord) a split moves the two halves' centroids from the cluster's."""


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float64 ``[N, d]``: each row scaled to unit L2 length; all-zero rows stay zero."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array [N, d], got shape {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0)


def clip_rows(x: np.ndarray) -> np.ndarray:
    """float64 ``[K, d]``: each row scaled down to L2 norm <= 1 (shorter rows unchanged)."""
    arr = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, 1.0)


@dataclass
class DPClusterStats:
    """One release's per-cluster statistics (one site's, or merged over sites).

    Attributes
    ----------
    sums
        float64 ``[K, d]``: sum of the unit embeddings nearest each centroid.
    counts
        float64 ``[K]``: cells nearest each centroid.
    sqdist
        float64 ``[K]``: sum of ``||u - c||^2 / 4`` over those cells.
    noise_std
        Std of the Gaussian noise on every entry (0: exact statistics).
    """

    sums: np.ndarray
    counts: np.ndarray
    sqdist: np.ndarray
    noise_std: float = 0.0

    def vector(self) -> np.ndarray:
        """float64 ``[K (d + 2)]``: all entries (what the sensitivity bounds)."""
        return np.concatenate([self.sums.ravel(), self.counts, self.sqdist])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"sums": self.sums, "counts": self.counts, "sqdist": self.sqdist}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], noise_std: float = 0.0) -> DPClusterStats:
        sums = np.asarray(arrays["sums"], dtype=np.float64)
        counts = np.asarray(arrays["counts"], dtype=np.float64).reshape(-1)
        sqdist = np.asarray(arrays["sqdist"], dtype=np.float64).reshape(-1)
        if sums.ndim != 2 or sums.shape[0] != counts.shape[0] or sqdist.shape != counts.shape:
            raise ValueError(f"inconsistent shapes: sums {sums.shape}, counts {counts.shape}, sqdist {sqdist.shape}")
        return cls(sums, counts, sqdist, float(noise_std))


def cluster_statistics(embeddings: np.ndarray, centroids: np.ndarray) -> DPClusterStats:
    """Exact (pre-noise) statistics of a site's cells ``embeddings`` ``[N, d]`` under
    ``centroids`` ``[K, d]``. The rows are made unit length here (zero rows stay zero) and
    the centroids clipped to norm <= 1 (the server is not trusted to send them so),
    whatever the caller passes: the sensitivity bound holds for any input."""
    u = unit_rows(embeddings)
    c = clip_rows(centroids)
    if c.ndim != 2 or c.shape[1] != u.shape[1] or c.shape[0] == 0:
        raise ValueError(f"centroids must have shape (K>0, {u.shape[1]}), got {c.shape}")
    k, d = c.shape
    if u.shape[0] == 0:
        return DPClusterStats(np.zeros((k, d)), np.zeros(k), np.zeros(k))
    labels, sq = assign_clusters(u, c)
    sums = np.zeros((k, d))
    np.add.at(sums, labels, u)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    # min(., 1): float rounding must not push one cell's term past the bound
    sqdist = np.bincount(labels, weights=np.minimum(sq / 4.0, 1.0), minlength=k)
    return DPClusterStats(sums, counts, sqdist)


def noisy_statistics(
    stats: DPClusterStats, noise_multiplier: float, *, seed: int | None = None
) -> DPClusterStats:
    """The Gaussian mechanism: every entry plus ``N(0, (noise_multiplier * sqrt(3))^2)``.

    The noise comes from a secret seed (``os.urandom``) unless ``seed`` is given (tests).
    """
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(16), "little"))
    std = noise_multiplier * SENSITIVITY
    return DPClusterStats(
        stats.sums + rng.normal(0.0, std, size=stats.sums.shape),
        stats.counts + rng.normal(0.0, std, size=stats.counts.shape),
        stats.sqdist + rng.normal(0.0, std, size=stats.sqdist.shape),
        std,
    )


def merge_statistics(per_site: Sequence[DPClusterStats]) -> DPClusterStats:
    """Sum of the sites' releases (in the order given: site-name order); noise stds add
    in quadrature."""
    if not per_site:
        raise ValueError("no statistics to merge")
    first = per_site[0]
    if any(s.sums.shape != first.sums.shape for s in per_site):
        raise ValueError("sites replied with statistics of different shapes")
    return DPClusterStats(
        np.sum([s.sums for s in per_site], axis=0),
        np.sum([s.counts for s in per_site], axis=0),
        np.sum([s.sqdist for s in per_site], axis=0),
        float(np.sqrt(sum(s.noise_std**2 for s in per_site))),
    )


def reliable_clusters(stats: DPClusterStats) -> np.ndarray:
    """bool ``[K]``: clusters whose noisy count is above :data:`RELIABLE_STDS` noise stds
    and whose noisy sum is long enough to give a direction (:data:`DIRECTION_STDS`)."""
    d = stats.sums.shape[1]
    norms = np.linalg.norm(stats.sums, axis=1)
    return (stats.counts > RELIABLE_STDS * stats.noise_std) & (norms > DIRECTION_STDS * stats.noise_std * math.sqrt(d))


def lloyd_update(
    stats: DPClusterStats, previous: np.ndarray, memory: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical Lloyd step: ``(centroids [K, d] unit, kept [K] bool)``; a centroid is its
    noisy sum's direction (or of ``memory`` [K, d], the sums accumulated over iterations),
    or the previous centroid where the cluster is not reliable."""
    kept = ~reliable_clusters(stats)
    centroids = np.where(kept[:, None], previous, unit_rows(stats.sums if memory is None else memory))
    return unit_rows(centroids), kept


def public_centres(n: int, d: int, seed: int) -> np.ndarray:
    """float64 ``[n, d]`` unit directions spread over the sphere, from the seed alone:
    the farthest-point pick among ``20 n`` seeded random directions."""
    rng = np.random.default_rng([seed, 0xD9C5])
    pool = unit_rows(rng.standard_normal((20 * n, d)))
    chosen = [0]
    closest = pool @ pool[0]
    for _ in range(1, n):
        nxt = int(np.argmin(closest))
        chosen.append(nxt)
        closest = np.maximum(closest, pool @ pool[nxt])
    return pool[chosen]


def spread_around(mean: np.ndarray, n: int, seed: int) -> np.ndarray:
    """float64 ``[n, d]`` unit centres around the (noisy) mean of unit embeddings.

    ``m + r g_j`` with ``g_j`` seeded unit directions orthogonal to ``m`` and
    ``r = sqrt(1 - ||m||^2)``: for unit vectors ``E||u - m||^2 = 1 - ||m||^2``, so the
    centres sit on the sphere at the spread the data has around its mean, and a cell
    goes to the ``g_j`` its deviation from the mean points to most (random projections).
    """
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(m))
    if not math.isfinite(norm) or norm < 1e-9:
        return public_centres(n, m.shape[0], seed)
    m = m * min(1.0, 0.999 / norm) if norm > 0.999 else m
    r = math.sqrt(max(1.0 - float(m @ m), 0.0))
    axis = m / np.linalg.norm(m)
    g = public_centres(n, m.shape[0], seed + 1)
    g = unit_rows(g - np.outer(g @ axis, axis))
    return unit_rows(m + r * g)


def reduce_centroids(
    candidates: np.ndarray, weights: np.ndarray, k: int, *, seed: int, n_init: int = 10, max_iter: int = 100
) -> np.ndarray:
    """Weighted spherical k-means++ / k-means of unit candidates to ``k`` unit centres.

    ``candidates`` ``[M >= k, d]`` (made unit here), ``weights`` ``[M]`` (noisy counts,
    clipped at 0); ``n_init`` seedings, the best weighted cosine objective kept.
    Returns float64 ``[k, d]`` unit rows.
    """
    x = unit_rows(candidates)
    w = np.maximum(np.asarray(weights, dtype=np.float64).reshape(-1), 0.0)
    if x.shape[0] < k:
        raise ValueError(f"{x.shape[0]} candidates cannot give {k} centres")
    if w.sum() <= 0:
        w = np.ones_like(w)
    rng = np.random.default_rng([seed, 0x5EED])
    best, best_score = x[:k], -np.inf
    for _ in range(max(1, n_init)):
        centres = [x[rng.choice(len(x), p=w / w.sum())]]
        for _ in range(1, k):
            dist = np.maximum(0.0, 2.0 - 2.0 * np.max(x @ np.array(centres).T, axis=1))  # squared chord
            p = w * dist
            centres.append(x[rng.choice(len(x), p=p / p.sum())] if p.sum() > 0 else x[rng.integers(len(x))])
        c = np.array(centres)
        for _ in range(max_iter):
            labels = np.argmax(x @ c.T, axis=1)
            sums = np.zeros_like(c)
            np.add.at(sums, labels, w[:, None] * x)
            new = np.where((np.linalg.norm(sums, axis=1) > 0)[:, None], unit_rows(sums), c)
            if np.allclose(new, c):
                break
            c = new
        score = float((w * np.max(x @ c.T, axis=1)).sum())
        if score > best_score:
            best, best_score = c, score
    return best


def start_from(first: DPClusterStats, second: DPClusterStats, k: int, *, seed: int) -> np.ndarray:
    """float64 ``[k, d]`` unit: the over-clustered releases' reliable noisy centroids
    (:func:`reliable_clusters`), weighted by their noisy counts, reduced to ``k``
    (:func:`reduce_centroids`); the ``k`` longest noisy sums when fewer are reliable."""
    ok = np.concatenate([reliable_clusters(first), reliable_clusters(second)])
    sums = np.concatenate([first.sums, second.sums])
    counts = np.concatenate([first.counts, second.counts])
    if ok.sum() < k:
        ok = np.zeros_like(ok)
        ok[np.argsort(-np.linalg.norm(sums, axis=1), kind="stable")[:k]] = True
    logger.info("dp k-means: start reduces %d reliable of %d noisy centroids to %d", int(ok.sum()), len(ok), k)
    return reduce_centroids(sums[ok], counts[ok], k, seed=seed)


def _split(out: np.ndarray, source: int, target: int, rng: np.random.Generator) -> None:
    """In place: centroids ``source`` and ``target`` become ``c +- SPLIT_STEP g`` around
    ``c = out[source]``, ``g`` a random unit direction orthogonal to ``c``: a cut of that
    cluster along ``g``, which the next Lloyd steps turn as 2-means does."""
    c = out[source].copy()
    g = rng.standard_normal(c.shape[0])
    g -= (g @ c) * c
    g /= max(float(np.linalg.norm(g)), 1e-12)
    out[source], out[target] = c + SPLIT_STEP * g, c - SPLIT_STEP * g


def split_largest(
    centroids: np.ndarray, dead: np.ndarray, counts: np.ndarray, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Move each dead centroid to split the live cluster of largest noisy count (the
    likeliest merge of two domains; squared distances are too noisy to tell, for tight
    clusters).

    Returns
    -------
    centroids
        float64 ``[K, d]`` unit rows.
    moved
        bool ``[K]``: the centroids moved (dead ones and those split).
    """
    out = np.array(centroids, dtype=np.float64)
    moved = np.zeros(len(out), dtype=bool)
    rng = np.random.default_rng([seed, 0x5B17])
    order = [int(j) for j in np.argsort(-counts, kind="stable") if not dead[j]]
    for target, source in zip(np.flatnonzero(dead).tolist(), order, strict=False):
        _split(out, source, target, rng)
        moved[source] = moved[target] = True
    return unit_rows(out), moved


def merge_and_split(
    stats: DPClusterStats, centroids: np.ndarray, *, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """One merge-and-split move of spherical k-means when the noisy statistics favour it.

    The objective is the sum of cosines to the centroids, ``sum_k ||S_k||`` at the
    clusters' own directions. Merging clusters ``a, b`` loses ``||S_a|| + ||S_b|| -
    ||S_a + S_b||``; splitting a cluster ``c`` that holds two domains gains about
    ``n_c R - ||S_c||``, ``R`` the median resultant ratio ``||S_k|| / n_k`` of the other
    clusters (how tight a single domain is). The move (merge a pair, split a loose
    cluster with the freed centroid) is made for the pair and cluster whose gain most
    exceeds the loss plus :data:`MOVE_STDS` noise stds; ``None`` when none does.

    Returns
    -------
    (centroids [K, d] unit, moved [K] bool) or None
    """
    k = len(centroids)
    if k < 3 or not reliable_clusters(stats).all():
        return None
    norms = np.linalg.norm(stats.sums, axis=1)
    ratio = norms / np.maximum(stats.counts, 1.0)
    best: tuple[float, int, int, int] | None = None
    for c in range(k):
        others = [j for j in range(k) if j != c]
        gain = float(stats.counts[c] * np.median(ratio[others]) - norms[c])
        for a, b in itertools.combinations(others, 2):
            loss = float(norms[a] + norms[b] - np.linalg.norm(stats.sums[a] + stats.sums[b]))
            margin = gain - loss - MOVE_STDS * stats.noise_std
            if margin > 0 and (best is None or margin > best[0]):
                best = (margin, c, a, b)
    if best is None:
        return None
    _, c, a, b = best
    out = np.array(centroids, dtype=np.float64)
    out[a] = unit_rows((stats.sums[a] + stats.sums[b])[None, :])[0]
    _split(out, c, b, np.random.default_rng([seed, 0x3E27]))
    moved = np.zeros(k, dtype=bool)
    moved[a] = moved[b] = moved[c] = True
    return unit_rows(out), moved


@dataclass
class DPKMeansResult:
    """What :func:`fit_dp_kmeans` found.

    Attributes
    ----------
    centroids
        float64 ``[k, d]`` unit rows.
    variance
        Shared isotropic variance of the cells around their centroids (per dimension),
        from the last release's noisy squared distances.
    releases
        Releases asked of every site.
    history
        Per release: centroids sent, reliable clusters, centroids kept from before.
    """

    centroids: np.ndarray
    variance: float
    releases: int
    history: list[dict[str, int | float]] = field(default_factory=list)


Release = Callable[[np.ndarray, int], DPClusterStats]
"""``release(centroids [K, d], iteration) -> merged noisy statistics over all sites``."""


def fit_dp_kmeans(
    release: Release, *, k: int, dim: int, releases: int, seed: int, overcluster: int = OVERCLUSTER
) -> DPKMeansResult:
    """DP k-means: :data:`START_RELEASES` over-clustered releases, reduction, Lloyd.

    Parameters
    ----------
    release
        Asks every site for its noisy statistics under the centroids and returns their
        sum (:func:`merge_statistics`); called exactly ``releases`` times, iterations
        ``0 .. releases - 1``.
    k, dim
        Domains and embedding dimension.
    releases
        Site releases in all (the budget plan's ``cluster_releases``, > START_RELEASES).
    seed
        Public seed of the start's centres and of the reduction.
    overcluster
        Start centroids per domain.
    """
    if releases <= START_RELEASES:
        raise ValueError(f"DP k-means needs more than {START_RELEASES} releases, got {releases}")
    wide = max(k, overcluster * k)
    history: list[dict[str, int | float]] = []

    def ask(centroids: np.ndarray, iteration: int) -> DPClusterStats:
        stats = release(centroids, iteration)
        ok = reliable_clusters(stats)
        history.append({"iteration": iteration, "centroids": len(centroids), "reliable": int(ok.sum()),
                        "noise-std": stats.noise_std, "cells": float(stats.counts.sum())})
        return stats

    first = ask(public_centres(wide, dim, seed), 0)
    n_cells = max(float(first.counts.sum()), 1.0)
    # as many groups as keep their sums above the noise (the noise is public: std * sqrt(d))
    fit = int(n_cells / (GROUP_STDS * first.noise_std * math.sqrt(dim))) if first.noise_std > 0 else wide
    second = ask(spread_around(first.sums.sum(axis=0) / n_cells, min(wide, max(k, fit)), seed), 1)
    centroids = start_from(first, second, k, seed=seed)
    memory = np.zeros_like(centroids)
    stats = second
    for iteration in range(START_RELEASES, releases):
        stats = ask(centroids, iteration)
        memory = stats.sums + MEMORY * memory
        centroids, kept = lloyd_update(stats, centroids, memory)
        history[-1]["kept"] = int(kept.sum())
        memory[kept] = 0.0
        if kept.any() and releases - iteration > 2:  # two releases left at least to settle the split
            centroids, moved = split_largest(centroids, kept, stats.counts, seed=seed + iteration)
            memory[moved] = 0.0
            history[-1]["split"] = int(kept.sum())
        elif releases - iteration > 2 and (move := merge_and_split(stats, centroids, seed=seed + iteration)):
            centroids, moved = move
            memory[moved] = 0.0
            history[-1]["merge-split"] = 1
    # ||u - c||^2 summed over cells: 4 sqdist, for the centroids of the last release
    n = max(float(stats.counts.sum()), 1.0)
    variance = max(4.0 * float(stats.sqdist.sum()) / (n * dim), 1e-6)
    return DPKMeansResult(centroids, variance, releases, history)
