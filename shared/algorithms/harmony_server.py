"""The server's side of federated Harmony: merges the sites' sums and runs soft
k-means with the diversity penalty and the ridge correction on cluster-level
aggregates, one request at a time."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedspatial.shared.algorithms import harmony_protocol as protocol
from fedspatial.shared.algorithms.harmony_block_order import StdMt19937, block_bounds, std_shuffle
from fedspatial.shared.algorithms.harmony_kernels import cosine_normalize
from fedspatial.shared.algorithms.harmony_protocol import HarmonyRequest

logger = logging.getLogger(__name__)

_WINDOW = 3  # harmonypy's k-means convergence window


def _per_batch(
    values: float | Sequence[float] | np.ndarray, n_batches: int, name: str
) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        return np.repeat(arr, n_batches)
    if arr.size == n_batches:
        return arr
    raise ValueError(f"{name} must be one number or one per batch ({n_batches}), got {arr.size}")


def _ridge_penalties(
    lamb: float | Sequence[float] | np.ndarray | None, n_batches: int
) -> np.ndarray | None:
    """None (estimate from E) or the B+1 penalties, intercept first, as harmonypy."""
    if lamb is None:
        return None
    arr = np.asarray(lamb, dtype=np.float64).reshape(-1)
    if arr.size == 1 and arr[0] == -1:
        return None
    if arr.size != n_batches + 1:
        arr = np.concatenate([[0.0], _per_batch(arr, n_batches, "lamb")])
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError("lamb must be finite and not negative")
    return arr


def _objective_converged(old: float, new: float, epsilon: float) -> bool:
    """harmonypy's Harmony-level rule: a relative decrease in [0, epsilon)."""
    if not (math.isfinite(old) and math.isfinite(new)):
        return False
    if old == 0.0:
        return new == 0.0
    delta = (old - new) / abs(old)
    return 0.0 <= delta < epsilon


