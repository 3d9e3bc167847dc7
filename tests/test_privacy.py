"""Node-level DP-SGD: per-sample gradients, accounting, ledger, noisy aggregates (no Flower)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

from fedspatial.shared.graph.neighbors import bound_in_degree, in_degree, knn_neighbors
from fedspatial.shared.models import CellAutoencoder, GATAutoencoder, NeighbourhoodAttention
from fedspatial.shared.privacy.dp import (
    LinearGhostClipping,
    Mechanism,
    NodeBound,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    Release,
    calibrate_noise,
    check_degree_bound,
    dp_train_epochs,
    epsilon_of,
    plan_round,
    poisson_batches,
    validate_model,
)
from fedspatial.shared.training.loop import GraphData, per_cell_data

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


class _Attention(nn.Module):
    """The ego form of the attention layer with a per-sample loss."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = NeighbourhoodAttention(6, 4)

    def loss(self, x, mask, batch=None):
        return (self.layer.forward_ego(x, mask) ** 2).sum(dim=1)


def _inputs(b=5, n=4, f=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, f, generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 2:] = False  # padding slots
    mask[3, 1:] = False
    return x, mask, torch.tensor([0, 1, 1, 0, 1][:b])


def _models():
    torch.manual_seed(0)
    return {
        "attention": _Attention(),
        "autoencoder": GATAutoencoder(6, 8, 3),
        "autoencoder-batch": GATAutoencoder(6, 8, 3, n_batches=2),
        "cell": CellAutoencoder(6, 8, 3),
        "cell-batch": CellAutoencoder(6, 8, 3, n_batches=2),
    }


def _microbatch_grads(model, x, mask, batch):
    out = []
    for i in range(len(x)):
        model.zero_grad()
        model.loss(x[i : i + 1], mask[i : i + 1], batch[i : i + 1]).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


@pytest.mark.parametrize("name", ["attention", "autoencoder", "autoencoder-batch", "cell", "cell-batch"])
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_equal_microbatch_gradients(name, mode):
    model = _models()[name]
    assert ModuleValidator.validate(model, strict=False) == []
    validate_model(model)
    x, mask, batch = _inputs()
    expected = _microbatch_grads(model, x, mask, batch)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
    model.zero_grad()
    model.loss(x, mask, batch).sum().backward()
    names = dict(model.named_parameters())
    for pname, p in names.items():
        for i in range(len(x)):
            want = expected[i].get(pname, torch.zeros_like(p))
            assert torch.allclose(p.grad_sample[i], want, atol=1e-5), (name, pname, i)
    gsm.to_standard_module()


def _clipped_mean(model, x, mask, batch, clip):
    """Each microbatch gradient clipped to ``clip`` by hand, summed, over the batch size."""
    per_sample = _microbatch_grads(model, x, mask, batch)
    norms = [torch.sqrt(sum((g**2).sum() for g in s.values())) for s in per_sample]
    return {
        n: sum(s.get(n, torch.zeros_like(p)) * min(1.0, clip / (float(norm) + 1e-6)) for s, norm in zip(per_sample, norms, strict=True)) / len(x)
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("name", ["attention", "autoencoder-batch", "cell-batch"])
@pytest.mark.parametrize("engine", ["opacus", "single-pass"])
def test_ghost_clipping_equals_clipped_microbatch_sum(name, engine):
    """Ghost clipping (the default engine) never forms per-sample gradients: its clipped,
    noise-free average must equal clipping each microbatch gradient by hand, for Opacus's
    two backward passes and for the single-pass engine alike (3-D attention inputs included)."""
    model = _models()[name]
    x, mask, batch = _inputs()
    clip = 0.5
    want = _clipped_mean(model, x, mask, batch, clip)
    params = dict(model.named_parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    if engine == "single-pass":
        assert LinearGhostClipping.supports(model)
        ghost = LinearGhostClipping(model, sgd, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=len(x), generator=torch.Generator())
        ghost.step(model.loss(x, mask, batch))
    else:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", max_grad_norm=clip)
        opt = DPOptimizerFastGradientClipping(sgd, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=len(x), loss_reduction="mean")
        from fedspatial.shared.privacy.dp import _PerSampleLoss

        criterion = DPLossFastGradientClipping(gsm, opt, _PerSampleLoss(), "mean")
        opt.zero_grad()
        criterion(model.loss(x, mask, batch)).backward()
        opt.step()
    for n, p in params.items():
        assert torch.allclose(p.grad, want[n], atol=1e-5), n


def test_single_pass_ghost_bounds_one_cells_contribution():
    """The guarantee DP-SGD rests on: adding one sample, however large its gradient, moves
    the (noise-free) gradient sum by at most the clipping norm C; and noise is added at std
    sigma C / expected batch size, an empty batch included."""
    torch.manual_seed(0)
    model, clip = CellAutoencoder(6, 8, 3), 0.3
    x, mask, batch = _inputs(b=5)
    x[4] *= 1e3  # an outlier whose raw gradient is far above C

    def clipped_sum(rows):
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)
        ghost = LinearGhostClipping(model, sgd, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=1, generator=torch.Generator())
        ghost.step(model.loss(x[rows], mask[rows], batch[rows]))
        out = ghost.flat.clone()
        ghost.close()
        return out

    with_outlier, without = clipped_sum([0, 1, 2, 3, 4]), clipped_sum([0, 1, 2, 3])
    assert float((with_outlier - without).norm()) == pytest.approx(clip, rel=1e-3)  # clipped to C exactly
    assert float((clipped_sum([0, 1, 2, 3]) - clipped_sum([0, 1, 2])).norm()) <= clip + 1e-6
    # Pure noise on an empty Poisson batch: std sigma C / E over ~100 parameters x 20 steps.
    sigma, expected = 2.0, 8
    ghost = LinearGhostClipping(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma,
                                max_grad_norm=clip, expected_batch_size=expected, generator=torch.Generator().manual_seed(3))
    draws = []
    for _ in range(20):
        ghost.step(model.loss(x[:0], mask[:0], batch[:0]))
        draws.append(ghost.flat.clone())
    noise = torch.cat(draws)
    assert float(noise.std()) == pytest.approx(sigma * clip / expected, rel=0.05)
    assert abs(float(noise.mean())) < 0.1 * sigma * clip / expected


def test_single_pass_ghost_refuses_tied_layers():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def loss(self, x, mask, batch=None):
            return self.lin(self.lin(x[:, 0])).square().sum(dim=1)  # one layer, two uses

    model = Tied()
    ghost = LinearGhostClipping(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                max_grad_norm=1.0, expected_batch_size=2, generator=torch.Generator())
    with pytest.raises(NotImplementedError, match="tied"):
        ghost.step(model.loss(torch.randn(2, 1, 4), torch.ones(2, 1, dtype=torch.bool)))
    assert not LinearGhostClipping.supports(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))


