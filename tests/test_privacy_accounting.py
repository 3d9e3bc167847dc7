"""The PLD accountant of node-level DP-SGD against independent numerical computations.

Everything numeric here uses numpy/scipy only (closed-form Gaussian tails, exact
privacy-loss distributions on a fine grid composed by FFT), never ``dp-accounting``:

- the pair the accountant composes per step (the noise split: the cell's own sample as a
  Poisson-subsampled Gaussian, ``(1-q) N(0) + q N(1)`` vs ``N(0)``, std ``s/sqrt(S)``, and D
  substituted neighbour samples ``(1-q) N(0) + q N(-1)`` vs ``(1-q) N(0) + q N(1)``, std
  ``s sqrt(2/S)``, units of C, ``S = 1 + 2D``);
- the worst configuration we know that a step can actually face: every affected sample
  moves the sum the same way at its largest change, the neighbours keeping their sampling
  coins in both datasets (with the cell ``sum w N(b + k)``, without it ``sum w N(-k)``,
  ``k ~ Binomial(D, q)``, ``b ~ Bernoulli(q)``). Its epsilon is a lower bound of the
  mechanism's true worst case, so an accountant that reports less is wrong (the negative
  controls below do).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import logsumexp
from scipy.stats import binom, norm

from fedspatial.shared.config import load_config
from fedspatial.shared.privacy.accounting import (
    DISCRETIZATION,
    Mechanism,
    NodeBound,
    calibrate_noise,
    delta_of,
    epsilon_of,
    rdp_epsilon_of,
)
from fedspatial.shared.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger, Release

logger = logging.getLogger(__name__)
DELTA = 1e-5


# ------------------------------------------------------------------ exact one-step pair
def _subsampled_gaussian_delta(q: float, s: float, eps: float) -> float:
    """Exact delta(eps) of ``(1-q) N(0, s^2) + q N(1, s^2)`` vs ``N(0, s^2)``, worse of the two
    directions. The privacy loss is increasing in x: each region is a half-line (brentq)."""

    def loss(x: float) -> float:
        return math.log1p(q * math.expm1((x - 0.5) / s**2))

    span = 60 * (s * s + s + 1)
    x_r = brentq(lambda x: loss(x) - eps, -span, span)
    remove = q * norm.sf(x_r, 1, s) + (1 - q) * norm.sf(x_r, 0, s) - math.exp(eps) * norm.sf(x_r, 0, s)
    if -math.log1p(-q) <= eps:
        return max(remove, 0.0)
    x_a = brentq(lambda x: -loss(x) - eps, -span, span)
    add = norm.cdf(x_a, 0, s) - math.exp(eps) * (q * norm.cdf(x_a, 1, s) + (1 - q) * norm.cdf(x_a, 0, s))
    return max(remove, add, 0.0)


# ------------------------------------------------------- numeric PLD on a grid (numpy FFT)
H = 2e-4  # privacy-loss bin of the numeric PLDs (nearest rounding: unbiased)
PMF = tuple[int, np.ndarray]  # (index of the first bin, probabilities)


def _loss_pmf(loss: np.ndarray, weight: np.ndarray) -> PMF:
    keep = weight > 1e-30
    idx = np.rint(loss[keep] / H).astype(np.int64)
    pmf = np.bincount(idx - idx.min(), weights=weight[keep])
    return int(idx.min()), pmf / pmf.sum()


def _convolve(a: PMF, b: PMF) -> PMF:
    n = len(a[1]) + len(b[1]) - 1
    size = 1 << (n - 1).bit_length()
    out = np.fft.irfft(np.fft.rfft(a[1], size) * np.fft.rfft(b[1], size), size)[:n]
    return a[0] + b[0], np.clip(out, 0, None)


def _power(a: PMF, steps: int) -> PMF:
    n = steps * (len(a[1]) - 1) + 1
    size = 1 << (n - 1).bit_length()
    return steps * a[0], np.clip(np.fft.irfft(np.fft.rfft(a[1], size) ** steps, size)[:n], 0, None)


def _delta(a: PMF, eps: float) -> float:
    losses = (np.arange(len(a[1])) + a[0]) * H
    tail = losses > eps
    return float(np.sum(a[1][tail] * -np.expm1(eps - losses[tail])))


def _epsilon(directions: list[PMF], steps: int, delta: float = 1e-5) -> float:
    """Epsilon at ``delta`` after ``steps`` self-compositions, worse of the two directions."""
    worst = 0.0
    for a in directions:
        composed = _power(a, steps)
        if _delta(composed, 0.0) > delta:
            top = (len(composed[1]) + composed[0]) * H + 1.0
            worst = max(worst, brentq(lambda e, c=composed: _delta(c, e) - delta, 0.0, top, xtol=1e-5))
    return worst


def _log_mixture(x: np.ndarray, means: np.ndarray, weights: np.ndarray, s: float) -> np.ndarray:
    keep = weights > 0
    z = (x[:, None] - means[keep][None, :]) / s
    return logsumexp(-z**2 / 2 + np.log(weights[keep])[None, :], axis=1) - math.log(s * math.sqrt(2 * math.pi))


def _pair(log_p: np.ndarray, log_q: np.ndarray, dx: float) -> list[PMF]:
    """Remove and add direction of the pair (P, Q) given on a grid."""
    return [_loss_pmf(log_p - log_q, np.exp(log_p) * dx), _loss_pmf(log_q - log_p, np.exp(log_q) * dx)]


def worst_configuration(q: float, s: float, d: int) -> list[PMF]:
    """One step of the coupled worst configuration (units of C, noise std ``s``)."""
    x = np.linspace(-d - 14 * s, d + 1 + 14 * s, 200_001)
    w, k = binom.pmf(np.arange(d + 1), d, q), np.arange(d + 1.0)
    log_with = _log_mixture(x, np.concatenate([k, k + 1]), np.concatenate([w * (1 - q), w * q]), s)
    return _pair(log_with, _log_mixture(x, -k, w, s), x[1] - x[0])


def accountants_pair(q: float, s: float, d: int) -> list[PMF]:
    """One step of the pair the accountant composes (noise split), on a grid."""
    def subsampled(sd: float, low: float, high: float) -> list[PMF]:
        x = np.linspace(-2 - 14 * sd, 2 + 14 * sd, 100_001)
        lp = _log_mixture(x, np.array([0.0, high]), np.array([1 - q, q]), sd)
        return _pair(lp, _log_mixture(x, np.array([0.0, low]), np.array([1 - q, q]), sd), x[1] - x[0])

    ego = subsampled(s / math.sqrt(1 + 2 * d), 0.0, 1.0)
    neighbour = subsampled(s * math.sqrt(2 / (1 + 2 * d)), -1.0, 1.0)
    out = []
    for direction in (0, 1):
        pmf = ego[direction]
        for _ in range(d):
            pmf = _convolve(pmf, neighbour[direction])
        out.append(pmf)
    return out


def _node(s: float, q: float, d: int) -> Mechanism:
    """The accountant's mechanism for noise std ``s`` (units of C): sigma_node = s / (1 + 2D)."""
    return Mechanism(s / NodeBound(d).sensitivity, q, d)


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("q", "s", "d"), [(0.05, 4.0, 0), (0.3, 1.5, 0), (0.05, 4.0, 6), (0.25, 4.0, 2), (0.06, 13.0, 6)])
def test_one_step_delta_matches_the_numeric_pair(q, s, d):
    """One step: the accountant's delta(eps) equals the pair it composes computed
    independently (D = 0: closed form, to 1e-9 relative below and one privacy-loss bin
    above; D > 0: numeric grid, 1 % + 1e-9), and is never below the worst configuration's."""
    mech = _node(s, q, d)
    pair, worst = accountants_pair(q, s, d), worst_configuration(q, s, d)
    for eps in (0.1, 0.5, 1.0, 2.0):
        got = delta_of([(mech, 1)], eps)
        if d == 0:
            exact = _subsampled_gaussian_delta(q, s, eps)
            assert exact * (1 - 1e-9) <= got <= _subsampled_gaussian_delta(q, s, eps - DISCRETIZATION) + 1e-12, eps
        numeric = max(_delta(a, eps) for a in pair)
        assert got == pytest.approx(numeric, rel=0.01, abs=1e-9), (eps, got, numeric)
        assert got >= max(_delta(a, eps) for a in worst) * (1 - 1e-4) - 1e-9, eps


