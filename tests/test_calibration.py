"""Calibration of the domain confidence from the sites' binned tables equals the pooled
computation (expected calibration error, reliability bins, coverage above 0.9)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.evaluation.calibration import (
    TEMPERATURES,
    CalibrationTable,
    calibration_report,
    calibration_table,
    expected_calibration_error,
    fit_temperature,
    match_domains,
    merge_calibration_tables,
    neighbour_loss,
    tempered_confidence,
)
from fedspatial.shared.phases.base import MemoryState, Run
from fedspatial.shared.phases.calibration import PLOT_NAME, CalibrationPhase
from fedspatial.shared.phases.finalize import DOMAINS_STATE, annotated_path
from fedspatial.shared.protocol.payload import Payload


def _sites(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Three sites: labels (some missing), domains that mostly follow them, confidences."""
    rng = np.random.default_rng(seed)
    out = []
    for n, labels in ((300, "ABCD"), (200, "ABC"), (250, "ABCDE")):
        truth = rng.choice(list(labels), size=n).astype(object)
        dom = np.array(["ABCDE".index(t) for t in truth]) + 1  # domain d+1 is label d ...
        flip = rng.random(n) < 0.3
        dom[flip] = rng.integers(0, 6, size=flip.sum())  # ... except 30 % of cells
        truth[rng.random(n) < 0.05] = np.nan
        conf = np.where(flip, rng.uniform(0.2, 1.0, n), rng.uniform(0.6, 1.0, n)).astype(np.float32)
        conf[:3] = [0.0, 0.9, 1.0]  # bin edges
        out.append((truth, dom, conf))
    return out


def test_federated_calibration_equals_pooled() -> None:
    sites = _sites()
    merged = merge_calibration_tables([calibration_table(t, d, c) for t, d, c in sites])
    report = calibration_report(merged)
    truth = np.concatenate([t for t, _, _ in sites])
    dom = np.concatenate([d for _, d, _ in sites])
    conf = np.concatenate([c for _, _, c in sites]).astype(np.float64)
    keep = np.array([isinstance(v, str) for v in truth])
    truth, dom, conf = truth[keep], dom[keep], conf[keep]
    # the matching: the best one-to-one assignment, checked by brute force
    labels, domains = sorted(set(truth)), sorted(set(dom))
    overlap = np.array([[np.sum((truth == lab) & (dom == d)) for d in domains] for lab in labels])
    best = max(itertools.permutations(range(len(domains)), len(labels)),
               key=lambda cols: sum(overlap[i, c] for i, c in enumerate(cols)))
    assert match_domains(merged) == {domains[c]: labels[i] for i, c in enumerate(best)}
    assert set(report["matching"].values()) == set("ABCDE")
    mapped = np.array([match_domains(merged).get(int(d), None) for d in dom], dtype=object)
    correct = mapped == truth
    assert report["n_cells"] == keep.sum()
    assert report["ece"] == pytest.approx(expected_calibration_error(conf, correct), abs=1e-12)
    # an independent binning: right-closed bins with np.digitize
    edges = np.linspace(0, 1, 11)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, 9)
    ece = sum(np.mean(bins == b) * abs(correct[bins == b].mean() - conf[bins == b].mean()) for b in range(10) if (bins == b).any())
    assert report["ece"] == pytest.approx(ece, abs=1e-12)
    for b, entry in enumerate(report["bins"]):
        assert entry["n"] == np.sum(bins == b)
    assert report["accuracy"] == pytest.approx(correct.mean(), abs=1e-12)
    assert report["mean_confidence"] == pytest.approx(conf.mean(), abs=1e-12)
    assert report["coverage_above_0.9"] == pytest.approx(np.mean(conf > 0.9), abs=1e-12)
    assert report["accuracy_above_0.9"] == pytest.approx(correct[conf > 0.9].mean(), abs=1e-12)


def test_tiny_case_by_hand() -> None:
    # 4 cells: domain 0 <-> label "x" (3 cells), domain 1 <-> "y"; one cell of "y" in domain 0
    table = calibration_table(["x", "x", "y", "y"], [0, 0, 0, 1], [0.95, 0.85, 0.95, 0.55])
    report = calibration_report(table)
    assert report["matching"] == {"0": "x", "1": "y"}
    # bins: (0.9, 1]: 2 cells, accuracy 1/2, confidence 0.95; (0.8, 0.9]: 1 cell, 1 vs 0.85;
    # (0.5, 0.6]: 1 cell, 1 vs 0.55
    assert report["ece"] == pytest.approx(0.5 * 0.45 + 0.25 * 0.15 + 0.25 * 0.45)
    assert report["coverage_above_0.9"] == 0.5 and report["accuracy_above_0.9"] == 0.5
    back = CalibrationTable.from_json(table.to_json())
    assert calibration_report(back) == report