def test_poisson_batches_draw_each_cell_independently_at_rate_q():
    n, q, steps = 400, 0.05, 4000
    batches = list(poisson_batches(n, q, steps, torch.Generator().manual_seed(0)))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert all(b.dtype == torch.int64 and (b.diff() > 0).all() and (b.min() >= 0) and (b.max() < n) for b in batches if len(b) > 1)
    assert float(sizes.mean()) == pytest.approx(n * q, rel=0.02)
    assert float(sizes.var()) == pytest.approx(n * q * (1 - q), rel=0.1)  # binomial: independent draws
    hits = torch.bincount(torch.cat(batches), minlength=n).double() / steps
    assert float(hits.mean()) == pytest.approx(q, rel=0.02)
    assert float(hits.std()) == pytest.approx((q * (1 - q) / steps) ** 0.5, rel=0.15)  # no cell favoured
    assert hits[0] > 0 and hits[-1] > 0  # both ends reachable
    assert [b.tolist() for b in poisson_batches(5, 1.0, 2, torch.Generator())] == [[0, 1, 2, 3, 4]] * 2


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_single_pass_and_opacus_ghost_train_alike(noise):
    """End to end, same seed: the single-pass engine and Opacus's ghost clipping draw the
    same batches and (without noise) take the same steps on the cell encoder."""
    data = per_cell_data(_graph(n=200))
    plan = plan_round(data.n_cells, batch_size=25, epochs=1, max_grad_norm=0.5, bound=NodeBound(0), node_noise_multiplier=noise)
    states, seen = {}, []
    for mode in ("ghost", "opacus-ghost"):
        torch.manual_seed(0)
        model = CellAutoencoder(10, 8, 3)
        result = dp_train_epochs(model, data, plan, lr=1e-2, grad_sample_mode=mode, seed=4, on_step=lambda opt: seen.append(opt.noise_multiplier))
        states[mode] = (result, model.state_dict())
    (r1, s1), (r2, s2) = states["ghost"], states["opacus-ghost"]
    assert r1.steps == r2.steps == plan.steps == 8
    assert seen == [noise] * 16  # per-cell samples: noise sigma C, no group factor
    if noise == 0:
        assert r1.loss == pytest.approx(r2.loss, rel=1e-5)
        assert all(torch.allclose(s1[k], s2[k], atol=1e-5) for k in s1)
    else:  # the noise generators differ, the parameters too
        assert not all(torch.allclose(s1[k], s2[k], atol=1e-5) for k in s1)


