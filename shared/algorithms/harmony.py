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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedspatial.shared.algorithms.kmeans import (
    federated_kmeans,
    init_from_site_centroids,
    local_kmeans,
)

logger = logging.getLogger(__name__)

COUNTS = "counts"
ASSIGN = "assign"
PASS = "pass"
BLOCK = "block"
RIDGE = "ridge"
CORRECT = "correct"

_U32 = 1 << 32
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_WINDOW = 3  # harmonypy's k-means convergence window


# ------------------------------------------------------------ std::mt19937 + libstdc++
class StdMt19937:
    """``std::mt19937`` with the draws libstdc++ (GCC >= 11) makes from it.

    The generator is NumPy's MT19937 set to the state ``std::mt19937(seed)`` starts
    in (reference ``init_genrand`` seeding, which ``RandomState(seed)`` uses too).

    Parameters
    ----------
    seed : int, default 0
        Seed, reduced modulo 2**32 as ``std::mt19937`` does.
    """

    _CHUNK = 1 << 16
    # Draws examined at once by bounded(): small, since a rejection restarts the
    # vectorized step (rejections are frequent when ranges approach 2**32).
    _BOUNDED_CHUNK = 1 << 11

    def __init__(self, seed: int = 0) -> None:
        seeded = np.random.RandomState(int(seed) % _U32).get_state(legacy=False)
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": seeded["state"]}
        self._buffer = np.empty(0, dtype=np.uint64)
        self._pos = 0

    def _peek(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs (as uint64) without consuming them."""
        if self._pos + n > self._buffer.size:
            rest = self._buffer[self._pos :]
            fresh = self._bits.random_raw(max(n, self._CHUNK))
            self._buffer = np.concatenate([rest, fresh])
            self._pos = 0
        return self._buffer[self._pos : self._pos + n]

    def outputs(self, n: int) -> np.ndarray:
        """Consume and return the next ``n`` outputs, uint64 holding 32-bit values."""
        out = self._peek(n).copy()
        self._pos += n
        return out

    def discard(self, n: int) -> None:
        """Skip ``n`` outputs (``std::mt19937::discard``), in bounded memory."""
        while n > 0:
            step = min(n, self._CHUNK)
            self._peek(step)
            self._pos += step
            n -= step

    def bounded(self, ranges: np.ndarray) -> np.ndarray:
        """One draw in ``[0, r)`` per entry ``r`` of ``ranges``, in order.

        libstdc++'s ``uniform_int_distribution`` for a 32-bit generator: Lemire's
        multiply-shift with rejection of the biased low words.

        Parameters
        ----------
        ranges : np.ndarray
            Range sizes, each in ``[1, 2**32]``.

        Returns
        -------
        np.ndarray
            int64 draws, same length as ``ranges``.
        """
        ranges = np.asarray(ranges, dtype=np.uint64)
        out = np.empty(ranges.size, dtype=np.int64)
        start = 0
        while start < ranges.size:
            r = ranges[start : start + self._BOUNDED_CHUNK]
            product = self._peek(r.size) * r
            threshold = (np.uint64(_U32) - r) % r
            rejected = np.flatnonzero((product & _LOW32) < threshold)
            n_ok = r.size if rejected.size == 0 else int(rejected[0])
            out[start : start + n_ok] = (product[:n_ok] >> _SHIFT32).astype(np.int64)
            self._pos += n_ok
            start += n_ok
            if rejected.size:
                # The biased draw is rejected: redraw this one alone, then resume.
                out[start] = self._bounded_one(int(ranges[start]))
                start += 1
        return out

    def _bounded_one(self, r: int) -> int:
        threshold = (_U32 - r) % r
        while True:
            product = int(self.outputs(1)[0]) * r
            if product & 0xFFFFFFFF >= threshold:
                return product >> 32


def std_shuffle(rng: StdMt19937, n: int) -> np.ndarray:
    """``std::shuffle`` of ``0..n-1`` as libstdc++ does it with a 32-bit generator.

    When ``n * n`` fits the generator's range, libstdc++ draws one number per two
    elements and splits it into two swap positions; otherwise one per element.

    Parameters
    ----------
    rng : StdMt19937
        The generator (advanced in place).
    n : int
        Number of elements.

    Returns
    -------
    np.ndarray
        int64 permutation.
    """
    order = list(range(n))
    if n < 2:
        return np.asarray(order, dtype=np.int64)
    if (_U32 - 1) // n >= n:
        first = 1
        if n % 2 == 0:
            j = int(rng.bounded(np.array([2]))[0])
            order[1], order[j] = order[j], order[1]
            first = 2
        i = np.arange(first, n, 2, dtype=np.int64)
        draws = rng.bounded((i + 1) * (i + 2))
        for a, x in zip(i.tolist(), draws.tolist(), strict=True):
            p, q = divmod(x, a + 2)
            order[a], order[p] = order[p], order[a]
            order[a + 1], order[q] = order[q], order[a + 1]
    else:
        draws = rng.bounded(np.arange(2, n + 1, dtype=np.int64))
        for a, p in enumerate(draws.tolist(), start=1):
            order[a], order[p] = order[p], order[a]
    return np.asarray(order, dtype=np.int64)


def block_bounds(n_cells: int, block_size: float) -> np.ndarray:
    """Start of each block of a k-means pass, then ``n_cells`` (harmonypy's blocks).

    ``ceil(1 / block_size)`` blocks of ``floor(N * block_size)`` cells (at least 1,
    the product in float32 as in harmonypy); the last block takes the rest and
    blocks past the end are dropped.

    Parameters
    ----------
    n_cells : int
        Pooled number of cells N.
    block_size : float
        Fraction of cells per block.

    Returns
    -------
    np.ndarray
        int64, ``n_blocks + 1`` increasing offsets.
    """
    bs = np.float32(block_size)
    n_blocks = math.ceil(1.0 / float(bs))
    per_block = max(1, int(np.float32(n_cells) * bs))
    starts = [i * per_block for i in range(n_blocks) if i * per_block < n_cells]
    return np.asarray([*starts, n_cells], dtype=np.int64)


# ------------------------------------------------------------------------ site side
def cosine_normalize(Z: np.ndarray) -> np.ndarray:
    """Scale each row to unit L2 norm (rows of zeros stay zero).

    Parameters
    ----------
    Z : np.ndarray
        Embeddings (cells x d).

    Returns
    -------
    np.ndarray
        float64 copy with unit rows.
    """
    Z = np.asarray(Z, dtype=np.float64)
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    return np.divide(Z, norms, out=np.zeros_like(Z), where=norms > 0)


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def soft_assign(
    Z_corr: np.ndarray, centroids: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Soft cluster assignments without diversity penalty (start of an iteration).

    Parameters
    ----------
    Z_corr : np.ndarray
        Current (corrected) embeddings (n x d); cosine-normalized here.
    centroids : np.ndarray
        Unit centroids ``Y`` (K x d).
    sigma : np.ndarray
        Per-cluster bandwidths (K,).

    Returns
    -------
    R : np.ndarray
        Assignments (n x K), rows summing to 1.
    dist : np.ndarray
        Distances ``2 (1 - cos)`` (n x K), kept by the site for the pass updates.
    """
    dist = 2.0 * (1.0 - cosine_normalize(Z_corr) @ np.asarray(centroids, dtype=np.float64).T)
    return _softmax_rows(-dist / sigma), dist


def batch_sums(R: np.ndarray, batches: np.ndarray, n_batches: int) -> np.ndarray:
    """``O[k, b] = sum over cells i of batch b of R[i, k]``.

    Parameters
    ----------
    R : np.ndarray
        Assignments (n x K).
    batches : np.ndarray
        Batch code per cell (n,).
    n_batches : int
        B.

    Returns
    -------
    np.ndarray
        float64 (K, B).
    """
    K = R.shape[1]
    # One bincount over (batch, cluster) pairs: no n x B indicator matrix.
    pairs = (batches[:, None] * K + np.arange(K)).ravel()
    sums = np.bincount(
        pairs, weights=np.asarray(R, dtype=np.float64).ravel(), minlength=n_batches * K
    )
    return sums.reshape(n_batches, K).T


def objective_terms(R: np.ndarray, dist: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """A site's share of Harmony's objective: k-means error and entropy terms.

    Parameters
    ----------
    R : np.ndarray
        Assignments (n x K).
    dist : np.ndarray
        Distances (n x K).
    sigma : np.ndarray
        Per-cluster bandwidths (K,).

    Returns
    -------
    error : float
        ``sum R * dist``.
    entropy : float
        ``sum sigma_k R log R`` (0 log 0 = 0).
    """
    safe = np.where(R > 0, R, 1.0)
    return float((R * dist).sum()), float((sigma * (R * np.log(safe))).sum())


def reassign_cells(
    dist: np.ndarray, batches: np.ndarray, log_diversity: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """New assignments of a block's cells with the diversity penalty (O, E frozen).

    Parameters
    ----------
    dist : np.ndarray
        The cells' distances (m x K).
    batches : np.ndarray
        Their batch codes (m,).
    log_diversity : np.ndarray
        ``theta_b (log(2E + 1) - log(O + E + 1))`` (K x B), from the server.
    sigma : np.ndarray
        Per-cluster bandwidths (K,).

    Returns
    -------
    np.ndarray
        Assignments (m x K).
    """
    return _softmax_rows(-dist / sigma + log_diversity[:, batches].T)


def ridge_sums(
    Z_orig: np.ndarray, R: np.ndarray, batches: np.ndarray, n_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per batch and cluster, the R-weighted sums of the original embeddings.

    Parameters
    ----------
    Z_orig : np.ndarray
        Uncorrected embeddings (n x d).
    R : np.ndarray
        Assignments (n x K).
    batches : np.ndarray
        Batch code per cell (n,).
    n_batches : int
        B.

    Returns
    -------
    weighted : np.ndarray
        ``sum_{i in b} R_ik z_i``, float64 (B, K, d).
    mass : np.ndarray
        ``sum_{i in b} R_ik``, float64 (B, K).
    """
    K, d = R.shape[1], Z_orig.shape[1]
    weighted = np.zeros((n_batches, K, d))
    mass = np.zeros((n_batches, K))
    for b in np.unique(batches):
        cells = batches == b
        weighted[b] = R[cells].T @ Z_orig[cells]
        mass[b] = R[cells].sum(axis=0)
    return weighted, mass


def apply_correction(
    Z_orig: np.ndarray, R: np.ndarray, batches: np.ndarray, directions: np.ndarray
) -> np.ndarray:
    """``z_i - sum_k R_ik M[b_i, k]`` for every cell (the ridge correction).

    Parameters
    ----------
    Z_orig : np.ndarray
        Uncorrected embeddings (n x d).
    R : np.ndarray
        Assignments (n x K).
    batches : np.ndarray
        Batch code per cell (n,).
    directions : np.ndarray
        Per batch and cluster correction direction (B, K, d); zero where a
        cluster does not correct a batch.

    Returns
    -------
    np.ndarray
        Corrected embeddings (n x d).
    """
    corrected = np.array(Z_orig, dtype=np.float64, copy=True)
    for b in np.unique(batches):
        cells = batches == b
        corrected[cells] -= R[cells] @ directions[b]
    return corrected


def _scalar(value: float) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


class HarmonySite:
    """A site's side of federated Harmony: holds its cells, answers requests.

    Parameters
    ----------
    Z : np.ndarray
        The site's embeddings (n x d); never sent.
    batches : np.ndarray
        Global batch code of each cell (n,), integers in ``0..B-1``.

    Attributes
    ----------
    corrected : np.ndarray
        Current corrected embeddings (n x d); the result once the server is done.
    """

    def __init__(self, Z: np.ndarray, batches: np.ndarray) -> None:
        Z = np.asarray(Z, dtype=np.float64)
        batches = np.asarray(batches).reshape(-1)
        if Z.ndim != 2 or Z.shape[0] != batches.size:
            raise ValueError(f"Z {Z.shape} and batches ({batches.size},) do not match")
        if not np.isfinite(Z).all():
            raise ValueError("Z must be finite")
        if not np.issubdtype(batches.dtype, np.integer) or (batches.size and batches.min() < 0):
            raise ValueError("batches must be non-negative integer codes")
        self.Z_orig = Z
        self.batches = batches.astype(np.int64)
        self.corrected = Z.copy()
        self._n_batches = 0
        self._sigma = np.zeros(0)
        self._R = np.zeros((Z.shape[0], 0))
        self._dist = self._R
        self._pass_cells = np.zeros(0, dtype=np.int64)
        self._pass_starts = np.zeros(1, dtype=np.int64)

    @property
    def n_cells(self) -> int:
        return self.Z_orig.shape[0]

    def handle(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Answer one server request (``request["kind"]`` names it).

        Parameters
        ----------
        request : Mapping[str, Any]
            ``HarmonyRequest.for_site(...)`` of the server.

        Returns
        -------
        dict[str, np.ndarray]
            Cluster-level aggregates over this site's cells.
        """
        handlers = {
            COUNTS: self._counts,
            ASSIGN: self._assign,
            PASS: self._plan_pass,
            BLOCK: self._update_block,
            RIDGE: self._ridge,
            CORRECT: self._correct,
        }
        kind = str(request["kind"])
        if kind not in handlers:
            raise ValueError(f"unknown Harmony request {kind!r}")
        return handlers[kind](request)

    def _counts(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self._n_batches = int(request["n_batches"])
        if self.batches.size and self.batches.max() >= self._n_batches:
            raise ValueError(
                f"batch code {self.batches.max()} is out of range for {self._n_batches} batches"
            )
        counts = np.bincount(self.batches, minlength=self._n_batches).astype(np.float64)
        return {"batch_counts": counts}

    def _assign(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        centroids = np.asarray(request["centroids"], dtype=np.float64)
        if centroids.shape[1] != self.Z_orig.shape[1]:
            raise ValueError(
                f"centroids have {centroids.shape[1]} dimensions, embeddings {self.Z_orig.shape[1]}"
            )
        self._sigma = np.asarray(request["sigma"], dtype=np.float64)
        self._R, self._dist = soft_assign(self.corrected, centroids, self._sigma)
        error, entropy = objective_terms(self._R, self._dist, self._sigma)
        return {
            "O": batch_sums(self._R, self.batches, self._n_batches),
            "error": _scalar(error),
            "entropy": _scalar(entropy),
        }

    def _plan_pass(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        cells = np.asarray(request["cells"], dtype=np.int64)
        starts = np.asarray(request["block_starts"], dtype=np.int64)
        if cells.size != self.n_cells or starts[-1] != cells.size:
            raise ValueError("the pass must list each of this site's cells once")
        if not np.array_equal(np.sort(cells), np.arange(self.n_cells)):
            raise ValueError("the pass must list each of this site's cells once")
        self._pass_cells, self._pass_starts = cells, starts
        # Each block is taken out of O and E with its assignments as they are now:
        # a block's cells are not touched before their own block comes.
        K = self._R.shape[1]
        before = np.zeros((starts.size - 1, K, self._n_batches))
        for i in range(starts.size - 1):
            block = cells[starts[i] : starts[i + 1]]
            before[i] = batch_sums(self._R[block], self.batches[block], self._n_batches)
        return {"block_O": before}

    def _update_block(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        i = int(request["block"])
        block = self._pass_cells[self._pass_starts[i] : self._pass_starts[i + 1]]
        log_diversity = np.asarray(request["log_diversity"], dtype=np.float64)
        R_block = reassign_cells(self._dist[block], self.batches[block], log_diversity, self._sigma)
        self._R[block] = R_block
        error, entropy = objective_terms(R_block, self._dist[block], self._sigma)
        return {
            "O": batch_sums(R_block, self.batches[block], self._n_batches),
            "error": _scalar(error),
            "entropy": _scalar(entropy),
        }

    def _ridge(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        weighted, mass = ridge_sums(self.Z_orig, self._R, self.batches, self._n_batches)
        return {"RZ": weighted, "R_sum": mass}

    def _correct(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        directions = np.asarray(request["directions"], dtype=np.float64)
        self.corrected = apply_correction(self.Z_orig, self._R, self.batches, directions)
        if bool(request["reassign"]):
            return self._assign(request)
        return {}


# ---------------------------------------------------------------------- server side
@dataclass(frozen=True)
class HarmonyRequest:
    """One request to every site.

    Attributes
    ----------
    kind : str
        Request name (``counts``, ``assign``, ``pass``, ``block``, ``ridge``, ``correct``).
    payload : dict[str, np.ndarray]
        Arrays sent to every site.
    site_payloads : tuple[dict[str, np.ndarray], ...] or None, default None
        Arrays for each site (in site order), when the request differs per site.
    """

    kind: str
    payload: dict[str, np.ndarray] = field(default_factory=dict)
    site_payloads: tuple[dict[str, np.ndarray], ...] | None = None

    def for_site(self, site: int) -> dict[str, Any]:
        """The message for site ``site`` (0-based, in the order of the replies)."""
        message: dict[str, Any] = {"kind": self.kind, **self.payload}
        if self.site_payloads is not None:
            message.update(self.site_payloads[site])
        return message


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
            COUNTS, {"n_batches": np.asarray(self.n_batches)}
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
            COUNTS: self._on_counts,
            ASSIGN: self._on_assign,
            PASS: self._on_pass,
            BLOCK: self._on_block,
            RIDGE: self._on_ridge,
            CORRECT: self._on_correct,
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
        return HarmonyRequest(ASSIGN, self._assign_request())

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
        return HarmonyRequest(PASS, {}, tuple(payloads))

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
            BLOCK, {"block": np.asarray(self._block), "log_diversity": log_diversity}
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
        return HarmonyRequest(RIDGE, {})

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
        return HarmonyRequest(CORRECT, self._assign_request(reassign=more, directions=directions))

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


# ----------------------------------------------------------------- in-memory reference
def default_n_clusters(n_cells: int) -> int:
    """harmonypy's default number of clusters, ``min(round(N / 30), 100)``."""
    return max(1, int(min(round(n_cells / 30.0), 100)))


def federated_init_centroids(
    site_Z: Sequence[np.ndarray], n_clusters: int, *, seed: int = 0, max_iter: int = 10
) -> np.ndarray:
    """Initial centroids by federated k-means on cosine-normalized embeddings.

    Sites propose local k-means centroids, the server seeds K global centroids
    from them and refines them with federated Lloyd iterations
    (:mod:`fedspatial.shared.algorithms.kmeans`); harmonypy refines its seeds with 10
    Lloyd iterations on the same normalized data.

    Parameters
    ----------
    site_Z : Sequence[np.ndarray]
        Embeddings of each site (n_s x d).
    n_clusters : int
        K.
    seed : int, default 0
        Seed of the k-means runs.
    max_iter : int, default 10
        Federated Lloyd iterations.

    Returns
    -------
    np.ndarray
        float64 (K, d).
    """
    normalized = [cosine_normalize(Z) for Z in site_Z if len(Z)]
    proposals = [local_kmeans(X, n_clusters, seed=seed) for X in normalized]
    seeds = init_from_site_centroids(
        [c for c, _ in proposals], [w for _, w in proposals], n_clusters, seed=seed
    )
    centroids, _ = federated_kmeans(normalized, seeds, max_iter=max_iter)
    return centroids


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