@pytest.mark.parametrize("d", [1, 6])
@pytest.mark.parametrize("q", [0.05, 0.25])
def test_reported_epsilon_bounds_the_worst_configuration(q, d):
    """Over a grid of (q, s, D, steps): the accountant's epsilon is never below the numeric
    epsilon of the worst configuration (grid slack 0.002) and at most 1.5 x it + 0.05; it
    agrees with its own pair composed numerically to 1 % + 0.005."""
    for s in (4.0, 16.0):
        pair, worst = accountants_pair(q, s, d), worst_configuration(q, s, d)
        for steps in (1, 30):
            got = epsilon_of([(_node(s, q, d), steps)], DELTA)
            low, own = _epsilon(worst, steps), _epsilon(pair, steps)
            logger.info("q %g s %g D %d steps %d: accountant %.4f, own pair %.4f, worst configuration %.4f",
                        q, s, d, steps, got, own, low)
            assert got >= low - 0.002, (s, steps, got, low)
            assert got <= 1.5 * low + 0.05, (s, steps, got, low)
            assert got == pytest.approx(own, rel=0.01, abs=0.005), (s, steps, got, own)


def test_group_blind_and_one_sided_accountants_fail_the_upper_bound():
    """Negative controls on the worst configuration: ignoring the group (D = 0: a subsampled
    Gaussian on one sample at the same noise) reports far less epsilon; the one-sided
    mixture (all affected samples on the side of the cell, its absence a plain Gaussian, as
    a ``MixtureOfGaussiansDpEvent`` would account it) has less delta in the add direction,
    so it is no dominating pair for this relation."""
    q, s, d, steps = 0.25, 4.0, 6, 30
    worst = _epsilon(worst_configuration(q, s, d), steps)
    assert epsilon_of([(Mechanism(s, q), steps)], DELTA) < 0.5 * worst  # sensitivity C, rate q
    assert epsilon_of([(_node(s, q, d), steps)], DELTA) >= worst - 0.002
    q, s, eps = 0.5, 5.0, 1.0
    x = np.linspace(-d - 14 * s, d + 1 + 14 * s, 200_001)
    w, k = binom.pmf(np.arange(d + 1), d, q), np.arange(d + 1.0)
    one_sided = _log_mixture(x, np.concatenate([2 * k, 2 * k + 1]), np.concatenate([w * (1 - q), w * q]), s)
    one_sided_add = _delta(_pair(one_sided, norm.logpdf(x, 0, s), x[1] - x[0])[1], eps)
    true_add = _delta(worst_configuration(q, s, d)[1], eps)
    assert one_sided_add < true_add - 0.02
    assert delta_of([(_node(s, q, d), 1)], eps) >= true_add