@pytest.mark.parametrize("mode", ["ghost", "opacus-ghost", "hooks", "functorch"])
@pytest.mark.parametrize("model_kind", [CellAutoencoder, GATAutoencoder])
def test_empty_poisson_batches_take_noise_steps(mode, model_kind):
    n = 50
    data = per_cell_data(_graph(n=n, f=6))
    plan = plan_round(n, batch_size=1, epochs=1, max_grad_norm=1.0, bound=NodeBound(0), node_noise_multiplier=1.0)
    sizes = [len(b) for b in poisson_batches(n, plan.sample_rate, plan.steps, torch.Generator().manual_seed(2))]
    assert sizes.count(0) >= 5  # the secret seed 2 below draws these same batches
    torch.manual_seed(0)
    model = model_kind(6, 8, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = dp_train_epochs(model, data, plan, seed=2, grad_sample_mode=mode)
    assert result.steps == plan.steps == 50 and np.isfinite(result.loss)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # every parameter moved
    assert all(p.grad is None for p in model.parameters()) or mode != "ghost"  # the engine let go of its buffer


def test_neighbour_lists_beyond_the_degree_bound_are_refused():
    data = _graph(n=100, k=6, d=6)
    check_degree_bound(data, NodeBound(6))
    with pytest.raises(ValueError, match="degree bound 2"):
        check_degree_bound(data, NodeBound(2))
    check_degree_bound(per_cell_data(data), NodeBound(0))  # one cell per sample
    plan = plan_round(data.n_cells, batch_size=10, epochs=1, max_grad_norm=1.0, bound=NodeBound(0), node_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="degree bound 0"):
        dp_train_epochs(GATAutoencoder(10, 8, 3), data, plan, seed=0)


def _graph(n=300, k=6, d=6, f=10, seed=0):
    rng = np.random.default_rng(seed)
    nb = bound_in_degree(knn_neighbors(rng.random((n, 2)), k), d)
    return GraphData(torch.from_numpy(rng.normal(size=(n, f)).astype(np.float32)), torch.from_numpy(nb))


def test_node_level_epsilon_matches_independent_opacus_accountant():
    data, d, sigma = _graph(), 6, 1.3
    bound = NodeBound(d)
    plan = plan_round(data.n_cells, batch_size=30, epochs=2, max_grad_norm=0.7, bound=bound, node_noise_multiplier=sigma)
    seen = []
    model = GATAutoencoder(10, 8, 3)
    result = dp_train_epochs(model, data, plan, seed=1, on_step=lambda opt: seen.append((opt.noise_multiplier, opt.max_grad_norm)))
    ledger = PrivacyLedger(site="s", delta=1e-5, budget_epsilon=100.0)
    ledger.record(Release("dp-sgd", 1, plan.node_noise_multiplier, plan.node_sample_rate, result.steps,
                          degree_bound=d, ego_sample_rate=plan.sample_rate))
    # Independently: one Opacus accountant stepped once per optimizer step with the
    # node-level group reduction applied (rate of drawing any of a cell's D + 1 samples;
    # noise over the 1 + 2D group sensitivity): the ledger's RDP cross-check.
    q = 30 / 300
    independent = RDPAccountant()
    for _ in range(result.steps):
        independent.step(noise_multiplier=sigma, sample_rate=1 - (1 - q) ** (d + 1))
    assert result.steps == len(seen) == 2 * 10
    assert ledger.epsilon_rdp == pytest.approx(independent.get_epsilon(delta=1e-5), rel=0.02)
    assert ledger.report()["epsilon-rdp"] == pytest.approx(ledger.epsilon_rdp)
    # The binding (PLD) epsilon accounts the same steps, noise and rate, more tightly.
    assert 0 < ledger.epsilon < ledger.epsilon_rdp
    # The optimizer's noise is sigma_node x (1 + 2D) x C on a per-sample clip of C.
    assert all(nm == pytest.approx(sigma * (1 + 2 * d)) and c == 0.7 for nm, c in seen)
    # Per-sample (not node-level) accounting would claim far less: the bound matters.
    per_sample = RDPAccountant()
    per_sample.history = [(sigma * (1 + 2 * d), q, result.steps)]
    assert per_sample.get_epsilon(delta=1e-5) < 0.5 * ledger.epsilon


def test_ledger_agrees_with_googles_dp_accounting():
    """The ledger's RDP cross-check (Opacus, group reduction) against a second, independent
    implementation of the same computation (Google's ``dp-accounting`` RDP: its own RDP of
    the sampled Gaussian, its own order grid and conversion) to 1 %; the group-reduced event
    accounted tightly (``dp-accounting`` PLD) is below it, and the binding epsilon (PLD of the
    node-level pair, checked numerically in test_privacy_accounting.py) is below both."""
    dpa = pytest.importorskip("dp_accounting")
    from dp_accounting import pld, rdp

    d, q, sigma, steps = 6, 0.1, 1.3, 20
    ledger = PrivacyLedger(site="s", delta=1e-5, budget_epsilon=100.0)
    node_q, node_q2 = NodeBound(d).sample_rate(q), NodeBound(d).sample_rate(q / 2)
    ledger.record(Release("dp-sgd", 1, sigma, node_q, steps, degree_bound=d, ego_sample_rate=q))
    ledger.record(Release("dp-sgd", 2, 2 * sigma, node_q2, steps, degree_bound=d, ego_sample_rate=q / 2))
    event = dpa.ComposedDpEvent([
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(node_q, dpa.GaussianDpEvent(sigma)), steps),
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(node_q2, dpa.GaussianDpEvent(2 * sigma)), steps),
    ])
    google_rdp = rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    google_pld = pld.PLDAccountant().compose(event).get_epsilon(1e-5)
    assert node_q == pytest.approx(1 - (1 - q) ** (d + 1))
    assert ledger.epsilon_rdp == pytest.approx(google_rdp, rel=0.01)
    assert google_pld <= ledger.epsilon_rdp
    assert ledger.epsilon < google_pld