class FederatedHarmony:
    """Server side of federated Harmony, driven one request at a time.

    Call :meth:`next_request`, send ``request.for_site(s)`` to each site ``s``,
    pass the replies (in site order) to :meth:`receive`; repeat until
    :meth:`next_request` returns None. Parameters follow ``harmonypy.run_harmony``.

    Parameters
    ----------
    init_centroids : np.ndarray
        Initial centroids (K x d), normalized here; K is the number of clusters.
    n_batches : int
        Number of batches B (codes ``0..B-1``, global across sites).
    n_sites : int
        Number of sites (replies per request).
    sigma : float or array-like, default 0.1
        Soft k-means bandwidth, one value or one per cluster.
    theta : float or array-like, default 2.0
        Diversity penalty, one value or one per batch.
    lamb : float, array-like or None, default None
        Ridge penalty: one value, one per batch, or the intercept's then one per
        batch; None (or -1) estimates it per cluster as ``alpha * E``.
    alpha : float, default 0.2
        Factor of the estimated ridge penalty.
    tau : float, default 0.0
        Over-correction protection: ``theta *= 1 - exp(-(N_b / (K tau))^2)`` if > 0.
    block_size : float, default 0.05
        Fraction of the cells updated per block.
    max_iter_harmony : int, default 10
        Maximum Harmony iterations (clustering + correction), at least 1.
    max_iter_kmeans : int, default 4
        Maximum k-means passes per Harmony iteration.
    epsilon_cluster : float, default 1e-3
        k-means convergence threshold.
    epsilon_harmony : float, default 1e-2
        Harmony convergence threshold.
    batch_prop_cutoff : float, default 1e-5
        A cluster corrects a batch only if ``O_kb / N_b`` exceeds this.
    random_state : int, default 0
        Seed of the block order (harmonypy's ``random_state``).
    skip_init_draws : bool, default True
        Skip the ``K (N + 1)`` draws harmonypy's own initialization makes, so that
        the block orders equal harmonypy's for the same ``random_state``.
    """

    def __init__(
        self,
        init_centroids: np.ndarray,
        *,
        n_batches: int,
        n_sites: int,
        sigma: float | Sequence[float] | np.ndarray = 0.1,
        theta: float | Sequence[float] | np.ndarray = 2.0,
        lamb: float | Sequence[float] | np.ndarray | None = None,
        alpha: float = 0.2,
        tau: float = 0.0,
        block_size: float = 0.05,
        max_iter_harmony: int = 10,
        max_iter_kmeans: int = 4,
        epsilon_cluster: float = 1e-3,
        epsilon_harmony: float = 1e-2,
        batch_prop_cutoff: float = 1e-5,
        random_state: int = 0,
        skip_init_draws: bool = True,
    ) -> None:
        Y = np.asarray(init_centroids, dtype=np.float64)
        if Y.ndim != 2 or Y.shape[0] < 1 or not np.isfinite(Y).all():
            raise ValueError(f"init_centroids must be finite (K, d), got shape {Y.shape}")
        if n_batches < 1 or n_sites < 1:
            raise ValueError("n_batches and n_sites must be >= 1")
        if max_iter_harmony < 1 or max_iter_kmeans < 1:
            raise ValueError("max_iter_harmony and max_iter_kmeans must be >= 1")
        if not 0 < block_size <= 1:
            raise ValueError("block_size must be in (0, 1]")
        self.K, self.d = Y.shape
        self.n_batches, self.n_sites = int(n_batches), int(n_sites)
        self.centroids = cosine_normalize(Y)
        self.sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
        if self.sigma.size == 1:
            self.sigma = np.repeat(self.sigma, self.K)
        if self.sigma.size != self.K or (self.sigma <= 0).any():
            raise ValueError(f"sigma must be positive, one value or one per cluster ({self.K})")
        self._theta_in = _per_batch(theta, self.n_batches, "theta")
        self.lamb = _ridge_penalties(lamb, self.n_batches)
        self.alpha, self.tau = float(alpha), float(tau)
        if self.lamb is None and not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError("alpha must be finite and not negative")
        self.block_size = float(block_size)
        self.max_iter_harmony, self.max_iter_kmeans = int(max_iter_harmony), int(max_iter_kmeans)
        self.epsilon_cluster, self.epsilon_harmony = float(epsilon_cluster), float(epsilon_harmony)
        self.batch_prop_cutoff = float(batch_prop_cutoff)
        self.random_state, self.skip_init_draws = int(random_state), bool(skip_init_draws)

        self.objective_kmeans: list[float] = []
        self.objective_harmony: list[float] = []
        self.kmeans_rounds: list[int] = []
        self.n_iter = 0  # Harmony iterations finished
        self.converged = False
        self.n_requests = 0
        # Learned from the sites' counts (first request).
        self.N = 0
        self.site_sizes = np.zeros(0, dtype=np.int64)
        self.site_offsets = np.zeros(1, dtype=np.int64)
        self.batch_sizes = np.zeros(self.n_batches)
        self.Pr_b = np.zeros(self.n_batches)
        self.theta = self._theta_in.copy()
        # Cluster-level state: O (observed) and E (expected) batch mass per cluster.
        self.O = np.zeros((self.K, self.n_batches))
        self.E = np.zeros((self.K, self.n_batches))
        self._bounds = np.zeros(1, dtype=np.int64)
        self._block_before = np.zeros((0, self.K, self.n_batches))
        self._block = self._pass_index = 0
        self._error = self._entropy = 0.0
        self._more = True
        self._rng = StdMt19937(self.random_state)
        self._pending: HarmonyRequest | None = HarmonyRequest(
            protocol.COUNTS, {"n_batches": np.asarray(self.n_batches)}
        )

    # ------------------------------------------------------------------ public API
    @property
    def done(self) -> bool:
        return self._pending is None

    def next_request(self) -> HarmonyRequest | None:
        """The request to send now (the same until :meth:`receive`), None when done."""
        return self._pending

    def receive(self, replies: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Merge the sites' replies to the current request and advance.

        Parameters
        ----------
        replies : Sequence[Mapping[str, np.ndarray]]
            One reply per site, in site order.
        """
        if self._pending is None:
            raise RuntimeError("federated Harmony has finished")
        if len(replies) != self.n_sites:
            raise ValueError(f"expected {self.n_sites} replies, got {len(replies)}")
        kind = self._pending.kind
        self.n_requests += 1
        step = {
            protocol.COUNTS: self._on_counts,
            protocol.ASSIGN: self._on_assign,
            protocol.PASS: self._on_pass,
            protocol.BLOCK: self._on_block,
            protocol.RIDGE: self._on_ridge,
            protocol.CORRECT: self._on_correct,
        }[kind]
        self._pending = step(replies)

    # ------------------------------------------------------------------- merging
    def _sum(
        self, replies: Sequence[Mapping[str, np.ndarray]], key: str, shape: tuple
    ) -> np.ndarray:
        total = np.zeros(shape)
        for reply in replies:
            value = np.asarray(reply[key], dtype=np.float64)
            if value.shape != shape:
                raise ValueError(f"reply {key!r} has shape {value.shape}, expected {shape}")
            total += value
        return total

    def _assign_request(self, *, reassign: bool | None = None, **extra: np.ndarray) -> dict:
        payload = {"centroids": self.centroids.copy(), "sigma": self.sigma.copy(), **extra}
        if reassign is not None:
            payload["reassign"] = np.asarray(reassign)
        return payload

    def _on_counts(self, replies: Sequence[Mapping[str, np.ndarray]]) -> HarmonyRequest:
        per_site = [
            np.asarray(r["batch_counts"], dtype=np.float64).reshape(self.n_batches) for r in replies
        ]
        self.site_sizes = np.array([c.sum() for c in per_site], dtype=np.int64)
        self.site_offsets = np.concatenate([[0], np.cumsum(self.site_sizes)])
        self.batch_sizes = np.sum(per_site, axis=0)
        self.N = int(self.site_sizes.sum())
        if self.N == 0:
            raise ValueError("the sites hold no cells")
        self.Pr_b = self.batch_sizes / self.N
        self.theta = self._theta_in.copy()
        if self.tau > 0:
            self.theta *= 1 - np.exp(-((self.batch_sizes / (self.K * self.tau)) ** 2))
        self._bounds = block_bounds(self.N, self.block_size)
        if self.skip_init_draws:
            self._rng.discard(self.K * (self.N + 1))
        logger.info(
            "federated Harmony: %d cells at %d sites, %d batches, %d clusters, %d blocks per pass",
            self.N,
            self.n_sites,
            self.n_batches,
            self.K,
            self._bounds.size - 1,
        )
        return HarmonyRequest(protocol.ASSIGN, self._assign_request())

    def _start_iteration(self, replies: Sequence[Mapping[str, np.ndarray]]) -> None:
        """O, E (and the errors) from fresh soft assignments of every cell."""
        self.O = self._sum(replies, "O", (self.K, self.n_batches))
        self.E = np.outer(self.O.sum(axis=1), self.Pr_b)
        self._error = float(self._sum(replies, "error", ()))
        self._entropy = float(self._sum(replies, "entropy", ()))
        self._pass_index = 0

    def _on_assign(self, replies: Sequence[Mapping[str, np.ndarray]]) -> HarmonyRequest:
        self._start_iteration(replies)
        self._record_objective()
        self.objective_harmony.append(self.objective_kmeans[-1])
        return self._pass_request()

    def _pass_request(self) -> HarmonyRequest:
        order = std_shuffle(self._rng, self.N)
        block_of_position = np.searchsorted(self._bounds, np.arange(self.N), side="right") - 1
        n_blocks = self._bounds.size - 1
        payloads = []
        for s in range(self.n_sites):
            lo, hi = self.site_offsets[s], self.site_offsets[s + 1]
            mine = (order >= lo) & (order < hi)
            counts = np.bincount(block_of_position[mine], minlength=n_blocks)
            payloads.append(
                {
                    "cells": order[mine] - lo,
                    "block_starts": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                }
            )
        return HarmonyRequest(protocol.PASS, {}, tuple(payloads))

    def _on_pass(self, replies: Sequence[Mapping[str, np.ndarray]]) -> HarmonyRequest:
        n_blocks = self._bounds.size - 1
        self._block_before = self._sum(replies, "block_O", (n_blocks, self.K, self.n_batches))
        self._block = 0
        self._error = self._entropy = 0.0
        return self._block_request()

    def _block_request(self) -> HarmonyRequest:
        # Take the block's cells out of O and E, then freeze them for the update.
        removed = self._block_before[self._block]
        self.O -= removed
        self.E -= np.outer(removed.sum(axis=1), self.Pr_b)
        log_diversity = self.theta * (np.log(2 * self.E + 1) - np.log(self.O + self.E + 1))
        return HarmonyRequest(
            protocol.BLOCK, {"block": np.asarray(self._block), "log_diversity": log_diversity}
        )

    def _on_block(self, replies: Sequence[Mapping[str, np.ndarray]]) -> HarmonyRequest:
        added = self._sum(replies, "O", (self.K, self.n_batches))
        self.O += added
        self.E += np.outer(added.sum(axis=1), self.Pr_b)
        self._error += float(self._sum(replies, "error", ()))
        self._entropy += float(self._sum(replies, "entropy", ()))
        self._block += 1
        if self._block < self._bounds.size - 1:
            return self._block_request()
        return self._end_pass()

    def _end_pass(self) -> HarmonyRequest:
        self._record_objective()
        i = self._pass_index
        self._pass_index += 1
        finished = i > _WINDOW and self._kmeans_converged()
        if not finished and self._pass_index < self.max_iter_kmeans:
            return self._pass_request()
        self.kmeans_rounds.append(self._pass_index)
        self.objective_harmony.append(self.objective_kmeans[-1])
        return HarmonyRequest(protocol.RIDGE, {})

    def _record_objective(self) -> None:
        ratio = np.log((self.O + self.E + 1) / (2 * self.E + 1))
        cross = float((ratio * self.theta[None, :] * self.sigma[:, None] * self.O).sum())
        value = (self._error + self._entropy + cross) * 2000.0 / self.N
        self.objective_kmeans.append(value)

    def _kmeans_converged(self) -> bool:
        obj = self.objective_kmeans
        if len(obj) <= _WINDOW + 1:
            return False
        old = sum(obj[-2 - j] for j in range(_WINDOW))
        new = sum(obj[-1 - j] for j in range(_WINDOW))
        return abs(old - new) / abs(old) < self.epsilon_cluster

    def _on_ridge(self, replies: Sequence[Mapping[str, np.ndarray]]) -> HarmonyRequest:
        weighted = self._sum(replies, "RZ", (self.n_batches, self.K, self.d))
        mass = self._sum(replies, "R_sum", (self.n_batches, self.K))
        directions = np.zeros((self.n_batches, self.K, self.d))
        for k in range(self.K):
            self._solve_cluster(k, weighted, mass, directions)
        self.centroids = cosine_normalize(self.centroids)
        self.n_iter += 1
        self.converged = _objective_converged(
            self.objective_harmony[-2], self.objective_harmony[-1], self.epsilon_harmony
        )
        more = not self.converged and self.n_iter < self.max_iter_harmony
        self._more = more
        if not more:
            logger.info(
                "federated Harmony %s after %d iteration(s), %d requests",
                "converged" if self.converged else "stopped",
                self.n_iter,
                self.n_requests + 1,
            )
        return HarmonyRequest(
            protocol.CORRECT, self._assign_request(reassign=more, directions=directions)
        )

    def _on_correct(self, replies: Sequence[Mapping[str, np.ndarray]]) -> HarmonyRequest | None:
        if not self._more:
            return None
        # Next iteration: the sites re-assigned their corrected cells (no objective
        # is recorded here, as in harmonypy).
        self._start_iteration(replies)
        return self._pass_request()

    def _kept_batches(self, k: int) -> np.ndarray:
        """Batches cluster k corrects (none when fewer than two qualify)."""
        share = np.divide(
            self.O[k], self.batch_sizes, out=np.zeros(self.n_batches), where=self.batch_sizes > 0
        )
        keep = np.flatnonzero(share > self.batch_prop_cutoff)
        return keep if keep.size > 1 else keep[:0]

    def _solve_cluster(
        self, k: int, weighted: np.ndarray, mass: np.ndarray, directions: np.ndarray
    ) -> None:
        """Ridge regression of cluster k: new centroid and per-batch directions.

        The system ``[[sum o, o'], [o, diag(o + penalty)]] W = [sum rz; rz]`` is
        solved by eliminating the diagonal block (Schur complement), as harmonypy.
        """
        keep = self._kept_batches(k)
        if keep.size == 0:
            return  # harmonypy leaves such a cluster's centroid as it was
        o = mass[keep, k]
        rz = weighted[keep, k]
        if self.lamb is None:
            penalty = self.alpha * self.E[k, keep]
            intercept = 0.0
        else:
            penalty = self.lamb[1 + keep]
            intercept = self.lamb[0] if keep.size == self.n_batches else 0.0
        diag = o + penalty
        pivot_scale = o.sum() + intercept
        schur = pivot_scale - np.sum(o * o / diag)
        if not schur > 1e-10 * pivot_scale:
            raise ValueError(
                f"ridge system of cluster {k} is singular; lamb (or alpha) is zero or too small"
            )
        intercept_w = (rz.sum(axis=0) - ((o / diag)[:, None] * rz).sum(axis=0)) / schur
        self.centroids[k] = intercept_w
        directions[keep, k] = (rz - o[:, None] * intercept_w[None, :]) / diag[:, None]