def test_substitution_pair_dominates_two_dimensional_configurations():
    """Assumption 2 of the accounting, checked numerically: a sample that keeps its coin and
    whose contribution moves from g to g' (|g|, |g'| <= 1) in the plane is no easier to
    detect than the collinear opposite case g = -g' the accountant uses."""
    s, q = 1.0, 0.5
    g = np.linspace(-10.5, 10.5, 841)
    xx, yy = np.meshgrid(g, g)
    area = (g[1] - g[0]) ** 2

    def mix(point: tuple[float, float]) -> np.ndarray:
        bump = np.exp(-((xx - point[0]) ** 2 + (yy - point[1]) ** 2) / (2 * s * s))
        return ((1 - q) * np.exp(-(xx**2 + yy**2) / (2 * s * s)) + q * bump) / (2 * np.pi * s * s)

    def delta(p: np.ndarray, r: np.ndarray, eps: float) -> float:
        return float(max(np.sum(np.maximum(p - math.exp(eps) * r, 0)), np.sum(np.maximum(r - math.exp(eps) * p, 0))) * area)

    base_p, base_q = mix((1.0, 0.0)), mix((-1.0, 0.0))
    for angle, r1, r2 in ((0.6, 1.0, 1.0), (1.6, 1.0, 1.0), (2.6, 1.0, 0.6), (3.0, 0.7, 1.0)):
        p, r = mix((r1, 0.0)), mix((r2 * math.cos(angle), r2 * math.sin(angle)))
        for eps in (0.0, 0.3, 1.0):
            assert delta(p, r, eps) <= delta(base_p, base_q, eps) + 1e-6, (angle, r1, r2, eps)


def _old_calibration(target: float, q_node: float, steps: int) -> float:
    """The previous calibration (bisection on the RDP group reduction), for comparison."""
    low, high = 0.0, 64.0
    while high - low > 0.01:
        mid = (low + high) / 2
        low, high = (mid, high) if rdp_epsilon_of([(mid, q_node, steps)], DELTA) > target else (low, mid)
    return high


