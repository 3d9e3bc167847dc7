"""The private feature release (issue 13, hole 1): every statistic that shapes a site's
model inputs is released once, through one Gaussian mechanism with a bounded per-cell
contribution, charged once; under local DP a cell's input depends on its own counts
and released statistics only."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from flwr.app import RecordDict
from scipy import sparse

from fedspatial.client.data_source import NodeData
from fedspatial.client.site import ContextState, SiteRuntime
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.sections import SiteSection, section_features
from fedspatial.shared.data.synthetic import SyntheticSpec, make_synthetic_federation
from fedspatial.shared.features.feature_stats import (
    ClippedStats,
    clip_cells,
    clipped_moments,
    compute_clipped_stats,
    compute_feature_stats,
)
from fedspatial.shared.features.harmonization import HarmonizationError
from fedspatial.shared.features.highly_variable import MEAN_NOISE_STDS
from fedspatial.shared.features.normalization import log1p_matrix, normalize_total_f64
from fedspatial.shared.features.selection import FeatureSpace, build_feature_space, transform
from fedspatial.shared.phases.feature_space import FeatureSpacePhase, federated_feature_stats
from fedspatial.shared.phases.setup import store_setup
from fedspatial.shared.privacy.accounting import Mechanism, epsilon_of
from fedspatial.shared.privacy.budget import budget_plan
from fedspatial.shared.privacy.feature_release import (
    block_noise_multiplier,
    gaussian_release,
    release_bounds,
)
from fedspatial.shared.protocol.feature_space import feature_space_to_config
from fedspatial.shared.protocol.names import Query
from fedspatial.shared.protocol.payload import Payload

T = 1e4
SPEC = dataclasses.replace(SyntheticSpec(seed=5), sections_per_site=(2, 1, 1), spots_per_section=(80, 110), n_features=60)


@pytest.fixture(scope="module")
def federation() -> dict[str, list[ad.AnnData]]:
    return make_synthetic_federation(SPEC)


def _features(fed: dict[str, list[ad.AnnData]]) -> list[str]:
    return [str(f) for f in next(iter(fed.values()))[0].var_names]


def _site(tmp_path: Path, adatas: list[ad.AnnData], run: Mapping[str, object], state: RecordDict | None = None) -> SiteRuntime:
    """A site serving ``adatas`` (in memory), with its ledger under ``tmp_path``."""
    site = SiteRuntime(NodeData("hospital_a", (), tmp_path, None, None), ExperimentConfig.from_run_config(run))
    site.__dict__["sections"] = [SiteSection("hospital_a", f"s{i}", tmp_path, a) for i, a in enumerate(adatas)]
    site.state = ContextState(state if state is not None else RecordDict())
    return site


def _ask_stats(site: SiteRuntime, features: list[str]) -> Payload:
    return FeatureSpacePhase().answer(site, Query.FEATURE_STATS, Payload(config={"features": features, "target-sum": T}))


def _feature_stats_releases(site: SiteRuntime) -> list[object]:
    return [r for r in site.ledger().releases if r.kind == "feature-stats"]


# -- 1. per-cell contribution -------------------------------------------------------------------
def _adversarial_cells(n_features: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    one_gene = np.zeros(n_features)
    one_gene[3] = 5_000
    few = np.zeros(n_features)
    few[:8] = 1_000  # concentrated on a few genes: the square's worst case under the norm clip
    sparse_random = np.where(rng.random(n_features) < 0.05, rng.integers(1, 50, n_features), 0).astype(float)
    return {
        "one gene": one_gene, "eight genes": few, "even": np.full(n_features, 7.0),
        "random sparse": sparse_random, "zero": np.zeros(n_features), "one count": np.eye(n_features)[0],
    }


@pytest.mark.parametrize("feature_clip", [20.0, 5.0, 100.0])
@pytest.mark.parametrize("as_sparse", [False, True])
def test_one_cell_moves_each_block_by_at_most_its_bound(feature_clip: float, as_sparse: bool) -> None:
    rng = np.random.default_rng(0)
    n_features = 200
    bounds = release_bounds(feature_clip, T)
    background = rng.poisson(3.0, size=(30, n_features)).astype(float)
    names = [f"g{i}" for i in range(n_features)]
    exceeded = False
    for label, cell in _adversarial_cells(n_features, rng).items():
        def stats(x: np.ndarray) -> ClippedStats:
            adata = ad.AnnData(sparse.csr_matrix(x) if as_sparse else x)
            adata.var_names = names
            return compute_clipped_stats(
                adata, names, target_sum=T, clip_norm=bounds.clip_norm, clip_square=bounds.clip_square
            )

        with_cell, without = stats(np.vstack([background, cell])), stats(background)
        d_sum = np.linalg.norm(with_cell.sum_clipped - without.sum_clipped)
        d_sq = np.linalg.norm(with_cell.sumsq_clipped - without.sumsq_clipped)
        assert d_sum <= bounds.clip_norm * (1 + 1e-12), (label, d_sum)
        assert d_sq <= bounds.clip_square * (1 + 1e-12), (label, d_sq)
        # negative control: the same cell without the clip breaks a bound in some case
        raw = np.log1p(normalize_total_f64(cell[None, :], T))[0]
        exceeded |= bool(np.linalg.norm(raw) > bounds.clip_norm or np.linalg.norm(raw**2) > bounds.clip_square)
    # (with R = 100 no 200-gene cell reaches a bound: at most sqrt(200) log1p(50) = 56)
    assert exceeded == (feature_clip <= 20)
    # the bounds the noise uses: the documented rule
    r = feature_clip
    assert bounds.clip_norm == r and bounds.clip_square == min(min(math.log1p(T), r) * r, r * r / 8)


def test_clipping_is_per_row_and_the_square_bound_scales_not_distorts() -> None:
    rng = np.random.default_rng(1)
    x = np.log1p(rng.poisson(2.0, size=(50, 40)).astype(float) * 30)
    clipped = clip_cells(x, 5.0, 3.0)
    ratio = clipped / np.where(x == 0, 1, x)
    for row, xr in zip(ratio, x, strict=True):  # one factor per cell: the square stays the input's square
        assert np.allclose(row[xr > 0], row[xr > 0][0])
    assert np.array_equal(clip_cells(x[7:8], 5.0, 3.0), clipped[7:8])  # a row alone: bit-identical
    csr = sparse.csr_matrix(x)
    clipped_csr = sparse.csr_matrix(clip_cells(csr, 5.0, 3.0)).toarray()
    assert np.array_equal(sparse.csr_matrix(clip_cells(csr[7:8], 5.0, 3.0)).toarray(), clipped_csr[7:8])
    np.testing.assert_allclose(clipped_csr, clipped, rtol=1e-12)  # the same values, up to summation order
    assert np.all(np.linalg.norm(clipped, axis=1) <= 5.0) and np.all(np.linalg.norm(clipped**2, axis=1) <= 3.0)


# -- 2. noise std and composition ------------------------------------------------------------------
def test_noise_std_matches_the_plan() -> None:
    cfg = ExperimentConfig.from_run_config({"local-dp": True, "target-epsilon": 8.0})
    sigma = budget_plan(cfg.privacy).feature_noise
    bounds = release_bounds(cfg.privacy.feature_clip, T)
    n_features = 4000
    zero = ClippedStats([f"g{i}" for i in range(n_features)], 10, np.zeros(n_features), np.zeros(n_features),
                        bounds.clip_norm, bounds.clip_square)
    release = gaussian_release([("a/s0", zero), ("a/s1", zero), ("a/s2", zero)], target_sum=T, noise_multiplier=sigma, seed=7)
    b = block_noise_multiplier(sigma)
    assert release.sums.std() == pytest.approx(b * bounds.clip_norm, rel=0.02)  # 12,000 draws
    assert release.sumsq.std() == pytest.approx(b * bounds.clip_square, rel=0.04)  # 4,000 draws
    # two blocks with multiplier b compose to one Gaussian mechanism with multiplier sigma
    assert 1 / math.sqrt(2 / b**2) == pytest.approx(sigma, rel=1e-12)
    # what the site sends: the sum of 3 section sums and the site's squares, with their noise variance
    sent = release.site_stats()
    assert sent.noise_var_sum == pytest.approx(3 * (b * bounds.clip_norm) ** 2)
    assert sent.noise_var_sumsq == pytest.approx((b * bounds.clip_square) ** 2)
    assert sent.sum_clipped.std() == pytest.approx(math.sqrt(sent.noise_var_sum), rel=0.04)
    # a fixed seed reproduces the draw; another does not
    again = gaussian_release([("a/s0", zero), ("a/s1", zero), ("a/s2", zero)], target_sum=T, noise_multiplier=sigma, seed=7)
    assert np.array_equal(again.sums, release.sums)
    assert not np.array_equal(gaussian_release([("a/s0", zero)], target_sum=T, noise_multiplier=sigma, seed=8).sums,
                              release.sums[:1])


# -- 3. one charge --------------------------------------------------------------------------------
def test_two_requests_charge_once_and_return_the_same_values(federation, tmp_path: Path) -> None:
    run = {"local-dp": True, "target-epsilon": 8.0}
    site = _site(tmp_path, federation["hospital_a"], run)
    features = _features(federation)
    first, second = _ask_stats(site, features), _ask_stats(site, features)
    for name in first.arrays:
        assert np.array_equal(first.arrays[name], second.arrays[name])
    assert first.metrics == second.metrics
    (charged,) = _feature_stats_releases(site)
    sigma = budget_plan(site.cfg.privacy).feature_noise
    assert charged.noise_multiplier == sigma and charged.steps == 1  # type: ignore[attr-defined]
    assert site.ledger().epsilon == pytest.approx(epsilon_of([(Mechanism(sigma), 1)], 1e-5))
    # a restarted runtime with the same state answers from it, without drawing or paying again
    restarted = _site(tmp_path, federation["hospital_a"], run, state=site.state.records)  # type: ignore[attr-defined]
    third = _ask_stats(restarted, features)
    assert all(np.array_equal(third.arrays[k], first.arrays[k]) for k in first.arrays)
    assert len(_feature_stats_releases(restarted)) == 1
    # the reply is noised: it differs from the exact clipped sums
    exact = compute_clipped_stats(federation["hospital_a"], features, target_sum=T,
                                  clip_norm=first.metrics["clip-norm"], clip_square=first.metrics["clip-square"])
    assert not np.allclose(first.arrays["sum_clipped"], exact.sum_clipped)


def test_feature_stats_noise_without_local_dp_is_the_same_release(federation, tmp_path: Path) -> None:
    site = _site(tmp_path, federation["hospital_b"], {"feature-stats-noise": 3.0})
    reply = _ask_stats(site, _features(federation))
    assert set(reply.arrays) == {"sum_clipped", "sumsq_clipped"}
    (charged,) = _feature_stats_releases(site)
    assert charged.noise_multiplier == 3.0  # type: ignore[attr-defined]


def test_without_privacy_the_reply_is_the_exact_aggregates(federation, tmp_path: Path) -> None:
    site = _site(tmp_path, federation["hospital_a"], {})
    features = _features(federation)
    reply = _ask_stats(site, features)
    exact = compute_feature_stats(federation["hospital_a"], features, target_sum=T).to_arrays()
    assert set(reply.arrays) == set(exact)
    assert all(np.array_equal(reply.arrays[k], exact[k]) for k in exact)
    assert _feature_stats_releases(site) == []


# -- 4. the hole: one cell no longer moves the others' inputs -------------------------------------------
class _Fed:
    """The three sites answering ``query.feature_stats`` in process."""

    def __init__(self, sites: dict[str, SiteRuntime]) -> None:
        self.by_name = sites

    def ask(self, query: str, payload: Payload, *, sites: list[str] | None = None, **_: object) -> dict[str, Payload]:
        return {n: FeatureSpacePhase().answer(s, query, payload) for n, s in sorted(self.by_name.items()) if n in (sites or self.by_name)}


def _space(fed: _Fed, features: list[str], n_top: int = 30) -> FeatureSpace:
    stats = federated_feature_stats(fed, sorted(fed.by_name), features=features, target_sum=T)  # type: ignore[arg-type]
    return build_feature_space(stats, n_top_features=n_top, target_sum=T)


@pytest.mark.parametrize("scale", ["section", "global"])
def test_removing_a_cell_leaves_every_other_input_row_bit_identical(federation, tmp_path: Path, scale: str) -> None:
    run = {"local-dp": True, "target-epsilon": 8.0, "scale": scale}
    sites = {name: _site(tmp_path / name, secs, run) for name, secs in federation.items()}
    space = _space(_Fed(sites), _features(federation))
    assert space.clip_norm is not None and np.all(np.isfinite(space.std))
    site = sites["hospital_a"]
    store_setup(site.state, Payload(config=feature_space_to_config(space)))
    full = site.feature_graph_data(site.setup()).x.numpy()
    # the same site, the same released statistics (its state), one cell of its first section gone
    removed = 17
    adatas = list(federation["hospital_a"])
    adatas[0] = adatas[0][np.arange(adatas[0].n_obs) != removed].copy()
    smaller = _site(tmp_path / "hospital_a", adatas, run, state=site.state.records)  # type: ignore[attr-defined]
    assert smaller.cfg.features.scale == scale
    fewer = smaller.feature_graph_data(smaller.setup()).x.numpy()
    assert np.array_equal(np.delete(full, removed, axis=0), fewer)
    assert len(_feature_stats_releases(smaller)) == 1  # no new release


def test_without_local_dp_section_statistics_stay_exact(federation, tmp_path: Path) -> None:
    """Negative control for the test above: the old per-section standardization (exact
    statistics of the section's own cells) moves every row when a cell goes."""
    features = _features(federation)
    site = _site(tmp_path, federation["hospital_a"], {})
    space = _space(_Fed({"hospital_a": site}), features)
    assert space.clip_norm is None and "clip_norm" not in space.to_config()
    section = site.sections[0]
    before = section_features(section, space, scale="section")
    keep = np.arange(section.adata.n_obs) != 17
    after = section_features(dataclasses.replace(section, adata=section.adata[keep].copy()), space, scale="section")
    assert not np.array_equal(before[keep], after)
    # and it is still the old computation: global standardization, then the section's own
    x = transform(section.adata, space).astype(np.float64)
    z = np.clip((x - x.mean(axis=0)) / np.where(x.std(axis=0, ddof=1) == 0, 1, x.std(axis=0, ddof=1)), -10, 10)
    np.testing.assert_allclose(before, z, rtol=1e-5, atol=1e-5)


def test_inputs_are_clipped_like_the_released_sums(federation, tmp_path: Path) -> None:
    run = {"local-dp": True, "target-epsilon": 8.0}
    sites = {name: _site(tmp_path / name, secs, run) for name, secs in federation.items()}
    space = _space(_Fed(sites), _features(federation))
    adata = federation["hospital_c"][0]
    cols = [space.shared.index(f) for f in space.selected]
    assert space.clip_norm is not None and space.clip_square is not None
    clipped = clip_cells(log1p_matrix(normalize_total_f64(adata.X.toarray(), T)), space.clip_norm, space.clip_square)
    centre = np.full(len(cols), 0.25)
    want = np.clip((clipped[:, cols] - centre) / space.std.astype(np.float64), -10, 10)
    np.testing.assert_allclose(transform(adata, space, mean=centre), want, rtol=1e-6, atol=1e-6)
    # the exact release of this section describes exactly those clipped values
    exact = compute_clipped_stats(adata, space.shared, target_sum=T, clip_norm=space.clip_norm, clip_square=space.clip_square)
    np.testing.assert_allclose(exact.sum_clipped, clipped.sum(axis=0), rtol=1e-10)


# -- 5. the server's space under noise -------------------------------------------------------------
def test_noisy_space_has_floors_no_nan_and_noise_cannot_win(federation) -> None:
    features = _features(federation)
    silent = [f"silent{i}" for i in range(40)]  # never expressed: their means are pure noise
    adatas = []
    for secs in federation.values():
        for a in secs:
            b = ad.AnnData(sparse.hstack([a.X, sparse.csr_matrix((a.n_obs, len(silent)))]).tocsr())
            b.var_names = features + silent
            adatas.append(b)
    bounds = release_bounds(20.0, T)
    names = features + silent
    exact = [(str(i), compute_clipped_stats(a, names, target_sum=T, clip_norm=bounds.clip_norm,
                                            clip_square=bounds.clip_square)) for i, a in enumerate(adatas)]
    for seed in range(15):
        stats = gaussian_release(exact, target_sum=T, noise_multiplier=8.6, seed=seed).site_stats()
        mean, _, floor, mean_noise = clipped_moments(stats)
        space = build_feature_space(stats, n_top_features=40, target_sum=T)
        chosen = np.isin(names, space.selected)
        assert np.all(np.isfinite(space.mean)) and np.all(np.isfinite(space.std)) and np.all(space.std > 0)
        assert np.all(mean[chosen] > MEAN_NOISE_STDS * mean_noise)  # noise-dominated means never compete
        assert not any(f.startswith("silent") for f in space.selected)
        assert np.all(space.std.astype(np.float64) ** 2 >= floor[chosen] * (1 - 1e-6))  # the variance floor
        assert np.all(space.mean >= 0)
    # far more noise than signal: a clear error naming what to change, not NaN
    n = stats.n_cells
    drowned = dataclasses.replace(stats, sum_clipped=np.full(len(names), 0.1 * n), noise_var_sum=float(n) ** 2)
    with pytest.raises(HarmonizationError, match="target-epsilon"):
        build_feature_space(drowned, n_top_features=40, target_sum=T)
