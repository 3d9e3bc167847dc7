"""Tests for fedspatial.shared.algorithms.kmeans (federated k-means and site helpers)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from fedspatial.shared.algorithms import _kmeans_arrays
from fedspatial.shared.algorithms.kmeans import (
    ClusterStats,
    FeatureMoments,
    FederatedKMeans,
    assign_clusters,
    cluster_stats,
    feature_moments,
    federated_kmeans,
    init_from_site_centroids,
    isotropic_posterior,
    kmeans_converged,
    local_kmeans,
    merge_cluster_stats,
    pooled_feature_variance_from_sites,
    refine_labels,
    shared_variance,
    update_centroids,
)


def _blobs(seed: int, n: int = 600, k: int = 4, d: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled overlapping blobs and k random data points as initial centroids."""
    X, _ = make_blobs(n_samples=n, centers=k, n_features=d, cluster_std=2.5, random_state=seed)
    rng = np.random.default_rng(seed)
    X = X[rng.permutation(n)]
    return X, X[rng.choice(n, size=k, replace=False)].copy()


def _split(X: np.ndarray) -> list[np.ndarray]:
    """Three unequal sites."""
    n = X.shape[0]
    return [X[: n // 5], X[n // 5 : n // 2], X[n // 2 :]]


# ------------------------------------------------------------------ assignment
def test_assign_clusters_hand_example_and_tie_goes_to_lowest_index():
    X = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [3.0, 1.0]])
    centroids = np.array([[0.0, 0.0], [2.0, 0.0]])
    labels, dist = assign_clusters(X, centroids)
    assert labels.dtype == np.int64 and dist.dtype == np.float64
    np.testing.assert_array_equal(labels, [0, 1, 0, 1])  # (1, 0) is equidistant
    np.testing.assert_allclose(dist, [0.0, 0.0, 1.0, 2.0])


def test_assign_clusters_in_chunks_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1003, 5)).astype(np.float32)
    centroids = rng.normal(size=(7, 5))
    monkeypatch.setattr(_kmeans_arrays, "CHUNK_BYTES", 8 * 64)  # a few rows per chunk
    labels, dist = assign_clusters(X, centroids)
    full = ((X.astype(np.float64)[:, None, :] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-12)


def test_assign_clusters_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="features"):
        assign_clusters(np.zeros((3, 2)), np.zeros((2, 3)))


# ----------------------------------------------------------- per-cluster stats
def test_cluster_stats_hand_example():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [4.0, 4.0], [6.0, 4.0]])
    centroids = np.array([[0.0, 0.0], [5.0, 4.0], [100.0, 100.0]])
    s = cluster_stats(X, centroids)
    np.testing.assert_allclose(s.sums, [[1.0, 0.0], [10.0, 8.0], [0.0, 0.0]])
    np.testing.assert_array_equal(s.counts, [2.0, 2.0, 0.0])
    assert s.inertia == pytest.approx(1.0 + 1.0 + 1.0)
    assert s.n_changed == 4  # no previous iteration: every cell counts as changed


def test_cluster_stats_counts_changed_labels_from_previous_centroids_or_labels():
    X = np.array([[0.0], [1.0], [2.0], [3.0]])
    previous = np.array([[0.0], [3.0]])  # labels 0, 0, 1, 1
    current = np.array([[0.0], [1.0]])  # labels 0, 1, 1, 1
    assert cluster_stats(X, current, previous_centroids=previous).n_changed == 1
    assert cluster_stats(X, current, previous_labels=np.array([0, 0, 1, 1])).n_changed == 1
    assert cluster_stats(X, current, previous_centroids=current).n_changed == 0


def test_cluster_stats_round_trip_through_arrays():
    s = ClusterStats(sums=np.arange(6.0).reshape(3, 2), counts=np.array([1.0, 0, 2]), inertia=1.5)
    back = ClusterStats.from_arrays(s.to_arrays())
    np.testing.assert_array_equal(back.sums, s.sums)
    np.testing.assert_array_equal(back.counts, s.counts)
    assert back.inertia == 1.5 and back.n_changed is None
    s.n_changed = 7
    assert ClusterStats.from_arrays(s.to_arrays()).n_changed == 7


