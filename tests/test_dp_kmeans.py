"""DP federated k-means (local DP) and the spatial smoothing of embeddings.

Checks the guarantee (sensitivity of one release to one cell, the noise actually added,
the ledger's refusals, sigma from the site's own plan only) and the utility (DP k-means
recovers well-separated clusters; smoothing before assignment beats per-cell assignment).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fedspatial.shared.algorithms import dp_kmeans as dk
from fedspatial.shared.algorithms.smoothing import smooth_embedding
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.phases.base import MemoryState, Run
from fedspatial.shared.phases.dp_kmeans import DPKMeansPhase, site_release
from fedspatial.shared.phases.embedding import store_embedding
from fedspatial.shared.privacy.accounting import PrivacyBudgetExceeded
from fedspatial.shared.privacy.budget import KMEANS_INIT_ITERATIONS, budget_plan, plan_budget
from fedspatial.shared.privacy.ledger import PrivacyLedger
from fedspatial.shared.protocol.names import Query
from fedspatial.shared.protocol.payload import Payload

SQRT3 = math.sqrt(3.0)


# ------------------------------------------------------------------ fakes
def _cfg(epsilon: float = 8.0, iterations: int = 6, k: int = 5, dim: int = 16) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "privacy": {"local-dp": True, "target-epsilon": epsilon, "kmeans-iterations": iterations},
        "clustering": {"n-domains": k}, "model": {"latent-dim": dim},
    })


class FakeSite:
    """What the phase's site half uses of a site: cfg, state (with the per-cell
    embedding), name, n_cells and a ledger kept as JSON (as the real site keeps it)."""

    def __init__(self, name: str, cfg: ExperimentConfig, u: np.ndarray, *, budget: float | None = None) -> None:
        self.name, self.cfg, self.state = name, cfg, MemoryState()
        store_embedding(self.state, u, per_cell=u)
        self.n_cells = len(u)
        self.budget = cfg.privacy.target_epsilon if budget is None else budget
        self.saved: str | None = None
        self.saves = 0

    def ledger(self) -> PrivacyLedger:
        if self.saved is not None:
            return PrivacyLedger.from_json(self.saved)
        return PrivacyLedger(site=self.name, delta=self.cfg.privacy.delta, budget_epsilon=self.budget)

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        self.saved, self.saves = ledger.to_json(), self.saves + 1


class FakeFederation:
    """Asks every site in-process, in site-name order, with reproducible noise."""

    def __init__(self, sites: list[FakeSite], seed: int) -> None:
        self.by_name = {s.name: s for s in sorted(sites, key=lambda s: s.name)}
        self.seed, self.asked = seed, 0

    @property
    def sites(self) -> list[str]:
        return list(self.by_name)

    def ask(self, query: str, payload: Any = None, **_: Any) -> dict[str, Payload]:
        assert query == Query.DP_CLUSTER_STATS
        self.asked += 1
        return {
            name: site_release(site, payload, seed=self.seed * 10_000 + 100 * self.asked + i)  # type: ignore[arg-type]
            for i, (name, site) in enumerate(self.by_name.items())
        }


def _clustered(seed: int, sizes: tuple[int, ...] = (2000, 1500, 1000), k: int = 5, d: int = 16,
               spread: float = 0.7) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Unit embeddings around ``k`` random unit centres, site-specific cluster mixes."""
    rng = np.random.default_rng(seed)
    centres = dk.unit_rows(rng.standard_normal((k, d)))
    us, ys = [], []
    for n in sizes:
        y = rng.choice(k, n, p=rng.dirichlet(np.full(k, 3.0)))
        us.append(dk.unit_rows(centres[y] + spread * rng.standard_normal((n, d)) / math.sqrt(d)))
        ys.append(y)
    return us, ys


def _dp_kmeans_ari(epsilon: float, seed: int) -> tuple[float, Run, list[FakeSite]]:
    cfg = _cfg(epsilon)
    us, ys = _clustered(seed)
    sites = [FakeSite(f"site-{i}", cfg, u) for i, u in enumerate(us)]
    run = Run(cfg, {}, folder=None)  # type: ignore[arg-type]
    DPKMeansPhase().run(FakeFederation(sites, seed), run)  # type: ignore[arg-type]
    assert run.domains is not None
    labels = np.argmax(np.vstack(us) @ run.domains.centroids.T, axis=1)
    return adjusted_rand_score(np.concatenate(ys), labels), run, sites


# ------------------------------------------------------------ sensitivity
def _max_removal_change(u: np.ndarray, centroids: np.ndarray) -> float:
    full = dk.cluster_statistics(u, centroids).vector()
    return max(
        float(np.linalg.norm(full - dk.cluster_statistics(np.delete(u, i, axis=0), centroids).vector()))
        for i in range(len(u))
    )


