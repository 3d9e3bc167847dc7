"""Federated k-means for spatial domains, and site-side helpers around it.

Cell embeddings never leave a site. Per iteration a site sends only per-cluster
sums and counts (plus its inertia and how many of its cells changed cluster), so
that the server can run Lloyd's algorithm on the pooled data without seeing it,
and domain id ``k`` means the same thing at every site.

The protocol mirrors scikit-learn's Lloyd k-means step for step (same stopping
rule, same iteration count), so that the in-memory reference
:func:`federated_kmeans` equals ``sklearn.cluster.KMeans(algorithm="lloyd",
n_init=1, init=...)`` fit on the pooled cells. One deliberate difference: an
empty cluster keeps its previous centroid, whereas scikit-learn relocates it to
a far-away point (which a server that never sees points cannot do).

Server loop (one Flower round per iteration)::

    km = FederatedKMeans(max_iter=100, tol=1e-4)
    km.init(init_centroids, feature_variance=pooled_feature_variance_from_sites(moments))
    while not km.done:
        # send km.centroids and km.previous_centroids to the sites; each returns
        # cluster_stats(X, centroids, previous_centroids=previous)
        km.step(merge_cluster_stats(site_stats))
    # sites then label their cells with assign_clusters(X, km.centroids)

Only numpy and scikit-learn are used here (no Flower, no torch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

logger = logging.getLogger(__name__)

# Working memory per chunk of cells; keeps N ~ 1e6 cells cheap in RAM.
_CHUNK_BYTES = 64 * 2**20


# --------------------------------------------------------------------- helpers
def _as_2d_float(X: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    return arr


def _check_centroids(centroids: np.ndarray, dim: int) -> np.ndarray:
    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"centroids must have shape (K>0, D), got {c.shape}")
    if c.shape[1] != dim:
        raise ValueError(f"centroids have {c.shape[1]} features, data has {dim}")
    return c


def _row_chunks(n_rows: int, floats_per_row: int) -> Iterator[slice]:
    """Slices of rows such that each chunk uses about ``_CHUNK_BYTES`` of float64."""
    step = max(1, _CHUNK_BYTES // (8 * max(floats_per_row, 1)))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _partial_distances(Xc: np.ndarray, centroids: np.ndarray, c_sq: np.ndarray) -> np.ndarray:
    """``||c||^2 - 2 x.c`` (squared distance minus ``||x||^2``), as scikit-learn's Lloyd.

    Using the same expansion as scikit-learn keeps argmin decisions identical to it.
    """
    d = Xc @ centroids.T
    d *= -2.0
    d += c_sq
    return d


# ------------------------------------------------------------------ assignment
def assign_clusters(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Assign each cell to its nearest centroid.

    Parameters
    ----------
    X : np.ndarray
        Embeddings, shape (N, D); any float dtype (computed in float64).
    centroids : np.ndarray
        Centroids, shape (K, D).

    Returns
    -------
    labels : np.ndarray
        int64 (N,), index of the nearest centroid; ties go to the lowest index.
    sq_distances : np.ndarray
        float64 (N,), squared Euclidean distance to the assigned centroid.

    Notes
    -----
    Work is done in chunks of rows so that memory stays bounded for large N.
    """
    X = _as_2d_float(X, "X")
    c = _check_centroids(centroids, X.shape[1])
    n, k = X.shape[0], c.shape[0]
    c_sq = np.einsum("kd,kd->k", c, c)
    labels = np.empty(n, dtype=np.int64)
    sq_dist = np.empty(n, dtype=np.float64)
    for sl in _row_chunks(n, 2 * X.shape[1] + k):
        Xc = np.asarray(X[sl], dtype=np.float64)
        lab = np.argmin(_partial_distances(Xc, c, c_sq), axis=1)  # first minimum wins ties
        # exact distance to the winner, free of the expansion's cancellation
        diff = np.take(c, lab, axis=0)
        np.subtract(Xc, diff, out=diff)
        labels[sl] = lab
        sq_dist[sl] = np.einsum("nd,nd->n", diff, diff)
    return labels, sq_dist


