"""Conversions between numpy/dataclasses and Flower records (used by client and server)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedspatial.shared.features.selection import FeatureSpace

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


def config_number(config: ConfigRecord | Mapping[str, object], key: str, default: float | None = None) -> float:
    """A numeric config entry, with a clear error when it is missing or not a number."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"message config entry {key!r} must be a number, got {value!r}")
    return float(value)


def config_strings(config: ConfigRecord | Mapping[str, object], key: str) -> list[str]:
    value = config.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"message config entry {key!r} must be a list of strings")
    return [str(v) for v in value]


def chain_arrays(chains: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays of several clustering starts run side by side in one message:
    ``{i: {"centroids": a}}`` -> ``{"centroids@i": a}``."""
    return {f"{name}@{i}": value for i, arrays in chains.items() for name, value in arrays.items()}


def split_chains(arrays: Mapping[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """Inverse of :func:`chain_arrays`; keys without ``@`` belong to start 0."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, _, index = key.partition("@")
        out.setdefault(int(index or 0), {})[name] = value
    return dict(sorted(out.items()))
