"""Tests for fedspatial.shared.evaluation.integration (batch mixing and biology metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedspatial.shared.evaluation.integration import (
    batch_asw,
    clisi,
    combine_site_reports,
    graph_connectivity,
    ilisi,
    integration_report,
    label_asw,
    lisi,
    site_report,
)


def _mixed(seed: int = 0, n_locations: int = 20, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Perfectly mixed: 10 cells of each of 3 groups at every location (tiny jitter).

    Each cell's close neighbours are its 29 co-located cells (9, 10 and 10 of the
    three groups), so LISI is almost exactly 1 / ((9^2 + 10^2 + 10^2) / 29^2) = 2.99.
    """
    rng = np.random.default_rng(seed)
    locations = np.repeat(10 * rng.normal(size=(n_locations, d)), 30, axis=0)
    groups = np.tile(np.repeat([0, 1, 2], 10), n_locations)
    return locations + 1e-3 * rng.normal(size=locations.shape), groups


def _separated(seed: int = 0, n: int = 600, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Three far-apart clouds, one per group."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 3, n)
    centers = np.eye(3, d) * 50.0
    return centers[groups] + rng.normal(size=(n, d)), groups


def test_lisi_of_identical_points_is_the_inverse_simpson_of_the_others() -> None:
    # All 20 cells coincide, so each cell weighs its 19 neighbours equally:
    # 9 of its own batch and 10 of the other, LISI = 1 / ((9/19)^2 + (10/19)^2).
    Z = np.zeros((20, 3))
    batches = np.repeat(["a", "b"], 10)
    np.testing.assert_allclose(lisi(Z, batches), 361 / 181, rtol=1e-12)


def test_lisi_is_between_one_and_the_number_of_categories() -> None:
    Z, batches = _mixed()
    scores = lisi(Z, batches)
    assert np.all(scores >= 1 - 1e-12)
    assert np.all(scores <= 3 + 1e-12)


def test_ilisi_mixed_near_one_separated_near_zero() -> None:
    assert ilisi(*_mixed()) > 0.97
    assert ilisi(*_separated()) < 0.01


def test_clisi_separated_labels_near_one_mixed_near_zero() -> None:
    assert clisi(*_separated()) > 0.99
    assert clisi(*_mixed()) < 0.03


def test_single_batch_gives_nan_ilisi() -> None:
    Z, _ = _mixed()
    assert math.isnan(ilisi(Z, np.zeros(len(Z), dtype=int)))


def test_lisi_agrees_with_harmonypy() -> None:
    hm = pytest.importorskip("harmonypy")
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(800, 6))
    batches = rng.integers(0, 3, 800)
    Z[batches == 1] += 1.0  # partial mixing, so LISI varies across cells
    labels = np.array(["t1", "t2", "t3", "t4"])[rng.integers(0, 4, 800)]
    for values, perplexity in ((batches, 30), (labels, 10)):
        ref = hm.compute_lisi(Z, {"v": values}, ["v"], perplexity=perplexity)[:, 0]
        np.testing.assert_allclose(lisi(Z, values, perplexity=perplexity), ref, atol=1e-8)


def test_batch_asw_mixed_high_separated_low() -> None:
    Z, batches = _mixed()
    assert batch_asw(Z, batches) > 0.9
    Z, batches = _separated()
    assert batch_asw(Z, batches) < 0.2


def test_batch_asw_is_computed_within_labels() -> None:
    # Two far-apart cell types, each mixing both batches: batch ASW stays high
    # although the labels dominate the embedding.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    Z = np.eye(2, 4)[labels] * 40 + rng.normal(size=(400, 4))
    batches = rng.integers(0, 2, 400)
    assert batch_asw(Z, batches, labels) > 0.9


def test_label_asw_of_separated_labels_near_one() -> None:
    Z, labels = _separated()
    assert label_asw(Z, labels) > 0.95
    Z, labels = _mixed()
    assert abs(label_asw(Z, labels) - 0.5) < 0.05


def test_graph_connectivity_one_for_connected_labels() -> None:
    assert graph_connectivity(*_separated()) == 1.0


def test_graph_connectivity_counts_the_largest_piece() -> None:
    # Label 0 in two far-apart clouds of 60 cells each, label 1 in one cloud:
    # label 0 keeps half its cells in its largest component, label 1 all.
    rng = np.random.default_rng(2)
    Z = np.vstack(
        [
            rng.normal(size=(60, 3)),
            rng.normal(size=(60, 3)) + 100,
            rng.normal(size=(80, 3)) + np.array([0, 100, 0]),
        ]
    )
    labels = np.repeat([0, 0, 1], [60, 60, 80])
    assert graph_connectivity(Z, labels) == pytest.approx(0.75)


def test_integration_report_keys_and_ranges() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 450)
    Z = np.eye(3, 6)[labels] * 30 + rng.normal(size=(450, 6))
    batches = rng.integers(0, 2, 450)
    report = integration_report(Z, batches, labels)
    assert set(report) == {
        "ilisi",
        "clisi",
        "batch_asw",
        "label_asw",
        "graph_connectivity",
        "ari",
        "nmi",
    }
    assert report["ilisi"] > 0.9 and report["clisi"] > 0.99
    assert report["ari"] == pytest.approx(1.0) and report["nmi"] == pytest.approx(1.0)
    assert report["graph_connectivity"] == 1.0
    assert set(integration_report(Z, batches)) == {"ilisi", "batch_asw"}


def test_site_reports_combine_weighted_by_cells() -> None:
    Z, batches = _mixed(n_locations=10)
    one = site_report(Z[:200], batches[:200])
    single = site_report(Z[200:], np.zeros(100, dtype=int))  # a site with one section
    assert one["n_cells"] == 200 and one["n_batches"] == 3
    assert math.isnan(single["ilisi"]) and math.isnan(single["batch_asw"])
    combined = combine_site_reports([one, single])
    assert combined["ilisi"] == pytest.approx(one["ilisi"])  # NaN left out
    assert combined["n_cells"] == 300
    fake = [{"n_cells": 100.0, "ilisi": 0.2}, {"n_cells": 300.0, "ilisi": 0.6}]
    assert combine_site_reports(fake)["ilisi"] == pytest.approx(0.5)


def test_mismatched_lengths_are_rejected() -> None:
    Z, batches = _mixed()
    with pytest.raises(ValueError, match="cells"):
        integration_report(Z[:-1], batches)