def test_calibrated_noise_reaches_target():
    sigma = calibrate_noise(target_epsilon=4.0, delta=1e-5, sample_rate=0.3, steps=200)
    eps = epsilon_of([(sigma, 0.3, 200)], 1e-5)
    assert 3.9 <= eps <= 4.0
    prior = [(2.0, 1.0, 1)]
    assert calibrate_noise(target_epsilon=4.0, delta=1e-5, sample_rate=0.3, steps=200, prior=prior) > sigma


def test_ledger_composes_across_rounds_and_survives_serialization(tmp_path):
    ledger = PrivacyLedger(site="s", delta=1e-5, budget_epsilon=50.0, degree_bound=6)
    eps = []
    node_q = NodeBound(6).sample_rate(0.07)
    for r in (1, 2, 3):
        ledger = PrivacyLedger.from_json(ledger.to_json())  # as kept in context.state between rounds
        ledger.record(Release("dp-sgd", r, 1.1, node_q, 25, details={"sample-rate": 0.07}, degree_bound=6, ego_sample_rate=0.07))
        eps.append(ledger.epsilon)
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(epsilon_of([(Mechanism(1.1, 0.07, 6), 75)], 1e-5), rel=1e-9)
    one = RDPAccountant()  # the cross-check: 75 steps of the group-reduced sampled Gaussian
    one.history = [(1.1, node_q, 75)]
    report = json.loads(ledger.write(tmp_path).read_text())
    assert report["epsilon-rdp"] == pytest.approx(one.get_epsilon(delta=1e-5), rel=1e-6)
    assert report["epsilon"] == pytest.approx(eps[2]) and eps[2] < report["epsilon-rdp"]
    assert [r["epsilon"] for r in report["epsilon-per-round"]] == pytest.approx(eps)
    assert report["steps"] == 75 and report["degree-bound"] == 6 and report["samples-per-cell"] == 7
    assert report["sampling-rate"] == 0.07 and report["releases"][0]["degree_bound"] == 6
    assert report["privacy-unit"].startswith("one cell") and "dp-accounting" in report["accountant"]
    assert "Opacus" in report["cross-check-accountant"]


def test_budget_refusal_names_site_round_and_budget():
    ledger = PrivacyLedger(site="hospital_b", delta=1e-5, budget_epsilon=1.0)
    ledger.record(Release("dp-sgd", 1, 1.0, 0.2, 10))
    first = ledger.epsilon
    with pytest.raises(PrivacyBudgetExceeded, match=r"hospital_b: dp-sgd of round 2 would raise epsilon"):
        ledger.check("dp-sgd", 2, 1.0, 0.2, 400)
    assert ledger.epsilon == first and ledger.refusals[0]["round"] == 2
    assert ledger.report()["status"] == "exhausted"


def test_degree_bound_limits_samples_per_cell():
    rng = np.random.default_rng(1)
    coords = np.vstack([rng.random((200, 2)), 0.5 + 0.001 * rng.random((40, 2))])  # a dense spot
    nb = knn_neighbors(coords, 6)
    assert in_degree(nb).max() > 6
    bounded = bound_in_degree(nb, 4)
    assert in_degree(bounded).max() <= 4
    for row, new in zip(nb, bounded, strict=True):  # a subset, nearest first, padding last
        kept = [v for v in new if v >= 0]
        assert kept == [v for v in row if v in set(kept)]
        assert (new[len(kept):] == -1).all()
    # One cell appears in at most D + 1 ego neighbourhoods (its own and D others).
    ego = np.hstack([np.arange(len(coords))[:, None], bounded])
    assert np.bincount(ego[ego >= 0]).max() <= 5


