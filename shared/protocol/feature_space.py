"""The federation's feature space as message config entries (names, floats, float lists)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedspatial.shared.features.selection import FeatureSpace
from fedspatial.shared.protocol.payload import ConfigValue

PREFIX = "fs-"


def feature_space_to_config(space: FeatureSpace) -> dict[str, ConfigValue]:
    """``space`` as config entries, all under the ``fs-`` prefix."""
    items: dict[str, ConfigValue] = {f"{PREFIX}{k}": v for k, v in space.to_config().items()}
    for k, v in space.to_arrays().items():
        items[f"{PREFIX}arr-{k}"] = [float(x) for x in np.asarray(v).ravel()]
    return items


def feature_space_from_config(config: Mapping[str, object]) -> FeatureSpace:
    """Inverse of :func:`feature_space_to_config` (other entries are ignored)."""
    cfg = {k[len(PREFIX):]: v for k, v in config.items() if k.startswith(PREFIX)}
    arrays = {k[4:]: np.asarray(v, dtype=np.float32) for k, v in cfg.items() if k.startswith("arr-")}
    rest = {k: v for k, v in cfg.items() if not k.startswith("arr-")}
    return FeatureSpace.from_parts(arrays, rest)