def test_merge_is_associative_and_equals_pooled_stats():
    X, init = _blobs(1)
    sites = _split(X)
    stats = [cluster_stats(x, init) for x in sites]
    flat = merge_cluster_stats(stats)
    nested = merge_cluster_stats([merge_cluster_stats(stats[:2]), stats[2]])
    pooled = cluster_stats(X, init)
    for other in (nested, pooled):
        np.testing.assert_allclose(flat.sums, other.sums, rtol=1e-12)
        np.testing.assert_array_equal(flat.counts, other.counts)
        assert flat.inertia == pytest.approx(other.inertia, rel=1e-12)
        assert flat.n_changed == other.n_changed == X.shape[0]


def test_merge_unknown_n_changed_stays_unknown():
    a = ClusterStats(np.ones((2, 1)), np.ones(2), 1.0, n_changed=3)
    b = ClusterStats(np.ones((2, 1)), np.ones(2), 1.0, n_changed=None)
    assert merge_cluster_stats([a, b]).n_changed is None
    with pytest.raises(ValueError, match="disagree"):
        merge_cluster_stats([a, ClusterStats(np.ones((3, 1)), np.ones(3), 0.0)])


def test_update_centroids_keeps_empty_cluster():
    stats = ClusterStats(
        sums=np.array([[2.0, 4.0], [0.0, 0.0]]), counts=np.array([2.0, 0.0]), inertia=0.0
    )
    previous = np.array([[9.0, 9.0], [-1.0, 5.0]])
    np.testing.assert_array_equal(update_centroids(stats, previous), [[1.0, 2.0], [-1.0, 5.0]])
    np.testing.assert_array_equal(previous, [[9.0, 9.0], [-1.0, 5.0]])  # not modified


# ----------------------------------------------------- federated = sklearn Lloyd
@pytest.mark.parametrize("tol", [0.0, 1e-4])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_federated_kmeans_equals_sklearn_lloyd_on_pooled_data(seed, tol):
    X, init = _blobs(seed)
    ref = KMeans(n_clusters=4, init=init, n_init=1, algorithm="lloyd", max_iter=100, tol=tol)
    ref.fit(X)
    centroids, n_iter = federated_kmeans(_split(X), init, max_iter=100, tol=tol)
    np.testing.assert_allclose(centroids, ref.cluster_centers_, atol=1e-8, rtol=0)
    assert n_iter == ref.n_iter_
    labels = np.concatenate([assign_clusters(x, centroids)[0] for x in _split(X)])
    np.testing.assert_array_equal(labels, ref.labels_)


def test_federated_kmeans_stops_at_max_iter_like_sklearn():
    X, init = _blobs(1)  # needs many more than 3 iterations to converge
    ref = KMeans(n_clusters=4, init=init, n_init=1, algorithm="lloyd", max_iter=3, tol=0.0).fit(X)
    centroids, n_iter = federated_kmeans(_split(X), init, max_iter=3)
    assert n_iter == ref.n_iter_ == 3
    np.testing.assert_allclose(centroids, ref.cluster_centers_, atol=1e-8, rtol=0)


def test_federated_kmeans_empty_cluster_keeps_centroid():
    # A centroid that no cell ever reaches stays put; the others then follow plain
    # Lloyd with one cluster fewer (scikit-learn would relocate it instead).
    X, init = _blobs(2, k=3)
    far = np.full((1, X.shape[1]), 1e3)
    centroids, n_iter = federated_kmeans(_split(X), np.vstack([init, far]), tol=1e-4)
    ref = KMeans(n_clusters=3, init=init, n_init=1, algorithm="lloyd", tol=1e-4).fit(X)
    np.testing.assert_array_equal(centroids[3], far[0])
    np.testing.assert_allclose(centroids[:3], ref.cluster_centers_, atol=1e-8, rtol=0)
    assert n_iter == ref.n_iter_