# ----------------------------------------------------------- per-cluster stats
@dataclass
class ClusterStats:
    """What a site sends per k-means iteration (and what the server merges).

    Attributes
    ----------
    sums : np.ndarray
        float64 (K, D), sum of the cells assigned to each cluster.
    counts : np.ndarray
        float64 (K,), number of cells assigned to each cluster.
    inertia : float
        Sum of squared distances of the cells to their assigned centroid.
    n_changed : int or None, default None
        Number of cells whose cluster differs from the previous iteration's; None
        when unknown (then only the centroid-shift stopping rule can apply).
    """

    sums: np.ndarray
    counts: np.ndarray
    inertia: float
    n_changed: int | None = None

    @property
    def n_clusters(self) -> int:
        return int(self.sums.shape[0])

    @property
    def n_cells(self) -> float:
        return float(self.counts.sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for a Flower ``ArrayRecord`` (``n_changed`` None is encoded as -1)."""
        return {
            "sums": np.asarray(self.sums, dtype=np.float64),
            "counts": np.asarray(self.counts, dtype=np.float64),
            "inertia": np.array([self.inertia], dtype=np.float64),
            "n_changed": np.array(
                [-1 if self.n_changed is None else self.n_changed], dtype=np.int64
            ),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ClusterStats:
        """Inverse of :meth:`to_arrays`; ``n_changed`` is optional."""
        sums = np.asarray(arrays["sums"], dtype=np.float64)
        counts = np.asarray(arrays["counts"], dtype=np.float64).reshape(-1)
        if sums.ndim != 2 or sums.shape[0] != counts.shape[0]:
            raise ValueError(f"inconsistent shapes: sums {sums.shape}, counts {counts.shape}")
        n_changed = None
        if "n_changed" in arrays:
            value = int(np.asarray(arrays["n_changed"]).reshape(-1)[0])
            n_changed = None if value < 0 else value
        inertia = float(np.asarray(arrays["inertia"]).reshape(-1)[0])
        return cls(sums=sums, counts=counts, inertia=inertia, n_changed=n_changed)


def _stats_from_labels(
    X: np.ndarray, labels: np.ndarray, sq_dist: np.ndarray, k: int
) -> ClusterStats:
    n, d = X.shape
    sums = np.zeros((k, d), dtype=np.float64)
    for sl in _row_chunks(n, 2 * d):
        lab = labels[sl]
        # sparse one-hot (K, n) @ X sums rows per cluster without a Python loop
        onehot = sparse.csr_matrix(
            (np.ones(lab.size), (lab, np.arange(lab.size))), shape=(k, lab.size)
        )
        sums += onehot @ np.asarray(X[sl], dtype=np.float64)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return ClusterStats(sums=sums, counts=counts, inertia=float(sq_dist.sum()))


def cluster_stats(
    X: np.ndarray,
    centroids: np.ndarray,
    *,
    previous_centroids: np.ndarray | None = None,
    previous_labels: np.ndarray | None = None,
) -> ClusterStats:
    """Per-cluster sums and counts of a site's cells (one k-means iteration).

    Parameters
    ----------
    X : np.ndarray
        The site's embeddings, shape (N, D).
    centroids : np.ndarray
        Current global centroids, shape (K, D).
    previous_centroids : np.ndarray or None, default None
        Centroids of the previous iteration. Lets a stateless site report how many
        of its cells changed cluster (needed for scikit-learn's strict convergence).
    previous_labels : np.ndarray or None, default None
        Alternative to ``previous_centroids`` for a site that kept its labels.

    Returns
    -------
    ClusterStats
        ``n_changed`` is N when no previous iteration is given (every cell is new).
    """
    X = _as_2d_float(X, "X")
    c = _check_centroids(centroids, X.shape[1])
    labels, sq_dist = assign_clusters(X, c)
    stats = _stats_from_labels(X, labels, sq_dist, c.shape[0])
    if previous_labels is None and previous_centroids is not None:
        previous_labels, _ = assign_clusters(X, previous_centroids)
    if previous_labels is None:
        stats.n_changed = int(X.shape[0])
    else:
        previous_labels = np.asarray(previous_labels)
        if previous_labels.shape != labels.shape:
            raise ValueError("previous_labels must have one entry per cell")
        stats.n_changed = int(np.count_nonzero(previous_labels != labels))
    return stats


def merge_cluster_stats(stats: Sequence[ClusterStats]) -> ClusterStats:
    """Sum site statistics (server side); ``n_changed`` is None if any site's is."""
    if len(stats) == 0:
        raise ValueError("no cluster statistics to merge")
    shapes = {s.sums.shape for s in stats}
    if len(shapes) != 1:
        raise ValueError(f"sites disagree on (K, D): {sorted(shapes)}")
    changed = [s.n_changed for s in stats]
    return ClusterStats(
        sums=np.sum([np.asarray(s.sums, dtype=np.float64) for s in stats], axis=0),
        counts=np.sum([np.asarray(s.counts, dtype=np.float64) for s in stats], axis=0),
        inertia=float(sum(s.inertia for s in stats)),
        n_changed=None if None in changed else sum(v for v in changed if v is not None),
    )


def update_centroids(stats: ClusterStats, previous: np.ndarray) -> np.ndarray:
    """Mean of each cluster; an empty cluster keeps its previous centroid.

    Parameters
    ----------
    stats : ClusterStats
        Merged statistics, computed with ``previous`` as centroids.
    previous : np.ndarray
        Centroids used for the assignment, shape (K, D).

    Returns
    -------
    np.ndarray
        New centroids, float64 (K, D).
    """
    new = np.array(previous, dtype=np.float64, copy=True)
    if new.shape != stats.sums.shape:
        raise ValueError(f"previous centroids {new.shape} do not match stats {stats.sums.shape}")
    filled = stats.counts > 0
    new[filled] = stats.sums[filled] / stats.counts[filled, None]
    if not filled.all():
        logger.debug("%d empty cluster(s) keep their centroid", int((~filled).sum()))
    return new


# -------------------------------------------------- pooled variance (for tol)
@dataclass
class FeatureMoments:
    """Per-feature count, mean and sum of squared deviations (M2) of a site's cells.

    Equivalent information to per-feature sums and sums of squares, but combining
    means and M2 (Chan et al.) avoids the cancellation of ``E[x^2] - E[x]^2``.
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "count": np.array([self.count], dtype=np.float64),
            "mean": np.asarray(self.mean, dtype=np.float64),
            "m2": np.asarray(self.m2, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FeatureMoments:
        return cls(
            count=float(np.asarray(arrays["count"]).reshape(-1)[0]),
            mean=np.asarray(arrays["mean"], dtype=np.float64).reshape(-1),
            m2=np.asarray(arrays["m2"], dtype=np.float64).reshape(-1),
        )


def feature_moments(X: np.ndarray) -> FeatureMoments:
    """Per-feature moments of a site's cells (sent once, before k-means)."""
    X = _as_2d_float(X, "X")
    d = X.shape[1]
    parts = []
    for sl in _row_chunks(X.shape[0], 2 * d):
        Xc = np.asarray(X[sl], dtype=np.float64)
        mean = Xc.mean(axis=0)
        parts.append(FeatureMoments(float(Xc.shape[0]), mean, ((Xc - mean) ** 2).sum(axis=0)))
    if not parts:
        return FeatureMoments(0.0, np.zeros(d), np.zeros(d))
    return merge_feature_moments(parts)


def merge_feature_moments(moments: Sequence[FeatureMoments]) -> FeatureMoments:
    """Combine moments of disjoint sets of cells (pairwise update of Chan et al.)."""
    if len(moments) == 0:
        raise ValueError("no feature moments to merge")
    count, mean, m2 = 0.0, np.zeros_like(moments[0].mean), np.zeros_like(moments[0].m2)
    for m in moments:
        if m.count == 0:
            continue
        total = count + m.count
        delta = m.mean - mean
        mean = mean + delta * (m.count / total)
        m2 = m2 + m.m2 + delta**2 * (count * m.count / total)
        count = total
    return FeatureMoments(count, mean, m2)


def pooled_feature_variance_from_sites(site_moments: Sequence[FeatureMoments]) -> np.ndarray:
    """Per-feature (population, ddof=0) variance of the pooled cells of all sites.

    Parameters
    ----------
    site_moments : Sequence[FeatureMoments]
        One :func:`feature_moments` result per site.

    Returns
    -------
    np.ndarray
        float64 (D,), equal to ``np.var(np.vstack(site_X), axis=0)``.
    """
    merged = merge_feature_moments(site_moments)
    if merged.count == 0:
        raise ValueError("no cells at any site")
    return merged.m2 / merged.count


def kmeans_tolerance(tol: float, feature_variance: np.ndarray | None) -> float:
    """Absolute shift tolerance as scikit-learn: ``tol * mean(per-feature variance)``."""
    if tol < 0:
        raise ValueError("tol must be >= 0")
    if tol == 0:
        return 0.0
    if feature_variance is None:
        raise ValueError("tol > 0 needs the pooled per-feature variance")
    return float(tol * np.mean(feature_variance))


def kmeans_converged(
    n_changed: int | None, center_shift: float, tol_abs: float, *, first_iteration: bool
) -> bool:
    """scikit-learn's Lloyd stopping rule for one iteration.

    Parameters
    ----------
    n_changed : int or None
        Cells (over all sites) whose label differs from the previous iteration's.
    center_shift : float
        Squared centroid shift of this iteration, summed over clusters.
    tol_abs : float
        Absolute tolerance, see :func:`kmeans_tolerance`.
    first_iteration : bool
        On the first iteration there are no previous labels to compare with.

    Returns
    -------
    bool
        True on strict convergence (no label changed) or when the shift is <= tol_abs.
    """
    if not first_iteration and n_changed == 0:
        return True
    return center_shift <= tol_abs


class FederatedKMeans:
    """Server-side state of federated Lloyd k-means, one :meth:`step` per round.

    Parameters
    ----------
    max_iter : int, default 100
        Maximum number of iterations.
    tol : float, default 0.0
        Relative tolerance on the squared centroid shift (scaled by the mean pooled
        per-feature variance, as scikit-learn's ``tol``).
    """

    def __init__(self, *, max_iter: int = 100, tol: float = 0.0) -> None:
        if max_iter < 1:
            raise ValueError("max_iter must be >= 1")
        if tol < 0:
            raise ValueError("tol must be >= 0")
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.tol_abs = 0.0
        self._centroids: np.ndarray | None = None
        self._previous: np.ndarray | None = None
        self._n_iter = 0
        self._done = False
        self.stop_reason: str | None = None  # "strict", "tol" or "max_iter"
        self.center_shift = float("nan")
        self.inertia = float("nan")  # of the assignment in the last step

    def init(self, centroids: np.ndarray, *, feature_variance: np.ndarray | None = None) -> None:
        """Start (or restart) from initial centroids.

        Parameters
        ----------
        centroids : np.ndarray
            Initial centroids, shape (K, D).
        feature_variance : np.ndarray or None, default None
            Pooled per-feature variance (:func:`pooled_feature_variance_from_sites`);
            required when ``tol > 0``.
        """
        c = np.array(centroids, dtype=np.float64, copy=True)
        if c.ndim != 2 or c.shape[0] == 0:
            raise ValueError(f"centroids must have shape (K>0, D), got {c.shape}")
        self.tol_abs = kmeans_tolerance(self.tol, feature_variance)
        self._centroids, self._previous = c, None
        self._n_iter, self._done, self.stop_reason = 0, False, None
        self.center_shift = self.inertia = float("nan")

    @property
    def centroids(self) -> np.ndarray:
        """Centroids to send next (after the loop: the final centroids)."""
        if self._centroids is None:
            raise RuntimeError("call init() first")
        return self._centroids

    @property
    def previous_centroids(self) -> np.ndarray | None:
        """Centroids of the previous iteration (None before the first step)."""
        return self._previous

    @property
    def n_iter(self) -> int:
        return self._n_iter

    @property
    def done(self) -> bool:
        return self._done

    def step(self, merged: ClusterStats) -> bool:
        """Update the centroids from merged site statistics.

        Parameters
        ----------
        merged : ClusterStats
            Sum of the sites' :func:`cluster_stats` for :attr:`centroids`.

        Returns
        -------
        bool
            True when k-means has finished (converged or reached ``max_iter``).
        """
        if self._done:
            raise RuntimeError("k-means has already finished")
        current = self.centroids
        new = update_centroids(merged, current)
        self._n_iter += 1
        self.center_shift = float(((new - current) ** 2).sum())
        self.inertia = merged.inertia
        converged = kmeans_converged(
            merged.n_changed, self.center_shift, self.tol_abs, first_iteration=self._n_iter == 1
        )
        self._previous, self._centroids = current, new
        if converged:
            self.stop_reason = "strict" if merged.n_changed == 0 and self._n_iter > 1 else "tol"
        elif self._n_iter >= self.max_iter:
            self.stop_reason = "max_iter"
        self._done = self.stop_reason is not None
        if self._done:
            logger.info(
                "federated k-means stopped after %d iteration(s) (%s), inertia %.6g",
                self._n_iter,
                self.stop_reason,
                self.inertia,
            )
        return self._done


def federated_kmeans(
    site_X: Sequence[np.ndarray], init: np.ndarray, *, max_iter: int = 100, tol: float = 0.0
) -> tuple[np.ndarray, int]:
    """In-memory reference of the federated k-means protocol.

    Sites compute :func:`cluster_stats`; the server merges them and steps a
    :class:`FederatedKMeans`, exactly as the Flower server loop does.

    Parameters
    ----------
    site_X : Sequence[np.ndarray]
        Embeddings of each site, shapes (N_s, D).
    init : np.ndarray
        Initial centroids, shape (K, D).
    max_iter : int, default 100
        Maximum number of iterations.
    tol : float, default 0.0
        Relative tolerance, as scikit-learn's ``KMeans(tol=...)``.

    Returns
    -------
    centroids : np.ndarray
        Final centroids, float64 (K, D).
    n_iter : int
        Number of iterations run (as scikit-learn's ``n_iter_``).
    """
    km = FederatedKMeans(max_iter=max_iter, tol=tol)
    variance = (
        pooled_feature_variance_from_sites([feature_moments(X) for X in site_X])
        if tol > 0
        else None
    )
    km.init(init, feature_variance=variance)
    while not km.done:
        stats = [
            cluster_stats(X, km.centroids, previous_centroids=km.previous_centroids) for X in site_X
        ]
        km.step(merge_cluster_stats(stats))
    return km.centroids, km.n_iter


# -------------------------------------------------------------- initialization
def local_kmeans(X: np.ndarray, n_clusters: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A site's proposal for initialization: k-means on its own cells.

    Parameters
    ----------
    X : np.ndarray
        The site's embeddings, shape (N, D).
    n_clusters : int
        Requested number of clusters; ``k = min(n_clusters, N)`` are fit.
    seed : int, default 0
        Random state of scikit-learn's ``KMeans``.
    n_init : int, default 10
        k-means++ starts of that ``KMeans`` (1 gives a different start for each seed).

    Returns
    -------
    centroids : np.ndarray
        float64 (k, D).
    counts : np.ndarray
        float64 (k,), cells per local cluster (weights for the server).
    """
    X = _as_2d_float(X, "X")
    if n_clusters < 1:
        raise ValueError("n_clusters must be >= 1")
    k = min(int(n_clusters), X.shape[0])
    if k == 0:
        return np.zeros((0, X.shape[1])), np.zeros(0)
    from sklearn.cluster import KMeans  # lazy: ~1 s of every ClientApp start otherwise

    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(np.asarray(X, dtype=np.float64))
    counts = np.bincount(km.labels_, minlength=k).astype(np.float64)
    return np.asarray(km.cluster_centers_, dtype=np.float64), counts


def init_from_site_centroids(
    site_centroids: Sequence[np.ndarray],
    site_counts: Sequence[np.ndarray],
    n_clusters: int,
    *,
    seed: int = 0,
    n_init: int = 10,
) -> np.ndarray:
    """Server: initial global centroids from the sites' local k-means proposals.

    Weighted k-means (weights = local cluster sizes) on the union of the sites'
    centroids. Pass sites in a fixed order (e.g. sorted by node id) so that the
    result is reproducible.

    Parameters
    ----------
    site_centroids : Sequence[np.ndarray]
        Per site, local centroids (k_s, D).
    site_counts : Sequence[np.ndarray]
        Per site, local cluster sizes (k_s,).
    n_clusters : int
        Number of global clusters K.
    seed : int, default 0
        Random state of scikit-learn's ``KMeans``.
    n_init : int, default 10
        k-means++ starts of that ``KMeans`` (1 gives a different start for each seed).

    Returns
    -------
    np.ndarray
        float64 (K, D).
    """
    if len(site_centroids) != len(site_counts) or len(site_centroids) == 0:
        raise ValueError("need one (centroids, counts) pair per site, at least one site")
    points = np.vstack([np.asarray(c, dtype=np.float64) for c in site_centroids])
    weights = np.concatenate([np.asarray(w, dtype=np.float64).reshape(-1) for w in site_counts])
    if points.shape[0] != weights.shape[0]:
        raise ValueError("each site must send one count per centroid")
    keep = weights > 0  # a zero weight would still be drawable by k-means++
    points, weights = points[keep], weights[keep]
    if points.shape[0] < n_clusters:
        raise ValueError(
            f"{points.shape[0]} non-empty site centroids cannot seed {n_clusters} clusters"
        )
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    km.fit(points, sample_weight=weights)
    return np.asarray(km.cluster_centers_, dtype=np.float64)


# ------------------------------------------------------------------ confidence
def shared_variance(stats: ClusterStats, dim: int | None = None) -> float:
    """Maximum-likelihood shared isotropic variance: ``inertia / (n * D)``.

    Parameters
    ----------
    stats : ClusterStats
        Merged statistics (their inertia is for the centroids they were computed with).
    dim : int or None, default None
        Embedding dimension D; defaults to ``stats.sums.shape[1]``.

    Returns
    -------
    float
    """
    d = stats.sums.shape[1] if dim is None else int(dim)
    n = stats.n_cells
    if n <= 0 or d <= 0:
        raise ValueError("shared variance needs at least one cell and one feature")
    return float(stats.inertia / (n * d))


def isotropic_posterior(X: np.ndarray, centroids: np.ndarray, variance: float) -> np.ndarray:
    """Cluster posterior under an equal-weight isotropic Gaussian mixture.

    ``p(k | x) = softmax_k(-||x - c_k||^2 / (2 variance))``, computed with
    log-sum-exp. The max over k serves as the domain confidence.

    Parameters
    ----------
    X : np.ndarray
        Embeddings, shape (N, D).
    centroids : np.ndarray
        Centroids, shape (K, D).
    variance : float
        Shared variance (> 0; 0 gives the hard one-hot assignment).

    Returns
    -------
    np.ndarray
        float64 (N, K); rows sum to 1.
    """
    X = _as_2d_float(X, "X")
    c = _check_centroids(centroids, X.shape[1])
    if not np.isfinite(variance) or variance < 0:
        raise ValueError(f"variance must be finite and >= 0, got {variance}")
    n, k = X.shape[0], c.shape[0]
    out = np.empty((n, k), dtype=np.float64)
    if variance == 0:
        labels, _ = assign_clusters(X, c)
        out[:] = 0.0
        out[np.arange(n), labels] = 1.0
        return out
    c_sq = np.einsum("kd,kd->k", c, c)
    for sl in _row_chunks(n, X.shape[1] + 2 * k):
        Xc = np.asarray(X[sl], dtype=np.float64)
        # ||x||^2 is constant per row and cancels in the softmax
        logits = _partial_distances(Xc, c, c_sq)
        logits *= -0.5 / variance
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        out[sl] = logits
    return out


# ------------------------------------------------------------ spatial smoothing
def refine_labels(labels: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """Majority vote of each cell's label among itself and its spatial neighbours.

    One pass, GraphST-style. Ties keep the cell's own label when it is among the
    tied ones, else take the lowest tied label.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels, shape (N,).
    neighbors : np.ndarray
        int64 (N, m) neighbour indices, padded with -1.

    Returns
    -------
    np.ndarray
        Refined labels, shape (N,), same dtype as ``labels``.
    """
    labels = np.asarray(labels)
    nbrs = np.asarray(neighbors, dtype=np.int64)
    n = labels.shape[0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("labels must be a 1-D integer array")
    if nbrs.ndim != 2 or nbrs.shape[0] != n:
        raise ValueError(f"neighbors must have shape ({n}, m), got {nbrs.shape}")
    if nbrs.size and (nbrs.max() >= n or nbrs.min() < -1):
        raise ValueError("neighbour indices must be in [0, N) or -1 for padding")
    valid = np.concatenate([np.ones((n, 1), dtype=bool), nbrs >= 0], axis=1)
    votes = np.concatenate([labels[:, None], labels[np.where(nbrs >= 0, nbrs, 0)]], axis=1)
    # support of each candidate = how many valid voters share its label; O(N m^2)
    # with small m, and works for arbitrary (not necessarily contiguous) labels
    support = np.zeros(votes.shape, dtype=np.int64)
    for j in range(votes.shape[1]):
        support += (votes == votes[:, j : j + 1]) & valid[:, j : j + 1]
    support[~valid] = -1
    best = support.max(axis=1)
    own_wins = support[:, 0] == best
    tied = support == best[:, None]
    lowest = np.where(tied, votes, np.iinfo(labels.dtype).max).min(axis=1)
    return np.where(own_wins, labels, lowest).astype(labels.dtype, copy=False)
