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
from fedspatial.shared.protocol.payload import Payload


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


def test_released_tables_count_each_cells_own_assignment_not_its_smoothed_domain(tmp_path: Path, monkeypatch) -> None:
    """Under local DP the label x domain table and the domain counts that leave the site
    are built from each cell's per-cell embedding alone (nearest centroid), never from the
    smoothed, refined domains written at the site: those depend on the neighbours, so one
    cell could move many entries and the sqrt(2) sensitivity would not hold."""
    import anndata as ad
    import torch

    from fedspatial.shared.phases import finalize
    from fedspatial.shared.phases.embedding import store_embedding

    n = 40
    rng = np.random.default_rng(0)
    own = rng.integers(0, 2, n)  # each cell's own side
    centroids = np.eye(2)
    per_cell = np.where(own[:, None] == 1, [0.1, 1.0], [1.0, 0.1])
    per_cell /= np.linalg.norm(per_cell, axis=1, keepdims=True)
    smoothed = np.tile([1.0, 0.0], (n, 1))  # the niche pulls every cell to domain 0
    truth = np.where(rng.random(n) < 0.8, own, 1 - own).astype(str)
    adata = ad.AnnData(
        np.ones((n, 3), np.float32),
        obs=pd.DataFrame({"domain": truth}, index=[f"c{i}" for i in range(n)]),
        obsm={"spatial": rng.random((n, 2))},
    )
    site = _site(tmp_path)
    site.sections = [SimpleNamespace(adata=adata, site="a", name="s1", key="a/s1")]
    store_embedding(site.state, smoothed, per_cell=per_cell)
    neighbors = torch.tensor([[(i + 1) % n, (i - 1) % n] for i in range(n)])
    site.setup = lambda: None
    site.graph_data = lambda setup: SimpleNamespace(neighbors=neighbors, sections=[("a/s1", 0, n)])
    monkeypatch.setattr(finalize, "features_used", lambda section, setup: {})
    released: dict[str, object] = {}

    def capture(site_, tables, counts, **_):
        released.update(tables=tables, counts=counts)
        return tables, counts

    monkeypatch.setattr(finalize, "private_tables", capture)
    request = Payload(arrays={"centroids": centroids}, config={"mixture": "none", "variance": 0.1, "refine": True})
    finalize.finalize_site(site, request)

    assert np.array_equal(released["counts"], np.bincount(own, minlength=2))
    table = released["tables"]["a"]
    for label in ("0", "1"):
        row = table.counts[table.labels.index(label)]
        assert np.array_equal(row, np.bincount(own[truth == label], minlength=2)), label
    written = ad.read_h5ad(tmp_path / "a__s1.h5ad").obs["fedspatial_domain"].astype(int).to_numpy()
    assert (written == 0).all() and own.any()  # the site keeps its smoothed domains; the release does not use them
