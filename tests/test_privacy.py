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
from fedspatial.shared.models import GATAutoencoder, NeighbourhoodAttention
from fedspatial.shared.privacy.dp import (
    Mechanism,
    NodeBound,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    Release,
    calibrate_noise,
    dp_train_epochs,
    epsilon_of,
    noisy_feature_stats,
    plan_round,
    validate_model,
)
from fedspatial.shared.training.loop import GraphData

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
    }


def _microbatch_grads(model, x, mask, batch):
    out = []
    for i in range(len(x)):
        model.zero_grad()
        model.loss(x[i : i + 1], mask[i : i + 1], batch[i : i + 1]).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


@pytest.mark.parametrize("name", ["attention", "autoencoder", "autoencoder-batch"])
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


@pytest.mark.parametrize("name", ["attention", "autoencoder-batch"])
def test_ghost_clipping_equals_clipped_microbatch_sum(name):
    """Ghost clipping (the default engine) never forms per-sample gradients: its clipped,
    noise-free average must equal clipping each microbatch gradient by hand."""
    model = _models()[name]
    x, mask, batch = _inputs()
    per_sample = _microbatch_grads(model, x, mask, batch)
    clip = 0.5
    norms = [torch.sqrt(sum((g**2).sum() for g in s.values())) for s in per_sample]
    params = dict(model.named_parameters())
    want = {
        n: sum(s.get(n, torch.zeros_like(p)) * min(1.0, clip / (float(norm) + 1e-6)) for s, norm in zip(per_sample, norms, strict=True)) / len(x)
        for n, p in params.items()
    }
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", max_grad_norm=clip)
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=len(x), loss_reduction="mean",
    )
    from fedspatial.shared.privacy.dp import _PerSampleLoss

    criterion = DPLossFastGradientClipping(gsm, opt, _PerSampleLoss(), "mean")
    opt.zero_grad()
    criterion(model.loss(x, mask, batch)).backward()
    opt.step()
    for n, p in params.items():
        assert torch.allclose(p.grad, want[n], atol=1e-5), n


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


def test_noisy_feature_stats_are_consistent_and_charged():
    rng = np.random.default_rng(0)
    arrays = {k: rng.random(20) * 100 for k in ("sum_norm", "sumsq_norm", "sum_log", "sumsq_log", "n_detected")}
    n, noisy, equivalent = noisy_feature_stats(50, arrays, target_sum=1e4, noise_multiplier=2.0, seed=0)
    assert n >= 1 and all(v.shape == (20,) and (v >= 0).all() for v in noisy.values())
    assert (noisy["sumsq_log"] >= noisy["sum_log"] ** 2 / n - 1e-9).all()
    assert (noisy["n_detected"] <= n).all()
    assert equivalent == pytest.approx(2.0 / np.sqrt(6))