def test_removing_any_cell_moves_a_release_by_at_most_sqrt3() -> None:
    rng = np.random.default_rng(0)
    d = 6
    u = rng.standard_normal((40, d)) * rng.uniform(0.01, 50.0, size=(40, 1))  # any norms: the site normalizes
    u[3] = 0.0  # an all-zero row
    u[7] = u[8]  # duplicates
    cases = {
        "random": dk.unit_rows(rng.standard_normal((5, d))),
        "long centroids": rng.standard_normal((5, d)) * 30.0,  # clipped at the site
        "antipodal": -dk.unit_rows(u[:4] + 1e-9),  # cells at distance 2: the largest squared distance
        "duplicated centroids": np.repeat(dk.unit_rows(rng.standard_normal((1, d))), 3, axis=0),
        "one centroid": np.zeros((1, d)),
    }
    for name, centroids in cases.items():
        assert _max_removal_change(u, centroids) <= SQRT3 + 1e-9, name
    # the bound is attained: a unit cell at the antipode of a unit centroid moves every block by 1
    c = dk.unit_rows(rng.standard_normal((1, d)))
    worst = np.vstack([-c, dk.unit_rows(rng.standard_normal((5, d)))])
    assert _max_removal_change(worst, c) == pytest.approx(SQRT3, abs=1e-9)


def test_the_site_clips_what_the_server_sends_and_normalizes_what_it_stored() -> None:
    rng = np.random.default_rng(1)
    u = dk.unit_rows(rng.standard_normal((30, 4)))
    c = dk.unit_rows(rng.standard_normal((3, 4)))
    exact = dk.cluster_statistics(u, c)
    assert np.allclose(dk.cluster_statistics(u * 7.0, c * 5.0).vector(), exact.vector())
    assert np.all(exact.sqdist <= exact.counts + 1e-12)  # each term at most 1
    assert np.all(np.linalg.norm(exact.sums, axis=1) <= exact.counts + 1e-12)  # unit rows
    assert exact.counts.sum() == 30


# ------------------------------------------------------------------ noise
def test_noise_std_is_sigma_sqrt3_and_secret_by_default() -> None:
    zero = dk.DPClusterStats(np.zeros((40, 100)), np.zeros(40), np.zeros(40))
    sigma = 2.5
    noisy = dk.noisy_statistics(zero, sigma, seed=7)
    draws = noisy.vector()
    assert noisy.noise_std == pytest.approx(sigma * SQRT3)
    assert draws.std() == pytest.approx(sigma * SQRT3, rel=0.03)
    assert abs(draws.mean()) < 4 * sigma * SQRT3 / math.sqrt(draws.size)
    for block in (noisy.sums.ravel(), noisy.counts, noisy.sqdist):  # every block is noised
        assert np.all(block != 0)
    assert np.array_equal(dk.noisy_statistics(zero, sigma, seed=7).vector(), draws)
    assert not np.array_equal(dk.noisy_statistics(zero, sigma).vector(), dk.noisy_statistics(zero, sigma).vector())
    with pytest.raises(ValueError):
        dk.noisy_statistics(zero, 0.0)


# ------------------------------------------------------------ site half
def _request(centroids: np.ndarray, iteration: int, **config: Any) -> Payload:
    return Payload(arrays={"centroids": centroids}, config={"iteration": iteration, **config})


def test_site_uses_its_own_sigma_and_refuses_releases_beyond_its_plan() -> None:
    cfg = _cfg(epsilon=8.0, iterations=1, k=2, dim=4)
    plan = budget_plan(cfg.privacy)
    assert plan.cluster_releases == KMEANS_INIT_ITERATIONS + 1 == dk.START_RELEASES + 1
    rng = np.random.default_rng(2)
    u = dk.unit_rows(rng.standard_normal((200, 4)))
    site = FakeSite("a", cfg, u)
    c = dk.unit_rows(rng.standard_normal((3, 4)))
    for it in range(plan.cluster_releases):
        # a server asking for less noise is ignored: sigma comes from the site's config
        reply = site_release(site, _request(c, it, **{"noise-multiplier": 1e-3, "sigma": 1e-3}), seed=it)  # type: ignore[arg-type]
        expected = dk.noisy_statistics(dk.cluster_statistics(u, c), plan.cluster_noise, seed=it)
        assert np.array_equal(reply.arrays["sums"], expected.sums)
        assert reply.metrics["noise-std"] == pytest.approx(plan.cluster_noise * SQRT3)
    ledger = site.ledger()
    releases = [r for r in ledger.releases if r.kind == "dp-kmeans"]
    assert [r.round for r in releases] == list(range(plan.cluster_releases))
    assert all(r.noise_multiplier == plan.cluster_noise for r in releases)
    # the same request again (a lost reply): the same answer, no new release
    again = site_release(site, _request(c, plan.cluster_releases - 1))  # type: ignore[arg-type]
    assert np.array_equal(again.arrays["sums"], reply.arrays["sums"])
    assert len(site.ledger().releases) == plan.cluster_releases
    # beyond the plan, or a repeat with other centroids: refused, recorded, nothing released
    with pytest.raises(PrivacyBudgetExceeded, match="plan"):
        site_release(site, _request(c, plan.cluster_releases))  # type: ignore[arg-type]
    with pytest.raises(PrivacyBudgetExceeded, match="already released"):
        site_release(site, _request(c[::-1].copy(), 0))  # type: ignore[arg-type]
    after = site.ledger()
    assert len(after.releases) == plan.cluster_releases
    assert {r["kind"] for r in after.refusals} == {"dp-kmeans"} and len(after.refusals) == 2