def test_federated_kmeans_server_state_machine():
    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    km = FederatedKMeans(max_iter=10)
    km.init(np.array([[0.0], [11.0]]))
    assert km.previous_centroids is None and km.n_iter == 0 and not km.done
    # iteration 1: labels 0,0,1,1 -> centroids 0.5, 10.5; never strict on iteration 1
    assert not km.step(cluster_stats(X, km.centroids))
    np.testing.assert_array_equal(km.centroids, [[0.5], [10.5]])
    assert km.center_shift == pytest.approx(0.5)
    # iteration 2: same labels -> strict convergence
    stats = cluster_stats(X, km.centroids, previous_centroids=km.previous_centroids)
    assert stats.n_changed == 0
    assert km.step(stats)
    assert km.done and km.n_iter == 2 and km.stop_reason == "strict"
    with pytest.raises(RuntimeError, match="finished"):
        km.step(stats)


def test_federated_kmeans_tol_needs_pooled_variance():
    with pytest.raises(ValueError, match="variance"):
        FederatedKMeans(tol=1e-4).init(np.zeros((2, 1)))


def test_kmeans_converged_rule():
    assert not kmeans_converged(0, 1.0, 0.0, first_iteration=True)  # no previous labels yet
    assert kmeans_converged(0, 1.0, 0.0, first_iteration=False)  # strict
    assert kmeans_converged(5, 0.5, 0.5, first_iteration=False)  # shift <= tol_abs
    assert not kmeans_converged(None, 0.6, 0.5, first_iteration=False)
    assert kmeans_converged(None, 0.0, 0.0, first_iteration=True)  # sklearn's tol=0 check


def test_pooled_feature_variance_equals_numpy_var():
    rng = np.random.default_rng(3)
    sites = [rng.normal(5.0, s, size=(n, 4)) for n, s in [(10, 1.0), (0, 1.0), (257, 3.0)]]
    moments = [FeatureMoments.from_arrays(feature_moments(x).to_arrays()) for x in sites]
    np.testing.assert_allclose(
        pooled_feature_variance_from_sites(moments), np.var(np.vstack(sites), axis=0), rtol=1e-12
    )


def test_feature_moments_chunked_match(monkeypatch):
    X = np.random.default_rng(4).normal(100.0, 0.1, size=(501, 3))  # offset: tests stability
    monkeypatch.setattr(_kmeans_arrays, "CHUNK_BYTES", 8 * 60)
    m = feature_moments(X)
    assert m.count == 501
    np.testing.assert_allclose(m.mean, X.mean(0), rtol=1e-13)
    np.testing.assert_allclose(m.m2 / m.count, X.var(0), rtol=1e-9)


# -------------------------------------------------------------- initialization
def test_local_kmeans_shapes_and_small_site():
    X, _ = _blobs(0, n=200)
    centroids, counts = local_kmeans(X, 4, seed=0)
    assert centroids.shape == (4, 3) and counts.shape == (4,)
    assert counts.sum() == 200
    few, few_counts = local_kmeans(X[:2], 4)  # k = min(n_clusters, N)
    assert few.shape == (2, 3)
    np.testing.assert_array_equal(few_counts, [1.0, 1.0])


def test_init_from_site_centroids_deterministic_and_recovers_blobs():
    centers = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    X, _ = make_blobs(n_samples=600, centers=centers, cluster_std=0.5, random_state=0)
    proposals = [local_kmeans(x, 3, seed=1) for x in _split(X)]
    cs, ws = [p[0] for p in proposals], [p[1] for p in proposals]
    a = init_from_site_centroids(cs, ws, 3, seed=7)
    np.testing.assert_array_equal(a, init_from_site_centroids(cs, ws, 3, seed=7))
    assert a.shape == (3, 2)
    nearest = np.sqrt(((a[:, None] - centers[None]) ** 2).sum(-1)).min(0)
    assert (nearest < 0.5).all()


