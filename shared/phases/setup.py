"""What the federation fixes for a run at each site, kept in the site's state.

``query.setup`` stores the feature space (and a batch-aware decoder's batch names and
the sections mapped from a small panel); the PCA and panel phases add the PCA basis
and each panel's map. :func:`setup_of` reads it all back as one :class:`SiteSetup`,
from which a site builds (and caches) its model inputs.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

from fedspatial.shared.algorithms.panels import PanelMap
from fedspatial.shared.algorithms.pca import PCABasis
from fedspatial.shared.features.selection import FeatureSpace
from fedspatial.shared.phases.base import SiteState
from fedspatial.shared.protocol.feature_space import (
    feature_space_from_config,
    feature_space_to_config,
)
from fedspatial.shared.protocol.payload import Payload

SPACE_KEY = "fedspatial-feature-space"
PCA_KEY = "fedspatial-pca"
PANEL_KEY = "fedspatial-panel-"


@dataclass(frozen=True)
class SiteSetup:
    """The feature space and, for a batch-aware decoder, the federation-wide batch names
    (sections or sites), fixed for the whole run."""

    space: FeatureSpace
    batches: tuple[str, ...] = ()
    pca: PCABasis | None = None
    """Federated PCA basis the model inputs are projected on (``features.n-pcs``)."""
    mapped: tuple[tuple[str, str], ...] = ()
    """``(section key, panel id)`` of the federation's sections mapped from a small panel
    (:mod:`fedspatial.shared.algorithms.panels`)."""
    maps: tuple[tuple[str, FeatureSpace, PanelMap], ...] = ()
    """``(panel id, panel feature space, map to the model inputs)`` received so far."""

    @property
    def key(self) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
        """Cache key of the standardized features and graph."""
        return self.space.fingerprint(), self.batches, self.mapped

    @property
    def model_key(self) -> tuple[Any, ...]:
        """Cache key of the model inputs (after PCA and panel maps)."""
        pca = "" if self.pca is None else f"{zlib.crc32(self.pca.components.tobytes()):08x}"
        maps = tuple((pid, f"{zlib.crc32(m.coef.tobytes()):08x}") for pid, _, m in self.maps)
        return self.space.fingerprint(), self.batches, self.mapped, pca, maps

    @property
    def panel_of(self) -> dict[str, str]:
        return dict(self.mapped)


def store_setup(state: SiteState, request: Payload) -> None:
    """Keep what ``query.setup`` sent for the rest of the run."""
    space = feature_space_from_config(request.config)
    config = dict(feature_space_to_config(space))
    config["batches"] = request.strings("batches")
    config["mapped-sections"] = request.string("mapped-sections", "{}")
    state.put(SPACE_KEY, Payload(config=config))


def store_pca(state: SiteState, basis: PCABasis) -> None:
    state.put(PCA_KEY, Payload(arrays=basis.to_arrays()))


def store_panel_map(state: SiteState, panel_id: str, space: FeatureSpace, panel_map: PanelMap) -> None:
    """Keep a small panel's standardization and its map to the model inputs for the run."""
    state.put(f"{PANEL_KEY}{panel_id}", Payload(arrays=panel_map.to_arrays(), config=feature_space_to_config(space)))


def setup_of(state: SiteState) -> SiteSetup:
    """Everything stored so far (raises when ``query.setup`` has not come yet)."""
    stored = state.get(SPACE_KEY)
    if stored is None:
        raise RuntimeError("this site has no feature space yet: the server must send query.setup first")
    pca = state.get(PCA_KEY)
    mapped: dict[str, str] = json.loads(stored.string("mapped-sections", "{}"))
    maps = []
    for pid in sorted(set(mapped.values())):
        panel = state.get(f"{PANEL_KEY}{pid}")
        if panel is not None:
            maps.append((pid, feature_space_from_config(panel.config), PanelMap.from_arrays(panel.arrays)))
    return SiteSetup(
        feature_space_from_config(stored.config),
        tuple(stored.strings("batches")),
        None if pca is None else PCABasis.from_arrays(pca.arrays),
        mapped=tuple(sorted(mapped.items())),
        maps=tuple(maps),
    )