def test_site_refuses_when_its_ledger_budget_is_spent_and_saves_the_refusal() -> None:
    cfg = _cfg(epsilon=8.0, iterations=1, k=2, dim=4)
    site = FakeSite("b", cfg, dk.unit_rows(np.random.default_rng(3).standard_normal((50, 4))), budget=0.01)
    with pytest.raises(PrivacyBudgetExceeded, match="budget"):
        site_release(site, _request(np.eye(4)[:2], 0))  # type: ignore[arg-type]
    ledger = site.ledger()
    assert ledger.releases == [] and len(ledger.refusals) == 1 and site.saves == 1


@pytest.mark.parametrize(
    ("centroids", "iteration", "match"),
    [
        (np.ones((9, 4)), 0, "centroids asked"),  # more than 4 x n-domains (2)
        (np.ones((2, 5)), 0, "shape"),  # not the embedding's dimension
        (np.full((2, 4), np.nan), 0, "finite"),
        (np.ones((2, 4)), 1, "before iteration 0"),  # out of order
        (np.ones((2, 4)), -1, "non-negative"),
    ],
)
def test_site_refuses_absurd_requests_without_releasing(centroids: np.ndarray, iteration: int, match: str) -> None:
    site = FakeSite("c", _cfg(iterations=1, k=2, dim=4), dk.unit_rows(np.ones((10, 4))))
    with pytest.raises(ValueError, match=match):
        site_release(site, _request(centroids, iteration))  # type: ignore[arg-type]
    assert site.ledger().releases == []


def test_phase_answers_through_its_site_half() -> None:
    site = FakeSite("d", _cfg(iterations=1, k=2, dim=4), dk.unit_rows(np.ones((10, 4))))
    phase = DPKMeansPhase()
    assert phase.enabled(Run(_cfg(), {}, folder=None))  # type: ignore[arg-type]
    assert not phase.enabled(Run(ExperimentConfig(), {}, folder=None))  # type: ignore[arg-type]
    reply = phase.answer(site, Query.DP_CLUSTER_STATS, _request(np.eye(4)[:2], 0))  # type: ignore[arg-type]
    assert reply.arrays["sums"].shape == (2, 4) and reply.metrics["num-examples"] == 10
    assert len(site.ledger().releases) == 1


# ---------------------------------------------------------------- utility
def test_dp_kmeans_recovers_separated_clusters_at_epsilon_8_and_4() -> None:
    ari8, run, sites = _dp_kmeans_ari(8.0, seed=0)
    assert ari8 >= 0.9
    plan = plan_budget(8.0, 1e-5, 6)
    assert run.report["dp-kmeans-releases"] == plan.cluster_releases == 8
    assert run.report["kmeans-iterations"] == 6
    assert run.report["dp-kmeans-noise-std"] == pytest.approx(plan.cluster_noise * SQRT3 * math.sqrt(len(sites)))
    assert run.domains is not None and run.kmeans_starts[0] is run.domains.centroids
    assert np.allclose(np.linalg.norm(run.domains.centroids, axis=1), 1.0)
    assert run.domains.centroids.shape == (5, 16) and 0 < run.domains.variance < 1
    for site in sites:  # exactly the plan, each at the plan's noise
        kinds = [(r.kind, r.round, r.noise_multiplier) for r in site.ledger().releases]
        assert kinds == [("dp-kmeans", i, plan.cluster_noise) for i in range(plan.cluster_releases)]
    ari4, _, _ = _dp_kmeans_ari(4.0, seed=1)
    assert ari4 >= 0.7


