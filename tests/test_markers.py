"""Federated marker genes equal pooled ``scanpy.tl.rank_genes_groups`` (t-test flavours).

Sites send per-domain, per-gene sums; the server's ranking must equal scanpy's on the
pooled, log-normalized cells: scores, log fold changes, p-values, Benjamini-Hochberg
adjusted p-values and the order of the genes (ties included).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedspatial.shared.algorithms import markers as mk
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.synthetic import SyntheticSpec, make_synthetic_federation
from fedspatial.shared.phases.base import DomainModel, MemoryState, Run, SiteDescription
from fedspatial.shared.phases.finalize import DOMAINS_STATE, annotated_path
from fedspatial.shared.phases.markers import CSV_NAME, PLOT_NAME, MarkersPhase
from fedspatial.shared.protocol.payload import Payload

sc = pytest.importorskip("scanpy")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

FIELDS = ("scores", "logfoldchanges", "pvals", "pvals_adj")
TIED = (3, 7, 11)  # genes without a count anywhere: they all score 0, a tie scanpy orders its way


def _federation() -> dict[str, list[ad.AnnData]]:
    # three sites; the last domain is absent from the last site (SyntheticSpec's default)
    spec = dataclasses.replace(SyntheticSpec(seed=3), spots_per_section=(60, 90), n_features=40)
    fed = make_synthetic_federation(spec)
    for sections in fed.values():
        for a in sections:
            x = a.X.tolil()
            x[:, list(TIED)] = 0
            a.X = x.tocsr()
            a.X.eliminate_zeros()
    return fed


def _domains(a: ad.AnnData) -> np.ndarray:
    return a.obs["domain"].cat.codes.to_numpy().astype(np.int64)


def _federated(fed: Mapping[str, Sequence[ad.AnnData]], method: str) -> mk.Markers:
    genes = list(next(iter(fed.values()))[0].var_names)
    parts = [mk.domain_gene_sums(fed[s], [_domains(a) for a in fed[s]], genes, n_domains=5) for s in sorted(fed)]
    return mk.rank_markers(mk.merge_domain_gene_sums(parts), method=method)


def _pooled(fed: Mapping[str, Sequence[ad.AnnData]]) -> ad.AnnData:
    pooled = ad.concat([a for s in sorted(fed) for a in fed[s]])
    pooled.X = pooled.X.astype(np.float64)  # scanpy's float64 path: the comparison is then at 1e-13
    pooled.obs["dom"] = pd.Categorical(np.concatenate([_domains(a) for s in sorted(fed) for a in fed[s]]).astype(str))
    sc.pp.normalize_total(pooled, target_sum=1e4)
    sc.pp.log1p(pooled)
    return pooled


def _scanpy_float64(pooled: ad.AnnData, method: str) -> pd.DataFrame:
    """scanpy's statistics before it casts scores to float32 for ``uns`` (its own class)."""
    from scanpy.tools._rank_genes_groups import _RankGenes

    ranker = _RankGenes(pooled, "all", "dom", use_raw=False)
    ranker.compute_statistics(method, n_genes_user=pooled.n_vars)
    return ranker.stats


def _max_differences(ours: mk.Markers, ref: pd.DataFrame) -> dict[str, float]:
    worst = dict.fromkeys(FIELDS, 0.0)
    for i, group in enumerate(ours.groups):
        for field in FIELDS:
            worst[field] = max(worst[field], float(np.abs(ours.ranked(field)[i] - ref[(group, field)].to_numpy()).max()))
    return worst


