"""Tests for fedspatial.shared.evaluation.metrics (contingency-based ARI / NMI)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from fedspatial.shared.evaluation.metrics import (
    Contingency,
    ari_from_contingency,
    contingency,
    merge_contingency,
    nmi_from_contingency,
    section_scores,
)


def test_contingency_hand_example_skips_missing_labels():
    true = np.array(["b", "a", None, "a", np.nan, "", "b"], dtype=object)
    pred = np.array([3, 1, 0, 1, 0, 0, 1])
    c = contingency(true, pred)
    assert c.labels == ["a", "b"]
    assert c.domains == [1, 3]  # domain 0 only has unlabelled cells
    assert c.counts.dtype == np.int64
    np.testing.assert_array_equal(c.counts, [[2, 0], [1, 1]])


def test_contingency_accepts_categorical_and_stringified_nan():
    pd = pytest.importorskip("pandas")
    cat = pd.Categorical(["L1", None, "L2", "L1"])
    c = contingency(cat, [0, 0, 1, 1])
    assert c.labels == ["L1", "L2"] and c.n == 3
    c_str = contingency(np.array(["L1", "nan", "L2", "L1"]), [0, 0, 1, 1])
    np.testing.assert_array_equal(c_str.counts, c.counts)


def test_contingency_round_trip_through_arrays():
    c = contingency(["x", "y", "y"], [4, 2, 2])
    arrays = c.to_arrays()
    assert arrays["labels"].dtype.kind == "U"
    back = Contingency.from_arrays(arrays)
    assert back.labels == c.labels and back.domains == c.domains
    np.testing.assert_array_equal(back.counts, c.counts)
    back_list = Contingency.from_arrays({**arrays, "labels": list(c.labels)})
    assert back_list.labels == c.labels


def test_ari_hand_example():
    # rows a: [2, 0], b: [0, 1], c: [0, 1]; pair counts tp=2, fp=2, fn=0, tn=8
    # ARI = 2 (tp tn - fn fp) / ((tp+fn)(fn+tn) + (tp+fp)(fp+tn)) = 32 / 56
    c = contingency(["a", "a", "b", "c"], [0, 0, 1, 1])
    assert ari_from_contingency(c) == pytest.approx(4 / 7, abs=1e-15)
    assert ari_from_contingency(contingency(["a", "a", "b", "b"], [0, 1, 0, 1])) == -0.5
    assert ari_from_contingency(contingency(["a", "a", "b", "b"], [1, 1, 0, 0])) == 1.0


def _random_site(rng: np.random.Generator, labels: list[str], domains: list[int], n: int):
    true = rng.choice(np.array(labels, dtype=object), size=n)
    true[rng.random(n) < 0.15] = None  # unlabelled cells
    # predictions correlated with the truth, so scores are far from 0
    pred = np.array(
        [
            domains[labels.index(t) % len(domains)] if t is not None and rng.random() < 0.7 else d
            for t, d in zip(true, rng.choice(domains, size=n), strict=True)
        ]
    )
    return true, pred


@pytest.mark.parametrize("seed", range(6))
def test_merged_contingency_scores_equal_sklearn_on_pooled_labels(seed):
    rng = np.random.default_rng(seed)
    # sites lack some labels and some domains
    specs = [
        (["L1", "L2", "L3"], [0, 1, 2], 120),
        (["L2", "L4"], [1, 3], 80),
        (["L1", "L3", "L4", "WM"], [0, 2, 3, 4], 200),
    ]
    sites = [_random_site(rng, *s) for s in specs]
    merged = merge_contingency([contingency(t, p) for t, p in sites])
    true = np.concatenate([t for t, _ in sites])
    pred = np.concatenate([p for _, p in sites])
    keep = np.array([t is not None for t in true])
    assert merged.n == keep.sum()
    assert merged.labels == ["L1", "L2", "L3", "L4", "WM"]
    assert merged.domains == [0, 1, 2, 3, 4]
    ref_true, ref_pred = true[keep].astype(str), pred[keep]
    assert ari_from_contingency(merged) == pytest.approx(
        adjusted_rand_score(ref_true, ref_pred), abs=1e-12
    )
    assert nmi_from_contingency(merged) == pytest.approx(
        normalized_mutual_info_score(ref_true, ref_pred), abs=1e-12
    )


def test_merge_is_order_independent():
    a = contingency(["x", "y"], [1, 0])
    b = contingency(["z", "x"], [2, 1])
    ab, ba = merge_contingency([a, b]), merge_contingency([b, a])
    assert ab.labels == ba.labels == ["x", "y", "z"]
    np.testing.assert_array_equal(ab.counts, ba.counts)
    np.testing.assert_array_equal(ab.counts, [[0, 2, 0], [1, 0, 0], [0, 0, 1]])


def test_large_counts_do_not_overflow():
    counts = np.array([[600_000, 400_000], [300_000, 700_000]])
    true = np.repeat(["a", "a", "b", "b"], counts.ravel())
    pred = np.repeat([0, 1, 0, 1], counts.ravel())
    c = Contingency(labels=["a", "b"], domains=[0, 1], counts=counts)
    assert ari_from_contingency(c) == pytest.approx(adjusted_rand_score(true, pred), abs=1e-12)
    assert nmi_from_contingency(c) == pytest.approx(
        normalized_mutual_info_score(true, pred), abs=1e-12
    )


@pytest.mark.parametrize(
    ("true", "pred"),
    [
        (["a", "a", "a"], [0, 0, 0]),  # one label, one domain: perfect
        (["a", "b", "b"], [0, 0, 0]),  # single cluster
        (["a", "a", "a"], [0, 1, 2]),  # single label
        (["a", "b", "c"], [0, 1, 2]),  # all singletons
    ],
)
def test_degenerate_cases_equal_sklearn(true, pred):
    c = contingency(true, pred)
    assert ari_from_contingency(c) == pytest.approx(adjusted_rand_score(true, pred), abs=1e-15)
    assert nmi_from_contingency(c) == pytest.approx(
        normalized_mutual_info_score(true, pred), abs=1e-15
    )


def test_all_labels_missing_gives_nan_without_crash():
    scores = section_scores([None, np.nan, ""], [0, 1, 1])
    assert scores["n_labelled"] == 0
    assert math.isnan(scores["ari"]) and math.isnan(scores["nmi"])
    empty = merge_contingency([])
    assert math.isnan(ari_from_contingency(empty)) and math.isnan(nmi_from_contingency(empty))


def test_section_scores_on_labelled_cells_only():
    true = np.array(["a", "a", None, "b", "b", "b", None], dtype=object)
    pred = np.array([0, 0, 1, 1, 1, 0, 0])
    scores = section_scores(true, pred)
    keep = np.array([t is not None for t in true])
    assert scores["n_labelled"] == 5.0
    assert scores["ari"] == pytest.approx(adjusted_rand_score(true[keep], pred[keep]), abs=1e-15)
    assert scores["nmi"] == pytest.approx(
        normalized_mutual_info_score(true[keep], pred[keep]), abs=1e-15
    )


def test_length_mismatch_and_non_integer_domains_raise():
    with pytest.raises(ValueError, match="predictions"):
        contingency(["a", "b"], [0])
    with pytest.raises(ValueError, match="integer"):
        contingency(["a", "b"], [0.5, 1.0])
