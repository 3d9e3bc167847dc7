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

The section geometry is in :mod:`~fedspatial.shared.data.synthetic_tissue`, the
expression programs, batch effects and counts in
:mod:`~fedspatial.shared.data.synthetic_expression`; this module holds the spec and
assembles and writes the federation.
"""

from __future__ import annotations

import logging
import shutil
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd

from fedspatial.shared.data.synthetic_expression import (
    STREAM_SECTION,
    Programs,
    SiteBatch,
    make_programs,
    make_site_batch,
    sample_counts,
)
from fedspatial.shared.data.synthetic_tissue import domain_layout, tissue_spots
from fedspatial.shared.storage.atomic import write_atomic, write_json_atomic

__all__ = [
    "MANIFEST_NAME",
    "SyntheticSpec",
    "make_synthetic_federation",
    "site_name",
    "write_synthetic_federation",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "federation.json"


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


def site_name(index: int) -> str:
    """Name of site ``index``: hospital_a..hospital_z, then hospital_aa, hospital_ab, ..."""
    letters = string.ascii_lowercase
    suffix = ""
    index += 1
    while index > 0:
        index, rem = divmod(index - 1, 26)
        suffix = letters[rem] + suffix
    return f"hospital_{suffix}"


# ----------------------------------------------------------------------------- assembly


def _make_section(
    spec: SyntheticSpec, programs: Programs, batch: SiteBatch, site: int, index: int
) -> anndata.AnnData:
    rng = np.random.default_rng([spec.seed, STREAM_SECTION, site, index])
    lo, hi = spec.spots_per_section
    n_spots = int(rng.integers(lo, hi + 1))
    xy, rows, cols = tissue_spots(rng, n_spots, spec.spot_spacing)

    # Per-section jitter of the site's domain abundances (biological variability).
    weights = batch.domain_weight * rng.gamma(25.0, 1.0 / 25.0, size=spec.n_domains)
    labels, depth = domain_layout(rng, xy, weights, programs.n_layered)
    xy_unit = (xy - xy.mean(axis=0)) / (np.sqrt(n_spots) * spec.spot_spacing)
    counts = sample_counts(rng, labels, depth, xy_unit, spec, programs, batch)

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
    programs = make_programs(spec)
    federation: dict[str, list[anndata.AnnData]] = {}
    for site, n_sections in enumerate(spec.sections_per_site):
        batch = make_site_batch(spec, site)
        federation[site_name(site)] = [
            _make_section(spec, programs, batch, site, j) for j in range(n_sections)
        ]
    n_spots = sum(a.n_obs for sections in federation.values() for a in sections)
    log.info("generated synthetic federation: %d sites, %d spots", spec.n_sites, n_spots)
    return federation


def _write_section(adata: anndata.AnnData, path: Path) -> None:
    """Write ``adata`` to ``path`` atomically (a reader never sees half a file)."""
    # Keep obs strings as strings (anndata would otherwise convert them, noisily).
    write_atomic(path, lambda tmp: adata.write_h5ad(tmp, convert_strings_to_categoricals=False))


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
            _write_section(adata, site_dir / f"{adata.obs['section'].iloc[0]}.h5ad")
        sites.append({"name": name, "data-path": str(site_dir)})

    manifest = root / MANIFEST_NAME
    write_json_atomic(manifest, {"spec": spec.to_dict(), "sites": sites})
    log.info("wrote synthetic federation (%d sites) to %s", len(sites), root)
    return manifest