@pytest.mark.parametrize("method", ["t-test", "t-test_overestim_var"])
def test_federated_markers_equal_pooled_scanpy(method: str) -> None:
    fed = _federation()
    ours = _federated(fed, method)
    pooled = _pooled(fed)
    sc.tl.rank_genes_groups(pooled, "dom", method=method)
    uns = pooled.uns["rank_genes_groups"]
    assert ours.groups == list(uns["names"].dtype.names) == ["0", "1", "2", "3", "4"]
    for i, group in enumerate(ours.groups):
        # the order of the names, the three tied all-zero genes included
        assert list(ours.ranked("names")[i]) == list(uns["names"][group])
        np.testing.assert_allclose(ours.ranked("pvals")[i], uns["pvals"][group], rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours.ranked("pvals_adj")[i], uns["pvals_adj"][group], rtol=0, atol=1e-6)
        # scanpy stores scores and fold changes as float32: equal to its rounding
        np.testing.assert_allclose(ours.ranked("scores")[i], uns["scores"][group], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ours.ranked("logfoldchanges")[i], uns["logfoldchanges"][group], rtol=1e-6, atol=1e-6)
    # before that rounding, every statistic agrees to 1e-6 (measured: about 1e-13)
    worst = _max_differences(ours, _scanpy_float64(pooled, method))
    assert max(worst.values()) < 1e-6, worst
    scores = np.take_along_axis(ours.scores, ours.order, axis=1)
    assert np.all(np.diff(scores, axis=1) <= 0)
    tied = [ours.genes.index(f"F{t:04d}") for t in TIED]
    assert np.all(ours.scores[:, tied] == 0) and np.all(ours.pvals[:, tied] == 1)