def test_reduction_finds_the_centres_of_weighted_candidates() -> None:
    rng = np.random.default_rng(4)
    centres = dk.unit_rows(rng.standard_normal((3, 8)))
    cands = np.vstack([dk.unit_rows(c + 0.05 * rng.standard_normal((4, 8))) for c in centres])
    cands = np.vstack([cands, dk.unit_rows(rng.standard_normal((2, 8)))])  # two stray candidates, little weight
    weights = np.r_[np.full(12, 100.0), 1.0, 1.0]
    found = dk.reduce_centroids(cands, weights, 3, seed=0)
    assert np.all(np.max(found @ centres.T, axis=0) > 0.99)


def test_a_dead_centroid_is_moved_to_split_the_largest_cluster() -> None:
    c = dk.unit_rows(np.eye(3))
    stats = dk.DPClusterStats(np.diag([900.0, 50.0, 1.0]), np.array([1000.0, 60.0, 1.0]), np.zeros(3), noise_std=5.0)
    new, kept = dk.lloyd_update(stats, c)
    assert kept.tolist() == [False, False, True]
    split, moved = dk.split_largest(new, kept, stats.counts, seed=0)
    assert moved.tolist() == [True, False, True]
    assert split[0] @ c[0] > 0.99 and split[2] @ c[0] > 0.99 and not np.allclose(split[0], split[2])


# -------------------------------------------------------------- smoothing
def test_smoothing_by_hand() -> None:
    z = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    neighbors = np.array([[1, -1], [0, 2], [-1, -1], [0, -1]], dtype=np.int64)
    out = smooth_embedding(z, neighbors)
    h = 1 / math.sqrt(2)
    expected = np.array([[h, h], [2 / math.sqrt(5), 1 / math.sqrt(5)], [1.0, 0.0], [1.0, 0.0]])
    assert np.allclose(out, expected)
    assert np.allclose(smooth_embedding(z, neighbors, hops=2), smooth_embedding(out, neighbors))
    assert np.allclose(smooth_embedding(z, neighbors, hops=0), [[1, 0], [0, 1], [1, 0], [0, 0]])
    assert np.allclose(smooth_embedding(z, np.zeros((4, 0), dtype=np.int64)), [[1, 0], [0, 1], [1, 0], [0, 0]])
    with pytest.raises(ValueError, match="neighbour ids"):
        smooth_embedding(z, np.array([[4], [0], [0], [0]]))


def _grid_section(rng: np.random.Generator, side: int, centres: np.ndarray, noise: float) -> tuple[np.ndarray, ...]:
    """A ``side x side`` grid in four quadrant domains; noisy per-cell unit embeddings;
    the 8 grid neighbours of each cell (``-1`` past the border)."""
    yy, xx = np.mgrid[0:side, 0:side]
    y = ((2 * xx) // side + 2 * ((2 * yy) // side)).ravel()
    d = centres.shape[1]
    u = dk.unit_rows(centres[y] + noise * rng.standard_normal((len(y), d)) / math.sqrt(d))
    neighbors = []
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        if dy == dx == 0:
            continue
        ny, nx = yy + dy, xx + dx
        inside = (ny >= 0) & (ny < side) & (nx >= 0) & (nx < side)
        neighbors.append(np.where(inside, ny * side + nx, -1).ravel())
    return u, y, np.stack(neighbors, axis=1).astype(np.int64)


def test_smoothed_embeddings_assigned_to_dp_centroids_beat_per_cell_assignment() -> None:
    rng = np.random.default_rng(1)
    centres = dk.unit_rows(rng.standard_normal((4, 16)))
    sections = [_grid_section(rng, 40, centres, noise=1.4) for _ in range(3)]
    sigma = plan_budget(8.0, 1e-5, 6).cluster_noise

    def release(c: np.ndarray, iteration: int) -> dk.DPClusterStats:
        return dk.merge_statistics([
            dk.noisy_statistics(dk.cluster_statistics(u, c), sigma, seed=100 * iteration + i)
            for i, (u, _, _) in enumerate(sections)
        ])

    result = dk.fit_dp_kmeans(release, k=4, dim=16, releases=8, seed=1)
    truth = np.concatenate([y for _, y, _ in sections])
    per_cell = np.concatenate([np.argmax(u @ result.centroids.T, axis=1) for u, _, _ in sections])
    smoothed = np.concatenate([np.argmax(smooth_embedding(u, nb) @ result.centroids.T, axis=1) for u, _, nb in sections])
    ari_cell, ari_smooth = adjusted_rand_score(truth, per_cell), adjusted_rand_score(truth, smoothed)
    assert ari_smooth >= 0.9
    assert ari_smooth >= ari_cell + 0.1
