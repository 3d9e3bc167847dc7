"""Federated marker genes: scanpy's t-test ranking of each domain against the rest,
computed from per-domain, per-gene sums.

A site computes :class:`DomainGeneSums` of its cells with :func:`domain_gene_sums`
(``K x G`` sums of the log-normalized expression, of its squares, and counts; never a
cell); the server adds the sites' sums in site-name order (:func:`merge_domain_gene_sums`)
and ranks the genes of every domain against all other cells with :func:`rank_markers`.
The result equals ``scanpy.tl.rank_genes_groups(adata, groupby, method=...)`` on the
pooled, ``normalize_total`` + ``log1p`` data for ``method`` ``"t-test"`` and
``"t-test_overestim_var"``: Welch's t-test from group and rest means and unbiased
variances, Benjamini-Hochberg adjusted p-values, scanpy's log2 fold change of the
``expm1`` means and its order of the genes.

A rank-based test (Wilcoxon) needs the ranks of all pooled cells, which sums cannot
give; it is not offered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from fedspatial.shared.features.feature_stats import to_numpy
from fedspatial.shared.features.harmonization import count_blocks
from fedspatial.shared.features.normalization import (
    check_target_sum,
    log1p_matrix,
    normalize_total_f64,
)

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "METHODS",
    "DomainGeneSums",
    "MarkerMethod",
    "Markers",
    "benjamini_hochberg",
    "domain_gene_sums",
    "merge_domain_gene_sums",
    "rank_markers",
    "scanpy_order",
]

logger = logging.getLogger(__name__)

MarkerMethod = Literal["t-test", "t-test_overestim_var"]
METHODS: tuple[str, ...] = ("t-test", "t-test_overestim_var")
SUM_FIELDS = ("n_cells", "sums", "sums_sq", "n_expressed")
FOLD_PSEUDOCOUNT = 1e-9
"""scanpy adds it to both ``expm1`` means so that a gene absent from one side has a finite fold change."""


@dataclass
class DomainGeneSums:
    """Per-domain, per-gene aggregates of log-normalized expression (one site, or merged).

    Attributes
    ----------
    genes
        Gene names, the column order of every ``(K, G)`` array.
    n_cells
        ``float64 (K,)``: cells per domain.
    sums, sums_sq
        ``float64 (K, G)``: sum and sum of squares over the domain's cells of
        ``log1p(normalize_total(counts))``.
    n_expressed
        ``float64 (K, G)``: cells of the domain with a count ``> 0`` (the dot plot's fraction).
    """

    genes: list[str]
    n_cells: np.ndarray
    sums: np.ndarray
    sums_sq: np.ndarray
    n_expressed: np.ndarray

    def __post_init__(self) -> None:
        self.genes = [str(g) for g in self.genes]
        self.n_cells = np.asarray(self.n_cells, dtype=np.float64).reshape(-1)
        shape = (self.n_cells.size, len(self.genes))
        for name in SUM_FIELDS[1:]:
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"DomainGeneSums.{name} has shape {arr.shape}; expected {shape} (domains x genes)")
            setattr(self, name, arr)

    @property
    def n_domains(self) -> int:
        return int(self.n_cells.size)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The four arrays keyed by field name (what a site sends)."""
        return {name: np.array(getattr(self, name), dtype=np.float64) for name in SUM_FIELDS}

    @classmethod
    def from_arrays(cls, genes: Sequence[str], arrays: Mapping[str, Any]) -> DomainGeneSums:
        missing = [name for name in SUM_FIELDS if name not in arrays]
        if missing:
            raise ValueError(f"marker sums lack {missing}; expected {list(SUM_FIELDS)}")
        return cls(list(genes), *(to_numpy(arrays[name]) for name in SUM_FIELDS))


def domain_gene_sums(
    adatas: Sequence[AnnData],
    domains: Sequence[np.ndarray],
    genes: Sequence[str],
    *,
    n_domains: int,
    target_sum: float = 1e4,
    feature_key: str | None = None,
    layer: str | None = None,
) -> DomainGeneSums:
    """A site's per-domain sums over ``genes``.

    Each section is restricted to ``genes`` (so a cell's library size is its total over
    them, as in the project's feature space), normalized to ``target_sum`` and
    ``log1p``-transformed in float64.

    Parameters
    ----------
    adatas
        The site's sections, raw counts.
    domains
        ``int (n_obs,)`` per section: each cell's domain in ``0..n_domains-1``.
    genes
        Gene names matched with ``feature_key`` (``None``: ``var_names``).
    n_domains
        K, the number of domains of the federation (a domain may have no cell here).
    """
    target = check_target_sum(target_sum)
    genes = [str(g) for g in genes]
    k, g = int(n_domains), len(genes)
    n_cells = np.zeros(k)
    sums, sums_sq, expressed = np.zeros((k, g)), np.zeros((k, g)), np.zeros((k, g))
    for adata, dom in zip(adatas, domains, strict=True):
        dom = np.asarray(dom, dtype=np.int64)
        if dom.shape != (adata.n_obs,) or (dom.size and (dom.min() < 0 or dom.max() >= k)):
            raise ValueError(f"domains must be {adata.n_obs} ids in 0..{k - 1}")
        n_cells += np.bincount(dom, minlength=k)
        # block by block, so that all genes of a large section never sit in memory in float64
        for rows, counts in count_blocks(adata, genes, feature_key, layer):
            logged = log1p_matrix(normalize_total_f64(counts, target))
            d = dom[rows]
            # (K x n) indicator times (n x G): per-domain column sums in one product
            member = sparse.csr_matrix((np.ones(d.size), (d, np.arange(d.size))), shape=(k, d.size))
            if isinstance(logged, sparse.csr_matrix):
                squared, positive = logged.multiply(logged), (logged > 0).astype(np.float64)
            else:
                squared, positive = logged**2, (logged > 0).astype(np.float64)
            sums += _dense(member @ logged)
            sums_sq += _dense(member @ squared)
            expressed += _dense(member @ positive)
    return DomainGeneSums(genes, n_cells, sums, sums_sq, expressed)


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def merge_domain_gene_sums(parts: Sequence[DomainGeneSums]) -> DomainGeneSums:
    """Sum the sites' aggregates, in the order given (site-name order, so the result
    does not depend on which site answered first)."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge_domain_gene_sums needs at least one site's sums")
    first = parts[0]
    for i, p in enumerate(parts[1:], start=1):
        if p.genes != first.genes or p.n_domains != first.n_domains:
            raise ValueError(f"marker sums #{i} cover other genes or domains than #0")
    total = {name: np.sum([getattr(p, name) for p in parts], axis=0) for name in SUM_FIELDS}
    return DomainGeneSums(first.genes, **total)


@dataclass
class Markers:
    """Every gene ranked for every tested domain against the rest.

    ``T`` is the number of tested domains (those with at least 2 cells; scanpy refuses
    smaller groups), ``G`` the number of genes. Statistics are in gene order; ``order``
    ranks them.

    Attributes
    ----------
    method
        ``"t-test"`` or ``"t-test_overestim_var"``.
    genes
        ``G`` gene names.
    groups
        ``T`` domain names (``"0"``..), in domain order.
    order
        ``int64 (T, G)``: gene indices, best first (scanpy's order).
    scores, logfoldchanges, pvals, pvals_adj
        ``float64 (T, G)`` in gene order.
    means, fractions
        ``float64 (K, G)``: every domain's mean log-expression and fraction of cells
        expressing each gene (NaN for an empty domain).
    """

    method: str
    genes: list[str]
    groups: list[str]
    order: np.ndarray
    scores: np.ndarray
    logfoldchanges: np.ndarray
    pvals: np.ndarray
    pvals_adj: np.ndarray
    means: np.ndarray
    fractions: np.ndarray

    RESULT_FIELDS: ClassVar[tuple[str, ...]] = ("scores", "logfoldchanges", "pvals", "pvals_adj")

    def ranked(self, name: str) -> np.ndarray:
        """``(T, G)`` field ``name`` (a statistic, or ``"names"``) in ranked order."""
        if name == "names":
            return np.asarray(self.genes, dtype=object)[self.order]
        return np.take_along_axis(getattr(self, name), self.order, axis=1)

    def top(self, n: int) -> dict[str, list[str]]:
        """The ``n`` best genes of every tested domain."""
        names = self.ranked("names")
        return {group: [str(g) for g in names[i, :n]] for i, group in enumerate(self.groups)}

    def to_frame(self) -> pd.DataFrame:
        """One row per domain and rank: domain, rank (1 = best), gene, score,
        logfoldchange, pval, pval_adj."""
        t, g = self.order.shape
        return pd.DataFrame({
            "domain": np.repeat(self.groups, g),
            "rank": np.tile(np.arange(1, g + 1), t),
            "gene": self.ranked("names").ravel(),
            "score": self.ranked("scores").ravel(),
            "logfoldchange": self.ranked("logfoldchanges").ravel(),
            "pval": self.ranked("pvals").ravel(),
            "pval_adj": self.ranked("pvals_adj").ravel(),
        })

    def to_arrays(self) -> dict[str, np.ndarray]:
        """What the server sends each site to store (``(T, G)`` arrays)."""
        return {"order": self.order, **{name: getattr(self, name) for name in self.RESULT_FIELDS}}

    def to_uns(self, *, groupby: str, names: Mapping[str, str] | None = None) -> dict[str, Any]:
        """scanpy's ``adata.uns["rank_genes_groups"]`` layout: record arrays indexed by
        group (names as objects, scores and fold changes float32, p-values float64) and
        ``params``; ``names`` maps gene ids to the section's ``var_names``."""
        ranked_names = self.ranked("names")
        if names is not None:
            ranked_names = np.vectorize(lambda v: names.get(v, v), otypes=[object])(ranked_names)
        fields = {"names": (ranked_names, object), "scores": (self.ranked("scores"), np.float32),
                  "logfoldchanges": (self.ranked("logfoldchanges"), np.float32),
                  "pvals": (self.ranked("pvals"), np.float64), "pvals_adj": (self.ranked("pvals_adj"), np.float64)}
        out: dict[str, Any] = {"params": {
            "groupby": groupby, "reference": "rest", "method": self.method, "use_raw": False,
            "layer": None, "corr_method": "benjamini-hochberg",
        }}
        for key, (values, dtype) in fields.items():
            out[key] = np.rec.fromarrays(list(values.astype(dtype)), dtype=[(grp, dtype) for grp in self.groups])
        return out

    @classmethod
    def from_arrays(cls, method: str, genes: Sequence[str], groups: Sequence[str], arrays: Mapping[str, Any]) -> Markers:
        """Rebuild at a site from :meth:`to_arrays` (no per-domain means: the site needs none)."""
        got = {name: np.asarray(to_numpy(arrays[name]), dtype=np.float64) for name in cls.RESULT_FIELDS}
        empty = np.zeros((0, len(genes)))
        return cls(method, list(genes), list(groups), to_numpy(arrays["order"]).astype(np.int64),
                   scores=got["scores"], logfoldchanges=got["logfoldchanges"], pvals=got["pvals"],
                   pvals_adj=got["pvals_adj"], means=empty, fractions=empty)


def rank_markers(sums: DomainGeneSums, *, method: str = "t-test") -> Markers:
    """Rank every gene of every domain with at least 2 cells against all other cells,
    as ``scanpy.tl.rank_genes_groups(..., reference="rest", method=method)`` does.

    Welch's t-test (``scipy.stats.ttest_ind_from_stats``) from the group's and the
    rest's means and unbiased variances (``E[x^2] - E[x]^2`` times ``n / (n - 1)``, as
    scanpy's ``_get_mean_var``); ``"t-test_overestim_var"`` divides the rest's variance
    by the group's size instead of the rest's. NaN scores become 0 and NaN p-values 1
    (scanpy's convention for genes constant on both sides).
    """
    from scipy import stats

    if method not in METHODS:
        raise ValueError(f"marker method must be one of {list(METHODS)}; got {method!r}")
    n = sums.n_cells
    tested = np.flatnonzero(n >= 2)
    if len(tested) < 1 or n.sum() - n[tested].min() < 1:
        raise ValueError(f"marker genes need a domain with >= 2 cells and other cells to compare with; sizes {n.tolist()}")
    skipped = [str(k) for k in np.flatnonzero(n < 2)]
    if skipped:
        logger.warning("marker genes: domain(s) %s hold fewer than 2 cells and are not tested", ", ".join(skipped))
    results: dict[str, list[np.ndarray]] = {name: [] for name in ("order", *Markers.RESULT_FIELDS)}
    for k in tested:
        rest = np.arange(sums.n_domains) != k
        n_group, n_rest = float(n[k]), float(n[rest].sum())
        mean_g, var_g = _mean_var(sums.sums[k], sums.sums_sq[k], n_group)
        mean_r, var_r = _mean_var(sums.sums[rest].sum(axis=0), sums.sums_sq[rest].sum(axis=0), n_rest)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores, pvals = stats.ttest_ind_from_stats(
                mean_g, np.sqrt(var_g), n_group, mean_r, np.sqrt(var_r),
                n_group if method == "t-test_overestim_var" else n_rest, equal_var=False,
            )
        scores = np.where(np.isnan(scores), 0.0, scores)
        pvals = np.where(np.isnan(pvals), 1.0, pvals)
        fold = (np.expm1(mean_g) + FOLD_PSEUDOCOUNT) / (np.expm1(mean_r) + FOLD_PSEUDOCOUNT)
        results["order"].append(scanpy_order(scores))
        results["scores"].append(scores)
        results["pvals"].append(pvals)
        results["pvals_adj"].append(benjamini_hochberg(pvals))
        results["logfoldchanges"].append(np.log2(fold))
    with np.errstate(invalid="ignore", divide="ignore"):
        means, fractions = sums.sums / n[:, None], sums.n_expressed / n[:, None]
    stacked = {name: np.vstack(values) for name, values in results.items()}
    return Markers(method, list(sums.genes), [str(k) for k in tested], stacked["order"].astype(np.int64),
                   scores=stacked["scores"], logfoldchanges=stacked["logfoldchanges"], pvals=stacked["pvals"],
                   pvals_adj=stacked["pvals_adj"], means=means, fractions=fractions)


def _mean_var(total: np.ndarray, total_sq: np.ndarray, n: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from sums, exactly scanpy's definition (no clipping:
    a rounding-negative variance gives NaN there, and the same here)."""
    mean = total / n
    var = total_sq / n - mean**2
    if n != 1:
        var = var * (n / (n - 1))
    return mean, var


def scanpy_order(scores: np.ndarray) -> np.ndarray:
    """Gene indices by decreasing score, tied genes in the order scanpy puts them.

    scanpy selects the top genes with ``argpartition`` and sorts that selection with
    numpy's default (unstable) ``argsort``; the same two steps on the same scores give
    the same order for ties (genes constant in both groups all score 0)."""
    scores = np.asarray(scores)
    n = scores.size
    selected = np.argpartition(scores, -n)[-n:]
    return selected[np.argsort(scores[selected])[::-1]]


def benjamini_hochberg(pvals: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels' ``fdr_bh``, scanpy's default):
    ``p_(i) * m / i``, made monotone from the largest down, capped at 1."""
    p = np.asarray(pvals, dtype=np.float64)
    m = p.size
    order = np.argsort(p)
    stepped = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(stepped[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out
