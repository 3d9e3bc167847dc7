"""Expression of the synthetic federation: programs shared by all sites, each site's
batch effects, and negative-binomial counts of a section's spots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from fedspatial.shared.data.synthetic_tissue import smooth_field

if TYPE_CHECKING:
    from fedspatial.shared.data.synthetic import SyntheticSpec

__all__ = [
    "STREAM_PROGRAMS",
    "STREAM_SECTION",
    "STREAM_SITE",
    "Programs",
    "SiteBatch",
    "make_programs",
    "make_site_batch",
    "sample_counts",
]

# Seed-stream tags: keep global programs, site batch effects and sections independent.
STREAM_PROGRAMS = 0
STREAM_SITE = 1
STREAM_SECTION = 2
_N_NUISANCE = 4  # spot-level cell-composition programs


@dataclass(frozen=True)
class Programs:
    """Federation-wide biology shared by all sites."""

    log_baseline: np.ndarray  # (G,) log baseline proportions
    domain_lfc: np.ndarray  # (K, G) domain log-fold changes
    depth_lfc: np.ndarray  # (G,) log-fold change per unit of centred depth
    nuisance_lfc: np.ndarray  # (M, G) spot-level cell-composition programs
    domain_library: np.ndarray  # (K,) domain effect on total counts (cell density)
    phi: np.ndarray  # (G,) NB overdispersion
    n_layered: int  # domains 0..n_layered-1 are layers, the rest are patches


@dataclass(frozen=True)
class SiteBatch:
    """Technical distortions of one site."""

    library_factor: float
    feature_scale: np.ndarray  # (G,)
    dropout: float
    domain_weight: np.ndarray  # (K,) relative domain abundance


def make_programs(spec: SyntheticSpec) -> Programs:
    """Draw baseline means, domain programs and dispersions shared by all sites."""
    rng = np.random.default_rng([spec.seed, STREAM_PROGRAMS])
    n_genes, n_domains = spec.n_features, spec.n_domains
    log_baseline = rng.normal(0.0, 1.0, size=n_genes)
    log_baseline -= np.log(np.exp(log_baseline).sum())

    # Each domain up-regulates ~8% and down-regulates ~4% of features; programs overlap.
    n_up = max(2, round(0.08 * n_genes))
    n_down = max(1, round(0.04 * n_genes))
    domain_lfc = np.zeros((n_domains, n_genes))
    for k in range(n_domains):
        chosen = rng.choice(n_genes, size=n_up + n_down, replace=False)
        size = spec.effect_strength * rng.lognormal(0.0, 0.35, size=n_up + n_down)
        domain_lfc[k, chosen[:n_up]] += size[:n_up]
        domain_lfc[k, chosen[n_up:]] -= size[n_up:]

    depth_lfc = np.zeros(n_genes)
    graded = rng.choice(n_genes, size=max(1, round(0.05 * n_genes)), replace=False)
    depth_lfc[graded] = spec.depth_gradient * rng.choice([-1.0, 1.0], size=len(graded))

    # Cell-composition programs: each spot mixes cell types independently of its domain.
    nuisance_lfc = np.zeros((_N_NUISANCE, n_genes))
    for m in range(_N_NUISANCE):
        chosen = rng.choice(n_genes, size=max(2, round(0.1 * n_genes)), replace=False)
        nuisance_lfc[m, chosen] = rng.choice([-1.0, 1.0], size=len(chosen)) * rng.lognormal(
            0.0, 0.3, len(chosen)
        )

    phi = spec.overdispersion * rng.lognormal(0.0, 0.5, size=n_genes)
    return Programs(
        log_baseline=log_baseline,
        domain_lfc=domain_lfc,
        depth_lfc=depth_lfc,
        nuisance_lfc=spec.spot_heterogeneity * nuisance_lfc,
        domain_library=rng.lognormal(0.0, 0.15, size=n_domains),
        phi=phi,
        n_layered=max(1, n_domains - max(1, (2 * n_domains) // 5)),
    )


def _domain_weights(spec: SyntheticSpec, site: int) -> np.ndarray:
    """Relative domain abundance at ``site``: one rare domain per site, one absent at the last."""
    weights = np.ones(spec.n_domains)
    last = spec.n_sites - 1
    if spec.absent_domain and spec.n_sites > 1 and site == last:
        weights[-1] = 0.0
    else:
        # Rotate the rare domain over sites; never the absent one, which stays common elsewhere.
        weights[(spec.n_domains - 2 - site) % (spec.n_domains - 1)] = spec.rare_domain_weight
    return weights


def make_site_batch(spec: SyntheticSpec, site: int) -> SiteBatch:
    """Site ``site``'s library factor, per-feature scaling, dropout and domain abundances."""
    rng = np.random.default_rng([spec.seed, STREAM_SITE, site])
    # Evenly spread factors guarantee visibly different depths across sites.
    spread = np.linspace(-spec.site_library_spread, spec.site_library_spread, spec.n_sites)
    order = np.random.default_rng([spec.seed, STREAM_SITE]).permutation(spec.n_sites)
    return SiteBatch(
        library_factor=float(np.exp(spread[order[site]])),
        feature_scale=rng.lognormal(0.0, spec.batch_sigma, size=spec.n_features),
        dropout=spec.dropout if site % 2 == 1 else 0.0,
        domain_weight=_domain_weights(spec, site),
    )


def sample_counts(
    rng: np.random.Generator,
    labels: np.ndarray,
    depth: np.ndarray,
    xy_unit: np.ndarray,
    spec: SyntheticSpec,
    programs: Programs,
    batch: SiteBatch,
) -> sparse.csr_matrix:
    """Negative-binomial counts (gamma-Poisson) with batch effects and dropout."""
    n = len(labels)
    mixing = rng.normal(size=(n, len(programs.nuisance_lfc)))
    logits = (
        programs.log_baseline
        + programs.domain_lfc[labels]
        + np.outer(depth - 0.5, programs.depth_lfc)
        + mixing @ programs.nuisance_lfc
    )
    logits -= logits.max(axis=1, keepdims=True)
    composition = np.exp(logits)
    composition /= composition.sum(axis=1, keepdims=True)

    section_factor = rng.lognormal(0.0, 0.1)
    log_lib = (
        np.log(spec.library_size * batch.library_factor * section_factor)
        + np.log(programs.domain_library[labels])
        + 0.15 * smooth_field(rng, xy_unit, 0.25)  # tissue-density gradient
        + rng.normal(0.0, spec.library_sigma, size=n)
    )
    section_scale = rng.lognormal(0.0, 0.05, size=spec.n_features)
    mu = composition * np.exp(log_lib)[:, None] * (batch.feature_scale * section_scale)

    shape = 1.0 / programs.phi
    counts = rng.poisson(rng.gamma(shape, mu / shape)).astype(np.float32)
    if batch.dropout > 0.0:
        counts[rng.random(counts.shape) < batch.dropout] = 0.0
    return sparse.csr_matrix(counts)