def test_init_from_site_centroids_ignores_empty_proposals():
    cs = [np.array([[0.0], [1.0]]), np.array([[50.0]])]
    ws = [np.array([3.0, 0.0]), np.array([2.0])]
    init = np.sort(init_from_site_centroids(cs, ws, 2).ravel())
    np.testing.assert_array_equal(init, [0.0, 50.0])
    with pytest.raises(ValueError, match="non-empty"):
        init_from_site_centroids(cs, ws, 3)


# ------------------------------------------------------------------ confidence
def test_isotropic_posterior_hand_example():
    X = np.array([[0.0], [1.0]])
    centroids = np.array([[0.0], [2.0]])
    post = isotropic_posterior(X, centroids, variance=1.0)
    # cell 0: squared distances (0, 4) -> softmax(0, -2); cell 1: (1, 1) -> even
    e = np.exp(-2.0)
    np.testing.assert_allclose(post, [[1 / (1 + e), e / (1 + e)], [0.5, 0.5]], rtol=1e-12)


def test_isotropic_posterior_rows_sum_to_one_and_are_stable(monkeypatch):
    rng = np.random.default_rng(5)
    X = rng.normal(scale=1e3, size=(300, 4))
    centroids = rng.normal(scale=1e3, size=(6, 4))
    monkeypatch.setattr(_kmeans_arrays, "CHUNK_BYTES", 8 * 100)
    post = isotropic_posterior(X, centroids, variance=1e-3)  # huge logits
    assert np.isfinite(post).all()
    np.testing.assert_allclose(post.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(post.argmax(1), assign_clusters(X, centroids)[0])
    hard = isotropic_posterior(X, centroids, variance=0.0)
    np.testing.assert_array_equal(hard, np.eye(6)[assign_clusters(X, centroids)[0]])


def test_shared_variance_hand_example():
    X = np.array([[0.0, 0.0], [2.0, 0.0]])
    stats = cluster_stats(X, np.array([[1.0, 0.0]]))  # inertia 2 over n=2, D=2
    assert shared_variance(stats, 2) == pytest.approx(0.5)
    assert shared_variance(stats) == pytest.approx(0.5)


# ------------------------------------------------------------ spatial smoothing
def test_refine_labels_hand_example():
    labels = np.array([0, 1, 1, 2, 2, 3])
    neighbors = np.array(
        [
            [1, 2, -1, -1],  # votes 0,1,1 -> 1 (majority)
            [0, -1, -1, -1],  # votes 1,0 -> tie, own label kept
            [-1, -1, -1, -1],  # no neighbours -> own
            [1, 2, 4, 5],  # votes 2,1,1,2,3 -> 1 and 2 tie, own (2) among them
            [5, -1, -1, -1],  # votes 2,3 -> tie, own kept
            [1, 2, 3, 4],  # votes 3,1,1,2,2 -> 1 and 2 tie, own (3) not: lowest
        ]
    )
    np.testing.assert_array_equal(refine_labels(labels, neighbors), [1, 1, 1, 2, 2, 1])


def _refine_reference(labels: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    out = labels.copy()
    for i, row in enumerate(neighbors):
        votes = [labels[i]] + [labels[j] for j in row if j >= 0]
        values, counts = np.unique(votes, return_counts=True)
        tied = values[counts == counts.max()]
        out[i] = labels[i] if labels[i] in tied else tied.min()
    return out


def test_refine_labels_equals_reference_loop():
    rng = np.random.default_rng(6)
    n = 400
    labels = rng.choice([2, 5, 7, 11], size=n)  # non-contiguous ids on purpose
    neighbors = rng.integers(0, n, size=(n, 6))
    neighbors[rng.random((n, 6)) < 0.3] = -1
    np.testing.assert_array_equal(
        refine_labels(labels, neighbors), _refine_reference(labels, neighbors)
    )


def test_refine_labels_rejects_bad_neighbour_index():
    with pytest.raises(ValueError, match="neighbour"):
        refine_labels(np.array([0, 1]), np.array([[1], [2]]))