def test_a_wrong_variance_fails_the_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the population variance (no n / (n - 1)) is off by far more than
    the tolerance, so the equality above is not loose enough to hide a wrong definition."""
    fed = _federation()
    pooled = _pooled(fed)
    reference = _scanpy_float64(pooled, "t-test")

    def population(total: np.ndarray, total_sq: np.ndarray, n: float) -> tuple[np.ndarray, np.ndarray]:
        mean = total / n
        return mean, total_sq / n - mean**2

    monkeypatch.setattr(mk, "_mean_var", population)
    worst = _max_differences(_federated(fed, "t-test"), reference)
    assert worst["scores"] > 1e-3 and worst["pvals"] > 1e-6, worst
    assert worst["logfoldchanges"] < 1e-12  # means are right; only the variance is wrong


def test_tiny_case_by_hand() -> None:
    # gene a: domain 0 holds 1 and 3 (mean 2, variance 2), the rest 0, 0, 2 (mean 2/3,
    # variance 4/3); gene b is 0 everywhere (score 0, p-value 1, ranked last)
    values = {0: [[1.0, 0.0], [3.0, 0.0]], 1: [[0.0, 0.0], [0.0, 0.0], [2.0, 0.0]]}
    arr = {k: np.array(v) for k, v in values.items()}
    sums = mk.DomainGeneSums(
        ["a", "b"], [2, 3], [arr[0].sum(0), arr[1].sum(0)], [(arr[0] ** 2).sum(0), (arr[1] ** 2).sum(0)],
        [(arr[0] > 0).sum(0), (arr[1] > 0).sum(0)],
    )
    welch = mk.rank_markers(sums, method="t-test")
    assert welch.groups == ["0", "1"]
    t = 4 / math.sqrt(13)  # (2 - 2/3) / sqrt(2/2 + (4/3)/3)
    df = 169 / 89  # Welch-Satterthwaite: (1 + 4/9)^2 / (1^2/1 + (4/9)^2/2)
    p = 2 * stats.t.sf(t, df)
    assert welch.scores[0, 0] == pytest.approx(t, abs=1e-12)
    assert welch.pvals[0, 0] == pytest.approx(p, abs=1e-12)
    assert welch.pvals_adj[0].tolist() == pytest.approx([min(2 * p, 1.0), 1.0], abs=1e-12)  # BH: p * 2/1, 1 * 2/2
    assert welch.logfoldchanges[0, 0] == pytest.approx(math.log2((math.expm1(2) + 1e-9) / (math.expm1(2 / 3) + 1e-9)))
    assert welch.logfoldchanges[0, 1] == 0.0 and welch.scores[0, 1] == 0.0 and welch.pvals[0, 1] == 1.0
    assert welch.ranked("names")[0].tolist() == ["a", "b"] and welch.ranked("names")[1].tolist() == ["b", "a"]
    assert welch.scores[1, 0] == pytest.approx(-t, abs=1e-12)  # the rest's view, mirrored
    # overestim_var divides the rest's variance by the group's size: sqrt(2/2 + (4/3)/2)
    assert mk.rank_markers(sums, method="t-test_overestim_var").scores[0, 0] == pytest.approx(4 / math.sqrt(15), abs=1e-12)
    assert welch.means[:, 0].tolist() == pytest.approx([2, 2 / 3]) and welch.fractions[:, 0].tolist() == pytest.approx([1, 1 / 3])
    # a site's sums: normalize_total to 2 then log1p, per domain
    counts = ad.AnnData(np.array([[1.0, 1.0], [3.0, 1.0], [0.0, 4.0]]), var=pd.DataFrame(index=["a", "b"]))
    site = mk.domain_gene_sums([counts], [np.array([1, 1, 0])], ["b", "a"], n_domains=3, target_sum=2)
    logged = np.log1p(np.array([[1.0, 1.0], [0.5, 1.5], [2.0, 0.0]]))  # columns b, a
    np.testing.assert_allclose(site.sums, [logged[2], logged[:2].sum(0), [0, 0]], atol=1e-15)
    np.testing.assert_allclose(site.sums_sq, [logged[2] ** 2, (logged[:2] ** 2).sum(0), [0, 0]], atol=1e-15)
    assert site.n_cells.tolist() == [1, 2, 0] and site.n_expressed.tolist() == [[1, 0], [2, 2], [0, 0]]


def test_small_domains_are_left_out_as_scanpy_requires() -> None:
    fed = _federation()
    for sections in fed.values():  # domain 4 keeps a single cell, at the first site
        for a in sections:
            codes = a.obs["domain"].cat.codes.to_numpy().copy()
            codes[codes == 4] = 0
            a.obs["domain"] = pd.Categorical.from_codes(codes, categories=a.obs["domain"].cat.categories)
    first = fed["hospital_a"][0]
    first.obs["domain"] = pd.Categorical.from_codes(np.r_[4, _domains(first)[1:]], categories=first.obs["domain"].cat.categories)
    ours = _federated(fed, "t-test")
    assert ours.groups == ["0", "1", "2", "3"]
    pooled = _pooled(fed)
    sc.tl.rank_genes_groups(pooled, "dom", groups=["0", "1", "2", "3"], method="t-test")  # the rest includes domain 4
    for i, group in enumerate(ours.groups):
        assert list(ours.ranked("names")[i]) == list(pooled.uns["rank_genes_groups"]["names"][group])
        np.testing.assert_allclose(ours.ranked("pvals_adj")[i], pooled.uns["rank_genes_groups"]["pvals_adj"][group], atol=1e-6)


def test_uns_layout_is_read_by_scanpy(tmp_path: Path) -> None:
    fed = _federation()
    ours = _federated(fed, "t-test")
    section = fed["hospital_b"][0].copy()
    section.obs["fedspatial_domain"] = pd.Categorical(_domains(section).astype(str), categories=[str(k) for k in range(5)])
    section.uns["rank_genes_groups"] = ours.to_uns(groupby="fedspatial_domain")
    section.write_h5ad(tmp_path / "s.h5ad")
    back = ad.read_h5ad(tmp_path / "s.h5ad")
    frame = sc.get.rank_genes_groups_df(back, group="2")
    assert frame["names"].tolist() == list(ours.ranked("names")[2])
    np.testing.assert_allclose(frame["scores"], ours.ranked("scores")[2], rtol=1e-6)
    np.testing.assert_allclose(frame["pvals_adj"], ours.ranked("pvals_adj")[2], rtol=1e-12)
    assert back.uns["rank_genes_groups"]["params"]["groupby"] == "fedspatial_domain"
    sc.pp.normalize_total(back, target_sum=1e4)
    sc.pp.log1p(back)
    back.X = back.X.toarray()  # scanpy 1.11.5's dotplot fails on a sparse X here, its own results too
    sc.pl.rank_genes_groups_dotplot(back, n_genes=3, dendrogram=False, show=False)  # scanpy's own plot reads it


# ------------------------------------------------------------------ the phase, without Flower
class _Federation:
    """Routes ``query.markers`` to the sites' half of the phase; records what was asked."""

    def __init__(self, sites: Mapping[str, Any]) -> None:
        self._sites, self.asked = dict(sites), []

    @property
    def sites(self) -> list[str]:
        return sorted(self._sites)

    def ask(self, query: str, payload: Any = None, *, sites: Any = None, require_all: bool = False) -> dict[str, Payload]:
        self.asked.append(query)
        return {n: MarkersPhase().answer(self._sites[n], query, payload) for n in self.sites}


