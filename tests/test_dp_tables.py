"""The evaluation's label x domain tables under local DP (shared/privacy/tables.py), and
the site's own refusal of un-noised releases under local DP."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.phases.base import MemoryState
from fedspatial.shared.privacy.accounting import PrivacyBudgetExceeded, epsilon_of
from fedspatial.shared.privacy.budget import budget_plan, plan_budget
from fedspatial.shared.privacy.ledger import PrivacyLedger
from fedspatial.shared.privacy.policy import METADATA_QUERIES, unnoised
from fedspatial.shared.privacy.tables import (
    SENSITIVITY,
    label_vocabulary,
    private_tables,
    vocabulary_table,
)
from fedspatial.shared.protocol.names import Query


def _site(tmp_path: Path, epsilon: float = 8.0, budget: float | None = None) -> SimpleNamespace:
    cfg = ExperimentConfig.from_dict({"privacy": {"local-dp": True, "target-epsilon": epsilon}})
    ledger = PrivacyLedger(site="a", delta=cfg.privacy.delta, budget_epsilon=budget or epsilon)
    site = SimpleNamespace(name="a", cfg=cfg, state=MemoryState(), output_dir=tmp_path, kept=ledger)
    site.ledger = lambda: PrivacyLedger.from_json(site.kept.to_json())

    def save(ledger: PrivacyLedger) -> None:
        site.kept = ledger

    site.save_ledger = save
    return site


def test_table_shape_does_not_depend_on_the_cells() -> None:
    labels = ["L1", "L2", "WM"]
    col = pd.Series(pd.Categorical(["L1", "L1", "WM"], categories=labels))
    assert label_vocabulary([col]) == labels  # L2 has no cell, yet is a row
    full = vocabulary_table(col.to_numpy(), np.array([0, 2, 1]), labels, 3)
    assert full.counts.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    without = vocabulary_table(col.to_numpy()[:2], np.array([0, 2]), labels, 3)
    assert without.counts.shape == full.counts.shape
    # one cell removed: one entry of the table and one domain count move by 1 -> L2 <= sqrt(2)
    d_counts = np.bincount([0, 2, 1], minlength=3) - np.bincount([0, 2], minlength=3)
    change = math.sqrt(float(((full.counts - without.counts) ** 2).sum() + (d_counts**2).sum()))
    assert change <= SENSITIVITY + 1e-12


def test_missing_labels_are_not_counted_and_not_rows() -> None:
    col = pd.Series(["L1", None, "nan", "L2"])
    assert label_vocabulary([col]) == ["L1", "L2"]
    table = vocabulary_table(col.to_numpy(), np.array([0, 1, 1, 1]), ["L1", "L2"], 2)
    assert table.counts.sum() == 2


def test_release_is_noised_charged_once_and_repeatable(tmp_path: Path) -> None:
    site = _site(tmp_path)
    col = np.array(["L1"] * 50 + ["L2"] * 50)
    dom = np.array([0] * 50 + [1] * 50)
    tables = {"a": vocabulary_table(col, dom, ["L1", "L2"], 2)}
    counts = np.bincount(dom, minlength=2)
    noisy, noisy_counts = private_tables(site, tables, counts, seed=3)
    assert [r.kind for r in site.kept.releases] == ["dp-table"]
    assert site.kept.releases[0].noise_multiplier == pytest.approx(budget_plan(site.cfg.privacy).table_noise)
    assert (noisy["a"].counts >= 0).all() and noisy["a"].counts.dtype == np.int64
    assert not np.array_equal(noisy["a"].counts, tables["a"].counts)  # sigma ~ 8.6 x sqrt(2): never exact
    again, again_counts = private_tables(site, tables, counts)
    assert len(site.kept.releases) == 1  # a repeated finalize does not pay twice
    assert np.array_equal(again["a"].counts, noisy["a"].counts) and np.array_equal(again_counts, noisy_counts)


def test_noise_std_matches_the_plan(tmp_path: Path) -> None:
    site = _site(tmp_path, epsilon=8.0, budget=1e9)
    big = 10_000  # far from 0: rounding and clipping do not matter
    draws = []
    for seed in range(300):
        site.state = MemoryState()
        tables = {"a": vocabulary_table(np.array(["L"]), np.array([0]), ["L"], 1)}
        tables["a"].counts[:] = big
        noisy, _ = private_tables(site, tables, np.array([big]), seed=seed)
        draws.append(noisy["a"].counts[0, 0] - big)
    expected = budget_plan(site.cfg.privacy).table_noise * SENSITIVITY
    assert np.std(draws) == pytest.approx(expected, rel=0.15)


def test_budget_refuses_a_release_beyond_it(tmp_path: Path) -> None:
    site = _site(tmp_path, epsilon=8.0, budget=0.2)  # the table alone costs 5 % of 8 = 0.4
    tables = {"a": vocabulary_table(np.array(["L"]), np.array([0]), ["L"], 1)}
    with pytest.raises(PrivacyBudgetExceeded):
        private_tables(site, tables, np.array([1]))
    assert site.kept.releases == [] and site.kept.refusals


def test_plan_shares_and_end_to_end_target() -> None:
    """The fixed releases spend their shares; DP-SGD calibrated after them reaches the target."""
    from fedspatial.shared.privacy.accounting import Mechanism, calibrate_noise

    plan = plan_budget(4.0, 1e-5, 6)
    assert epsilon_of(plan.before_training(), 1e-5) == pytest.approx(0.4, rel=0.01)
    assert epsilon_of([(Mechanism(plan.table_noise), 1)], 1e-5) == pytest.approx(0.2, rel=0.01)
    assert epsilon_of([(Mechanism(plan.cluster_noise), plan.cluster_releases)], 1e-5) == pytest.approx(0.6, rel=0.01)
    q, steps = 128 / 2000, 2 * 15 * 30
    sigma = calibrate_noise(target_epsilon=4.0, delta=1e-5, sample_rate=q, steps=steps, degree_bound=0,
                            prior=plan.before_training(), after=plan.after_training())
    total = epsilon_of([*plan.before_training(), (Mechanism(sigma, q, 0), steps), *plan.after_training()], 1e-5)
    assert 0.99 * 4.0 <= total <= 4.0


def test_every_query_is_noised_or_metadata_under_local_dp() -> None:
    """Under local DP the site refuses (client/app.py) whatever `unnoised` flags: what it
    answers is exactly the metadata and the DP releases."""
    dp = ExperimentConfig.from_dict({"privacy": {"local-dp": True}})
    plain = ExperimentConfig.from_dict({})
    answered = {q.value for q in Query if not unnoised(q.value, dp)}
    assert answered == {*METADATA_QUERIES, "feature_stats", "train", "embed", "dp_cluster_stats", "finalize"}
    refused = {q.value for q in Query} - answered
    assert {"evaluate", "cluster_stats", "harmony", "mixture", "pca", "panel", "calibration", "markers"} <= refused
    assert all(unnoised(q, plain) for q in ("train", "finalize", "feature_stats", "dp_cluster_stats"))