def _strip_sites(tmp_path: Path, *, label_key: str = "domain", local_dp: bool = False) -> dict[str, SimpleNamespace]:
    """Two sites of cells on a line: labels in blocks of 20, the model's domain right 75 %
    of the time with an overconfident posterior; neighbours i-2..i+2."""
    rng = np.random.default_rng(3)
    cfg = ExperimentConfig.from_dict({"data": {"label-key": label_key}, "privacy": {"local-dp": local_dp}})
    sites = {}
    for name, n in (("hospital_a", 160), ("hospital_b", 120)):
        truth = (np.arange(n) // 20) % 4
        dom = np.where(rng.random(n) < 0.75, truth, (truth + rng.integers(1, 4, n)) % 4)
        logits = 8.0 * np.eye(4)[dom] + rng.normal(0, 0.3, (n, 4))
        offsets = np.array([-2, -1, 1, 2])
        neighbors = np.arange(n)[:, None] + offsets
        neighbors[(neighbors < 0) | (neighbors >= n)] = -1
        adata = ad.AnnData(np.zeros((n, 1)), obs=pd.DataFrame({"domain": [f"L{t}" for t in truth]}, index=[f"{name}{i}" for i in range(n)]))
        section = SimpleNamespace(site=name, name="s1", key=f"{name}/s1", adata=adata)
        out = tmp_path / name
        out.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(annotated_path(out, section))  # type: ignore[arg-type]  # what finalize wrote
        state = MemoryState()
        state.put(DOMAINS_STATE, Payload(arrays={"domains": dom, "logits": logits}, config={"n-domains": 4}))
        sites[name] = SimpleNamespace(
            name=name, cfg=cfg, state=state, sections=[section], output_dir=out, n_cells=n, setup=lambda: None,
            graph_data=lambda _setup, nb=neighbors: SimpleNamespace(neighbors=SimpleNamespace(numpy=lambda nb=nb: nb)),
            truth=truth, dom=dom, logits=logits, neighbors=neighbors,
        )
    return sites


class _Federation:
    def __init__(self, sites: dict[str, SimpleNamespace]) -> None:
        self._sites, self.asked = sites, []

    @property
    def sites(self) -> list[str]:
        return sorted(self._sites)

    def ask(self, query: str, payload: Any = None, *, sites: Any = None, require_all: bool = False) -> dict[str, Payload]:
        self.asked.append(query)
        return {n: CalibrationPhase().answer(self._sites[n], query, payload) for n in self.sites}


def test_neighbour_loss_sums_over_sites_and_tempers_the_posterior(tmp_path: Path) -> None:
    sites = _strip_sites(tmp_path)
    total = sum(neighbour_loss(s.logits, s.dom, s.neighbors)[0] for s in sites.values())
    # pooled: the two sites' cells side by side, neighbours never across sites
    a, b = sites["hospital_a"], sites["hospital_b"]
    pooled_nb = np.vstack([a.neighbors, np.where(b.neighbors >= 0, b.neighbors + len(a.dom), -1)])
    pooled, pairs = neighbour_loss(np.vstack([a.logits, b.logits]), np.r_[a.dom, b.dom], pooled_nb)
    np.testing.assert_allclose(total, pooled, rtol=1e-12)
    assert pairs == np.sum(pooled_nb >= 0)
    # by hand for one temperature: -sum log softmax(l_i / T)[d_j]
    t = TEMPERATURES[40]
    direct = sum(-np.log(np.exp(a.logits[i] / t)[a.dom[j]] / np.exp(a.logits[i] / t).sum())
                 for i in range(len(a.dom)) for j in a.neighbors[i] if j >= 0)
    assert neighbour_loss(a.logits, a.dom, a.neighbors)[0][40] == pytest.approx(direct, rel=1e-10)
    # T = 1 is the model's own posterior
    soft = np.exp(a.logits) / np.exp(a.logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(tempered_confidence(a.logits, a.dom, 1.0), soft[np.arange(len(a.dom)), a.dom], rtol=1e-12)
    assert fit_temperature(pooled) == TEMPERATURES[int(np.argmin(pooled))]


def test_phase_recalibrates_without_labels(tmp_path: Path) -> None:
    sites = _strip_sites(tmp_path / "run")
    run = Run(ExperimentConfig(), {}, tmp_path / "run")
    run.site_reports = [{"calibration": {name: calibration_table(np.char.add("L", s.truth.astype(str)), s.dom, tempered_confidence(s.logits, s.dom, 1.0)).to_json()}}
                        for name, s in sites.items()]
    fed = _Federation(sites)
    CalibrationPhase().run(fed, run)  # type: ignore[arg-type]
    assert fed.asked == ["calibration", "calibration"]
    report = run.report["calibration"]
    pooled = sum(neighbour_loss(s.logits, s.dom, s.neighbors)[0] for s in sites.values())
    assert report["temperature"] == fit_temperature(pooled) > 1  # overconfident: tempered down
    assert report["after"]["ece"] < report["before"]["ece"] - 0.02  # 0.23 -> 0.19 here (noisy neighbours)
    assert report["after"]["matching"] == report["before"]["matching"]
    assert (tmp_path / "run" / PLOT_NAME).stat().st_size > 0
    for s in sites.values():
        back = ad.read_h5ad(annotated_path(s.output_dir, s.sections[0]))
        np.testing.assert_allclose(back.obs["fedspatial_confidence_calibrated"], tempered_confidence(s.logits, s.dom, report["temperature"]), rtol=1e-6)
        assert back.uns["fedspatial"]["confidence_temperature"] == report["temperature"]
    # label-free: without labels at the sites the same temperature is fitted
    unlabelled = _strip_sites(tmp_path / "nolabels", label_key="none")
    bare = Run(ExperimentConfig(), {}, tmp_path / "nolabels")
    CalibrationPhase().run(_Federation(unlabelled), bare)  # type: ignore[arg-type]
    assert bare.report["calibration"]["temperature"] == report["temperature"] and "after" not in bare.report["calibration"]


def test_local_dp_fits_no_temperature(tmp_path: Path) -> None:
    sites = _strip_sites(tmp_path, local_dp=True)
    run = Run(ExperimentConfig.from_dict({"privacy": {"local-dp": True}}), {}, tmp_path)
    fed = _Federation(sites)
    CalibrationPhase().run(fed, run)  # type: ignore[arg-type]
    assert fed.asked == [] and "local-dp" in run.report["calibration"]["temperature-skipped"]
    with pytest.raises(PermissionError, match="local-dp"):
        CalibrationPhase().answer(sites["hospital_a"], "calibration", Payload(config={"stage": "loss", "temperatures": [1.0]}))  # type: ignore[arg-type]