def _phase_setup(tmp_path: Path, *, local_dp: bool) -> tuple[_Federation, Run, dict[str, list[ad.AnnData]]]:
    fed = _federation()
    cfg = ExperimentConfig.from_dict({"privacy": {"local-dp": local_dp}, "markers": {"marker-plot-genes": 3}})
    sites, descriptions = {}, {}
    for name in sorted(fed):
        sections = [SimpleNamespace(site=name, name=f"s{i}", key=f"{name}/s{i}", adata=a) for i, a in enumerate(fed[name])]
        state = MemoryState()
        state.put(DOMAINS_STATE, Payload(arrays={"domains": np.concatenate([_domains(a) for a in fed[name]])}, config={"n-domains": 5}))
        out = tmp_path / "sites" / name
        out.mkdir(parents=True)
        for s in sections:  # what finalize wrote
            annotated = s.adata.copy()
            annotated.obs["fedspatial_domain"] = pd.Categorical(_domains(s.adata).astype(str), categories=[str(k) for k in range(5)])
            annotated.write_h5ad(annotated_path(out, s))  # type: ignore[arg-type]
        sites[name] = SimpleNamespace(name=name, cfg=cfg, state=state, sections=sections, output_dir=out, feature_key=None,
                                      n_cells=sum(a.n_obs for a in fed[name]))
        descriptions[name] = SiteDescription(0, [s.key for s in sections], [name] * len(sections), [], {s.key: list(s.adata.var_names) for s in sections}, [])
    run = Run(cfg, {}, tmp_path)
    run.sites = descriptions
    run.domains = DomainModel(np.zeros((5, 2)), 1.0, {})
    return _Federation(sites), run, fed


def test_phase_writes_csv_plot_and_site_uns(tmp_path: Path) -> None:
    federation, run, fed = _phase_setup(tmp_path, local_dp=False)
    MarkersPhase().run(federation, run)
    assert federation.asked == ["markers", "markers"]
    expected = _federated(fed, "t-test")
    table = pd.read_csv(tmp_path / CSV_NAME, dtype={"domain": str})
    assert list(table.columns) == ["domain", "rank", "gene", "score", "logfoldchange", "pval", "pval_adj"]
    assert len(table) == 5 * 40 and table["gene"].tolist() == expected.to_frame()["gene"].tolist()
    np.testing.assert_allclose(table["score"], expected.to_frame()["score"], rtol=1e-12)
    assert (tmp_path / PLOT_NAME).stat().st_size > 0
    assert run.report["markers"]["n-genes"] == 40 and run.report["markers"]["top"] == expected.top(3)
    for path in sorted((tmp_path / "sites").rglob("*.h5ad")):
        frame = sc.get.rank_genes_groups_df(ad.read_h5ad(path), group="0")
        assert frame["names"].tolist() == list(expected.ranked("names")[0])


def test_local_dp_releases_no_marker_statistics(tmp_path: Path) -> None:
    federation, run, _ = _phase_setup(tmp_path, local_dp=True)
    MarkersPhase().run(federation, run)
    assert federation.asked == []  # nothing was asked, so nothing left a site
    assert "privacy.local-dp" in run.report["markers"]["skipped"]
    assert not (tmp_path / CSV_NAME).exists()
    site = federation._sites["hospital_a"]
    with pytest.raises(PermissionError, match="local-dp"):  # and a site refuses if asked anyway
        MarkersPhase().answer(site, "markers", Payload(config={"stage": "sums", "genes": ["F0000"], "n-domains": 5, "target-sum": 1e4}))
