"""Built-in synthetic spatial-omics federation (demo, tests and benchmarks).

Each site ("hospital_a", "hospital_b", ...) holds a few tissue sections measured on a
Visium-like hexagonal spot grid. Every section has its own random tissue outline and a
spatial domain layout made of wavy cortical-like layers plus patchy blobs. Counts are
negative-binomial draws from domain-specific expression programs, distorted by
site-specific batch effects (library size, per-feature capture efficiency, extra dropout).
Some domains are rare at some sites and one is absent at the last site, so no single site
sees the whole picture.

Calibration of the defaults (``effect_strength=0.4``, ``spot_heterogeneity=0.3``): PCA +
k-means on single spots reaches ARI ~0.05-0.15 per section, the same after averaging over
two rings of hexagonal neighbours ~0.6-0.85; pooling all sites without batch correction
falls to ~0.2, while per-section centring recovers ~0.8.

Everything is vectorised and driven by ``numpy.random.Generator`` streams seeded from
``(seed, site, section)``, so the same spec always yields identical arrays.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

log = logging.getLogger(__name__)

MANIFEST_NAME = "federation.json"

# Seed-stream tags: keep global programs, site batch effects and sections independent.
_STREAM_PROGRAMS = 0
_STREAM_SITE = 1
_STREAM_SECTION = 2
_N_NUISANCE = 4  # spot-level cell-composition programs


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the synthetic federation.

    Parameters
    ----------
    n_sites
        Number of sites (hospitals).
    sections_per_site
        Number of tissue sections at each site; ``len == n_sites``.
    spots_per_section
        ``(min, max)`` spots per section; each section's size is drawn from this range.
    n_features
        Number of features (genes, proteins or m/z bins).
    n_domains
        Number of spatial domains (ground-truth labels ``"D0"``..``"D{K-1}"``).
    seed
        Master seed; the same spec always produces identical data.
    effect_strength
        Scale of the domain log-fold changes. Lower values make single spots noisier, so
        neighbourhood smoothing matters more.
    depth_gradient
        Log-fold change range of features that vary smoothly with cortical depth; makes
        neighbouring layers resemble each other.
    spot_heterogeneity
        Strength of spot-level cell-composition programs unrelated to domains (random per
        spot); they blur single spots but average out over a neighbourhood.
    library_size
        Median total counts per spot before batch effects.
    library_sigma
        Log-normal sigma of per-spot library sizes.
    overdispersion
        Median negative-binomial overdispersion ``phi`` (variance = mu + phi * mu**2).
    site_library_spread
        Site library-size factors span ``exp(-spread)``..``exp(+spread)``.
    batch_sigma
        Log-normal sigma of each site's per-feature multiplicative scaling.
    dropout
        Extra zero-inflation probability at every second site (hospital_b, hospital_d, ...).
    rare_domain_weight
        Relative abundance of the domain made rare at each site except the last.
    absent_domain
        Whether the last domain is absent from the last site.
    spot_spacing
        Centre-to-centre distance of the hexagonal spot grid (Visium: 100 um).
    """

    n_sites: int = 3
    sections_per_site: tuple[int, ...] = (3, 2, 2)
    spots_per_section: tuple[int, int] = (450, 900)
    n_features: int = 400
    n_domains: int = 5
    seed: int = 0
    effect_strength: float = 0.4
    depth_gradient: float = 0.4
    spot_heterogeneity: float = 0.3
    library_size: float = 2000.0
    library_sigma: float = 0.35
    overdispersion: float = 0.3
    site_library_spread: float = 0.3
    batch_sigma: float = 0.4
    dropout: float = 0.1
    rare_domain_weight: float = 0.15
    absent_domain: bool = True
    spot_spacing: float = 100.0

    def __post_init__(self) -> None:
        # Accept lists (e.g. a spec read back from federation.json) but store tuples.
        object.__setattr__(self, "sections_per_site", tuple(int(n) for n in self.sections_per_site))
        object.__setattr__(self, "spots_per_section", tuple(int(n) for n in self.spots_per_section))
        problems = self._problems()
        if problems:
            raise ValueError("invalid SyntheticSpec: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if self.n_sites < 1:
            problems.append(f"n_sites must be >= 1 (got {self.n_sites})")
        if len(self.sections_per_site) != self.n_sites:
            problems.append(
                f"sections_per_site needs one entry per site: got {len(self.sections_per_site)} "
                f"entries for n_sites={self.n_sites}"
            )
        if any(n < 1 for n in self.sections_per_site):
            problems.append("every site needs at least one section")
        if len(self.spots_per_section) != 2:
            problems.append("spots_per_section must be (min, max)")
        else:
            lo, hi = self.spots_per_section
            if lo < 1 or hi < lo:
                problems.append(f"spots_per_section must satisfy 1 <= min <= max (got {lo}, {hi})")
        if self.n_domains < 2:
            problems.append(f"n_domains must be >= 2 (got {self.n_domains})")
        if self.n_features < 4 * self.n_domains:
            problems.append(
                f"n_features must be >= 4 * n_domains to leave room for domain programs "
                f"(got {self.n_features} for {self.n_domains} domains)"
            )
        if self.seed < 0:
            problems.append(f"seed must be non-negative (got {self.seed})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if not 0.0 < self.rare_domain_weight <= 1.0:
            problems.append(f"rare_domain_weight must be in (0, 1] (got {self.rare_domain_weight})")
        if self.library_size <= 0 or self.overdispersion <= 0 or self.spot_spacing <= 0:
            problems.append("library_size, overdispersion and spot_spacing must be positive")
        return problems

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SyntheticSpec:
        """Rebuild a spec from :meth:`to_dict` output, JSON or ``uns["synthetic"]`` (numpy values)."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown SyntheticSpec field(s): {', '.join(sorted(unknown))}")
        return cls(
            **{
                k: v.tolist() if isinstance(v, np.ndarray | np.generic) else v
                for k, v in values.items()
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON/h5ad-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def domain_names(self) -> list[str]:
        """Full, ordered category list of ``obs["domain"]``."""
        return [f"D{k}" for k in range(self.n_domains)]

    @property
    def site_names(self) -> list[str]:
        """Site names in order: ``hospital_a``, ``hospital_b``, ..."""
        return [site_name(i) for i in range(self.n_sites)]


@dataclass(frozen=True)
class _Programs:
    """Federation-wide biology shared by all sites."""

    log_baseline: np.ndarray  # (G,) log baseline proportions
    domain_lfc: np.ndarray  # (K, G) domain log-fold changes
    depth_lfc: np.ndarray  # (G,) log-fold change per unit of centred depth
    nuisance_lfc: np.ndarray  # (M, G) spot-level cell-composition programs
    domain_library: np.ndarray  # (K,) domain effect on total counts (cell density)
    phi: np.ndarray  # (G,) NB overdispersion
    n_layered: int  # domains 0..n_layered-1 are layers, the rest are patches


@dataclass(frozen=True)
class _SiteBatch:
    """Technical distortions of one site."""

    library_factor: float
    feature_scale: np.ndarray  # (G,)
    dropout: float
    domain_weight: np.ndarray  # (K,) relative domain abundance


def site_name(index: int) -> str:
    """Name of site ``index``: hospital_a..hospital_z, then hospital_aa, hospital_ab, ..."""
    letters = string.ascii_lowercase
    suffix = ""
    index += 1
    while index > 0:
        index, rem = divmod(index - 1, 26)
        suffix = letters[rem] + suffix
    return f"hospital_{suffix}"


# ----------------------------------------------------------------------------- geometry


def _smooth_field(
    rng: np.random.Generator, xy: np.ndarray, length_scale: float, n_waves: int = 96
) -> np.ndarray:
    """Standardised smooth Gaussian random field at ``xy`` (random Fourier features).

    Grid-free and O(n * n_waves), so it scales to large sections.
    """
    omega = rng.normal(scale=1.0 / length_scale, size=(n_waves, 2))
    phase = rng.uniform(0.0, 2.0 * np.pi, size=n_waves)
    field = np.cos(xy @ omega.T + phase).sum(axis=1)
    return (field - field.mean()) / (field.std() + 1e-12)


def _hex_grid(
    n_rows: int, n_cols: int, spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visium-like hexagonal grid: returns (xy, array_row, array_col)."""
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    rows, cols = rows.ravel(), cols.ravel()
    x = cols * spacing + (rows % 2) * spacing / 2.0
    y = rows * spacing * np.sqrt(3.0) / 2.0
    return np.column_stack([x, y]), rows, cols


def _rotate(xy: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return xy @ np.array([[c, -s], [s, c]])


def _tissue_spots(
    rng: np.random.Generator, n_spots: int, spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick exactly ``n_spots`` grid spots forming an irregular, blob-shaped tissue."""
    side = int(np.ceil(np.sqrt(4.0 * n_spots))) + 4  # ~4x the tissue area: room for odd shapes
    xy, rows, cols = _hex_grid(side, side, spacing)
    centred = xy - xy.mean(axis=0)
    radius = np.sqrt(n_spots) * spacing
    aspect = rng.uniform(0.75, 1.33)
    rot = _rotate(centred, rng.uniform(0.0, np.pi)) / radius
    ellipse = np.hypot(rot[:, 0] / aspect, rot[:, 1] * aspect)
    outline = ellipse + 0.08 * _smooth_field(rng, centred / radius, 0.35)
    keep = np.sort(np.argpartition(outline, n_spots - 1)[:n_spots])
    coords = xy[keep] + rng.normal(scale=0.02 * spacing, size=(n_spots, 2))  # slight jitter
    coords += rng.uniform(5.0, 15.0, size=2) * spacing  # arbitrary slide offset
    return coords, rows[keep], cols[keep]


def _domain_layout(
    rng: np.random.Generator, xy: np.ndarray, weights: np.ndarray, n_layered: int
) -> tuple[np.ndarray, np.ndarray]:
    """Assign domains: wavy layers by depth, then patches from thresholded fields.

    Returns ``(labels, depth)`` where depth is the rank-normalised layer coordinate in [0, 1].
    """
    n = len(xy)
    scale = max(float(np.ptp(xy, axis=0).mean()), 1.0)  # tissue diameter
    uv = _rotate(xy - xy.mean(axis=0), rng.uniform(0.0, 2.0 * np.pi)) / scale
    u, v = uv[:, 0], uv[:, 1]
    wavelength = rng.uniform(0.5, 1.2)
    depth = (
        u
        + rng.uniform(0.05, 0.12) * np.sin(2.0 * np.pi * v / wavelength + rng.uniform(0, 2 * np.pi))
        + rng.uniform(-0.4, 0.4) * v**2  # cortical curvature
        + 0.03 * _smooth_field(rng, uv, 0.08)  # ragged boundaries
    )
    depth = np.argsort(np.argsort(depth)) / max(n - 1, 1)

    layer_w = weights[:n_layered]
    cum = np.cumsum(layer_w) / layer_w.sum()
    labels = np.minimum(np.searchsorted(cum, depth, side="right"), n_layered - 1)

    # Patch coverage: a full-weight patch domain covers ~1/K of the tissue.
    n_domains = len(weights)
    for k in range(n_layered, n_domains):
        coverage = weights[k] / n_domains
        field = _smooth_field(rng, uv, rng.uniform(0.07, 0.12))
        if coverage <= 0.0:
            continue
        labels[field >= np.quantile(field, 1.0 - coverage)] = k
    return labels, depth


# ----------------------------------------------------------------------------- expression


def _make_programs(spec: SyntheticSpec) -> _Programs:
    """Draw baseline means, domain programs and dispersions shared by all sites."""
    rng = np.random.default_rng([spec.seed, _STREAM_PROGRAMS])
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
    return _Programs(
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


def _make_site_batch(spec: SyntheticSpec, site: int) -> _SiteBatch:
    rng = np.random.default_rng([spec.seed, _STREAM_SITE, site])
    # Evenly spread factors guarantee visibly different depths across sites.
    spread = np.linspace(-spec.site_library_spread, spec.site_library_spread, spec.n_sites)
    order = np.random.default_rng([spec.seed, _STREAM_SITE]).permutation(spec.n_sites)
    return _SiteBatch(
        library_factor=float(np.exp(spread[order[site]])),
        feature_scale=rng.lognormal(0.0, spec.batch_sigma, size=spec.n_features),
        dropout=spec.dropout if site % 2 == 1 else 0.0,
        domain_weight=_domain_weights(spec, site),
    )


def _sample_counts(
    rng: np.random.Generator,
    labels: np.ndarray,
    depth: np.ndarray,
    xy_unit: np.ndarray,
    spec: SyntheticSpec,
    programs: _Programs,
    batch: _SiteBatch,
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
        + 0.15 * _smooth_field(rng, xy_unit, 0.25)  # tissue-density gradient
        + rng.normal(0.0, spec.library_sigma, size=n)
    )
    section_scale = rng.lognormal(0.0, 0.05, size=spec.n_features)
    mu = composition * np.exp(log_lib)[:, None] * (batch.feature_scale * section_scale)

    shape = 1.0 / programs.phi
    counts = rng.poisson(rng.gamma(shape, mu / shape)).astype(np.float32)
    if batch.dropout > 0.0:
        counts[rng.random(counts.shape) < batch.dropout] = 0.0
    return sparse.csr_matrix(counts)


# ----------------------------------------------------------------------------- assembly


def _make_section(
    spec: SyntheticSpec, programs: _Programs, batch: _SiteBatch, site: int, index: int
) -> anndata.AnnData:
    rng = np.random.default_rng([spec.seed, _STREAM_SECTION, site, index])
    lo, hi = spec.spots_per_section
    n_spots = int(rng.integers(lo, hi + 1))
    xy, rows, cols = _tissue_spots(rng, n_spots, spec.spot_spacing)

    # Per-section jitter of the site's domain abundances (biological variability).
    weights = batch.domain_weight * rng.gamma(25.0, 1.0 / 25.0, size=spec.n_domains)
    labels, depth = _domain_layout(rng, xy, weights, programs.n_layered)
    xy_unit = (xy - xy.mean(axis=0)) / (np.sqrt(n_spots) * spec.spot_spacing)
    counts = _sample_counts(rng, labels, depth, xy_unit, spec, programs, batch)

    site_label = site_name(site)
    section = f"{site_label}_s{index + 1}"
    width = max(4, len(str(spec.n_features - 1)))
    obs = pd.DataFrame(
        {
            "domain": pd.Categorical.from_codes(labels, categories=spec.domain_names),
            "section": section,
            "site": site_label,
            "array_row": rows.astype(np.int64),
            "array_col": cols.astype(np.int64),
        },
        index=[f"{section}_{i:05d}" for i in range(n_spots)],
    )
    var = pd.DataFrame(index=[f"F{g:0{width}d}" for g in range(spec.n_features)])
    adata = anndata.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = xy.astype(np.float64)
    adata.uns["synthetic"] = spec.to_dict()
    return adata


def make_synthetic_federation(
    spec: SyntheticSpec | None = None,
) -> dict[str, list[anndata.AnnData]]:
    """Generate the synthetic federation in memory.

    Parameters
    ----------
    spec
        Generation parameters; defaults to ``SyntheticSpec()``.

    Returns
    -------
    dict
        Site name (``"hospital_a"``, ...) -> list of that site's sections, in order.
    """
    spec = spec or SyntheticSpec()
    programs = _make_programs(spec)
    federation: dict[str, list[anndata.AnnData]] = {}
    for site, n_sections in enumerate(spec.sections_per_site):
        batch = _make_site_batch(spec, site)
        federation[site_name(site)] = [
            _make_section(spec, programs, batch, site, j) for j in range(n_sections)
        ]
    n_spots = sum(a.n_obs for sections in federation.values() for a in sections)
    log.info("generated synthetic federation: %d sites, %d spots", spec.n_sites, n_spots)
    return federation


def _atomic_write_h5ad(adata: anndata.AnnData, path: Path) -> None:
    """Write to a hidden temp file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".h5ad.tmp", dir=path.parent)
    os.close(fd)
    try:
        # Keep obs strings as strings (anndata would otherwise convert them, noisily).
        adata.write_h5ad(tmp, convert_strings_to_categoricals=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prepare_root(root: Path, site_names: list[str], overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; choose another output folder.")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{root} already exists and is not empty; refusing to overwrite it. "
                "Pass overwrite=True (CLI: --overwrite) or choose an empty folder."
            )
        # Remove only what a previous run wrote, so stale sections are not picked up later.
        for name in site_names:
            site_dir = root / name
            if site_dir.is_dir():
                shutil.rmtree(site_dir)
        log.info("overwriting synthetic federation in %s", root)
    root.mkdir(parents=True, exist_ok=True)


def write_synthetic_federation(
    root: str | Path, spec: SyntheticSpec | None = None, *, overwrite: bool = False
) -> Path:
    """Generate the federation and write it as ``root/<site>/<section>.h5ad``.

    Parameters
    ----------
    root
        Output folder; created if missing.
    spec
        Generation parameters; defaults to ``SyntheticSpec()``.
    overwrite
        Allow writing into a non-empty ``root`` (previous site folders are replaced).

    Returns
    -------
    Path
        Path of ``root/federation.json``, the manifest listing each site's data path.

    Raises
    ------
    FileExistsError
        If ``root`` holds files and ``overwrite`` is False.
    """
    spec = spec or SyntheticSpec()
    root = Path(root).expanduser().resolve()
    _prepare_root(root, spec.site_names, overwrite)

    sites = []
    for name, sections in make_synthetic_federation(spec).items():
        site_dir = root / name
        site_dir.mkdir(parents=True, exist_ok=True)
        for adata in sections:
            _atomic_write_h5ad(adata, site_dir / f"{adata.obs['section'].iloc[0]}.h5ad")
        sites.append({"name": name, "data-path": str(site_dir)})

    manifest = root / MANIFEST_NAME
    _atomic_write_text(
        json.dumps({"spec": spec.to_dict(), "sites": sites}, indent=2) + "\n", manifest
    )
    log.info("wrote synthetic federation (%d sites) to %s", len(sites), root)
    return manifest