def test_demo_setting_needs_far_less_noise(capsys):
    """The demo (configs/demo.yaml with configs/privacy.yaml's privacy block: batch 128, 2
    local epochs, 30 rounds, D = n-neighbors = 6, C = 1, delta 1e-5, target epsilon 8) on
    its largest site (2,153 cells, benchmarks/results/privacy.md)."""
    root = Path(__file__).resolve().parents[1]
    demo, dp = load_config(root / "configs/demo.yaml"), load_config(root / "configs/privacy.yaml")
    t, p = demo.training, dp.privacy
    batch, epochs, rounds = t.batch_size, t.local_epochs, t.num_rounds
    d = p.max_degree or demo.neighbors.n_neighbors
    assert (batch, epochs, rounds, d, p.max_grad_norm, p.delta, p.target_epsilon) == (128, 2, 30, 6, 1.0, DELTA, 8.0)
    n = 2153
    q = batch / n
    steps = rounds * epochs * int(1 / q)
    q_node = NodeBound(d).sample_rate(q)
    old_sigma = _old_calibration(8.0, q_node, steps)
    sens = NodeBound(d).sensitivity
    old_eps_rdp = rdp_epsilon_of([(Mechanism(old_sigma, q, d), steps)], DELTA)
    new_eps_at_old = epsilon_of([(Mechanism(old_sigma, q, d), steps)], DELTA)
    worst_at_old = _epsilon(worst_configuration(q, old_sigma * sens, d), steps)
    new_sigma = calibrate_noise(target_epsilon=8.0, delta=DELTA, sample_rate=q, steps=steps, degree_bound=d)
    new_eps = epsilon_of([(Mechanism(new_sigma, q, d), steps)], DELTA)
    worst_at_new = _epsilon(worst_configuration(q, new_sigma * sens, d), steps)
    with capsys.disabled():
        print(
            f"\ndemo (n {n}, q {q:.4f}, {steps} steps, D {d}, delta {DELTA:g}):\n"
            f"  old sigma_node {old_sigma:.3f}: RDP group reduction eps {old_eps_rdp:.3f}, PLD eps {new_eps_at_old:.3f}, "
            f"worst configuration (numeric) {worst_at_old:.3f}\n"
            f"  new sigma_node at eps 8: {new_sigma:.3f} (was {old_sigma:.3f}); PLD eps {new_eps:.3f}, "
            f"worst configuration (numeric) {worst_at_new:.3f}"
        )
    assert old_eps_rdp == pytest.approx(8.0, abs=0.05)
    assert worst_at_old - 0.002 <= new_eps_at_old < old_eps_rdp / 3
    assert 7.99 <= new_eps <= 8.0 and worst_at_new - 0.002 <= new_eps
    assert new_sigma < old_sigma / 3


def test_old_ledger_file_loads_and_is_accounted_exactly(tmp_path):
    """A ledger written before the degree bound and per-sample rate were recorded still
    loads (context state and file); its DP-SGD entries are recovered exactly from the
    recorded node-level rate and the per-sample rate in ``details``; the budget still refuses."""
    q, d, sigma = 0.07, 6, 1.1
    old = {
        "site": "s", "delta": DELTA, "budget_epsilon": 3.0, "target_epsilon": 3.0, "max_grad_norm": 1.0,
        "degree_bound": d, "node_noise_multiplier": sigma, "refusals": [],
        "releases": [
            {"kind": "feature-stats", "round": 0, "noise_multiplier": 4.0, "sample_rate": 1.0, "steps": 1,
             "epsilon_after": 0.0, "details": {"noise-multiplier": 9.8}},
            {"kind": "dp-sgd", "round": 1, "noise_multiplier": sigma, "sample_rate": NodeBound(d).sample_rate(q),
             "steps": 25, "epsilon_after": 0.0, "details": {"sample-rate": q}},
        ],
    }
    ledger = PrivacyLedger.from_json(json.dumps(old))
    assert [r.mechanism for r in ledger.releases] == [Mechanism(4.0, 1.0), Mechanism(sigma, q, d)]
    assert ledger.epsilon == pytest.approx(epsilon_of([(Mechanism(4.0), 1), (Mechanism(sigma, q, d), 25)], DELTA))
    restored = [Release(**r) for r in json.loads(ledger.write(tmp_path).read_text())["releases"]]
    assert [r.mechanism for r in restored] == [r.mechanism for r in ledger.releases]
    # Without the per-sample rate the entry is charged without amplification by sampling.
    bare = Release("dp-sgd", 1, sigma, NodeBound(d).sample_rate(q), 25)
    assert bare.mechanism == Mechanism(sigma) and epsilon_of([(bare.mechanism, 25)], DELTA) > ledger.epsilon
    with pytest.raises(PrivacyBudgetExceeded, match="site s: dp-sgd of round 2"):
        ledger.check("dp-sgd", 2, sigma, NodeBound(d).sample_rate(q), 2000, degree_bound=d, ego_sample_rate=q)
    assert ledger.refusals[0]["round"] == 2
