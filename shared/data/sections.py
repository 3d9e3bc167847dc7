"""A site's private data as the model sees it: sections loaded, harmonized and graphed.

Nothing here talks to Flower: the ClientApp, the local-only and the centralized modes
all go through :func:`load_site_sections` and :func:`prepare_graph_data`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from fedspatial.shared.data.io import load_site
from fedspatial.shared.features.selection import FeatureSpace, transform
from fedspatial.shared.graph.neighbors import section_neighbors
from fedspatial.shared.training.loop import GraphData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSource:
    """Where one site's data lives: a ``.h5ad`` file or a folder of them."""

    name: str
    data_path: str


@dataclass
class SiteSection:
    """One tissue section held at a site."""

    site: str
    name: str
    source: Path
    adata: ad.AnnData

    @property
    def key(self) -> str:
        """Federation-wide unique id ``<site>/<section>``."""
        return f"{self.site}/{self.name}"


def load_site_sections(
    sources: Sequence[SiteSource], *, spatial_key: str = "spatial"
) -> list[SiteSection]:
    """Load and validate every section of the given sites (raises ``DataValidationError``)."""
    sections: list[SiteSection] = []
    for source in sources:
        for section in load_site(source.data_path, spatial_key=spatial_key):
            sections.append(SiteSection(source.name, section.name, section.source, section.adata))
    return sections


def prepare_graph_data(
    sections: Sequence[SiteSection],
    space: FeatureSpace,
    *,
    spatial_key: str = "spatial",
    graph: str = "knn",
    n_neighbors: int = 6,
    radius: float = 0.0,
    scale: str = "section",
    batch_of: Mapping[str, int] | None = None,
    inputs: Callable[[SiteSection], np.ndarray] | None = None,
    centres: Mapping[str, np.ndarray] | None = None,
) -> GraphData:
    """Standardized features and per-section neighbourhoods, sections concatenated.

    ``scale="global"`` standardizes with the federation's pooled mean and std (from the
    feature space); ``"section"`` then re-centres and re-scales every section on its
    own, which removes per-feature multiplicative batch effects (a constant shift in
    log space) at the price of also removing composition differences between sections.
    ``batch_of`` maps a section key (``site/section``) to its federation-wide batch code
    for a batch-aware decoder (None: no batch codes). ``inputs``, when given, computes a
    section's rows instead (e.g. sections mapped from a small panel, see
    :mod:`fedspatial.shared.algorithms.panels`).

    ``centres`` (section key -> ``(len(space.selected),)``), with ``scale="section"``:
    centre each section by the given (released) mean instead of its own cells' and
    scale by the federation's std (local DP; see :func:`section_features`).
    """
    xs, nbrs, ranges, points = [], [], [], []
    offset = 0
    width = None
    for section in sections:
        centre = None if centres is None else centres[section.key]
        x = section_features(section, space, scale=scale, centre=centre) if inputs is None else inputs(section)
        coords = np.asarray(section.adata.obsm[spatial_key], dtype=np.float64)[:, :2]
        nbr = section_neighbors(
            coords,
            method=graph,  # type: ignore[arg-type]
            n_neighbors=n_neighbors,
            radius=radius if graph == "radius" else None,
            max_neighbors=n_neighbors if graph == "radius" else None,
        )
        width = nbr.shape[1] if width is None else max(width, nbr.shape[1])
        nbrs.append(np.where(nbr >= 0, nbr + offset, -1))
        xs.append(x)
        points.append(coords)
        ranges.append((section.key, offset, offset + len(x)))
        offset += len(x)
    padded = [np.pad(n, ((0, 0), (0, width - n.shape[1])), constant_values=-1) for n in nbrs]
    batch = None
    if batch_of is not None:
        missing = [key for key, _, _ in ranges if key not in batch_of]
        if missing:
            raise KeyError(f"no batch code for section(s) {missing}")
        batch = torch.cat([torch.full((stop - start,), batch_of[key], dtype=torch.int64) for key, start, stop in ranges])
    return GraphData(
        x=torch.from_numpy(np.concatenate(xs).astype(np.float32, copy=False)),
        neighbors=torch.from_numpy(np.concatenate(padded).astype(np.int64, copy=False)),
        sections=ranges,
        batch=batch,
        coords=torch.from_numpy(np.concatenate(points)) if points else None,
    )


def section_features(
    section: SiteSection, space: FeatureSpace, *, scale: str = "section", centre: np.ndarray | None = None
) -> np.ndarray:
    """A section's standardized features in ``space`` (``scale`` as in :func:`prepare_graph_data`).

    Without ``centre``, ``"section"`` re-centres and re-scales the section by its own
    cells' mean and std: removing one cell changes every row. With ``centre`` (a
    released section mean over ``space.selected``, local DP) the rows are
    ``clip((x - centre) / space.std)``, ``x`` the cell's (clipped, when the space says so)
    log-normalized values: each row depends on its own cell's counts and released
    statistics only. Returns ``float32 (n_obs, len(space.selected))``.
    """
    if centre is not None:
        if scale != "section":
            raise ValueError("a section centre applies to scale='section' only")
        return transform(section.adata, space, mean=centre)
    x = transform(section.adata, space)
    return _standardize(x, space.max_value) if scale == "section" else x


def _standardize(x: np.ndarray, max_value: float, *, block_rows: int = 65_536) -> np.ndarray:
    """Each column of ``x`` (float32, rewritten in place) centred, scaled by its sample
    std and clipped; statistics in float64, in blocks of rows so that no float64 copy of
    a large section is made."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    total, total_sq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, n, block_rows):
        block = x[start : start + block_rows].astype(np.float64)
        total += block.sum(axis=0)
    mean = total / max(n, 1)
    for start in range(0, n, block_rows):  # two passes: sum of squared deviations is stable
        block = x[start : start + block_rows].astype(np.float64) - mean
        total_sq += (block * block).sum(axis=0)
    std = np.sqrt(total_sq / (n - 1)) if n > 1 else np.ones(x.shape[1])
    std[std == 0] = 1.0
    for start in range(0, n, block_rows):
        block = (x[start : start + block_rows].astype(np.float64) - mean) / std
        x[start : start + block_rows] = np.clip(block, -max_value, max_value)
    return x
