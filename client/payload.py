"""Conversions between numpy/dataclasses and Flower records (used by client and server)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedspatial.shared.features import FeatureSpace

FEATURE_SPACE_PREFIX = "fs-"


def arrays_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def feature_space_to_config(space: FeatureSpace) -> dict[str, object]:
    """Feature space as ConfigRecord entries (names, floats and float lists only)."""
    items: dict[str, object] = {f"{FEATURE_SPACE_PREFIX}{k}": v for k, v in space.to_config().items()}
    for k, v in space.to_arrays().items():
        items[f"{FEATURE_SPACE_PREFIX}arr-{k}"] = [float(x) for x in np.asarray(v).ravel()]
    return items


def feature_space_from_config(config: ConfigRecord | Mapping[str, object]) -> FeatureSpace:
    cfg = {k[len(FEATURE_SPACE_PREFIX):]: v for k, v in config.items() if k.startswith(FEATURE_SPACE_PREFIX)}
    arrays = {k[4:]: np.asarray(v, dtype=np.float32) for k, v in cfg.items() if k.startswith("arr-")}
    rest = {k: v for k, v in cfg.items() if not k.startswith("arr-")}
    return FeatureSpace.from_parts(arrays, rest)


def bytes_of(record: ArrayRecord) -> int:
    """Payload size of the arrays in a record."""
    return int(sum(len(a.data) for a in record.values()))
