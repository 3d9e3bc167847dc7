"""What one message carries, Flower-free: named arrays, config entries and metrics.

Phases build and read :class:`Payload` objects; ``fedspatial.records`` is the one
conversion to and from Flower's records. Arrays are per-site or per-cluster
aggregates and model weights, never per-cell data (a test inspects every message).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

ConfigValue = int | float | str | bool | bytes | list[int] | list[float] | list[str] | list[bool] | list[bytes]
"""What a config entry may hold (Flower's ConfigRecord values)."""


class PayloadError(ValueError):
    """A message lacks an entry its receiver needs, or holds one of the wrong type."""


@dataclass
class Payload:
    """One message's content.

    Parameters
    ----------
    arrays : dict[str, np.ndarray]
        Named arrays (model weights, aggregates).
    config : dict[str, ConfigValue]
        Settings and small structured values (names, JSON strings).
    metrics : dict[str, int | float]
        Numbers only (cell counts, losses, timings).
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, ConfigValue] = field(default_factory=dict)
    metrics: dict[str, int | float] = field(default_factory=dict)

    def number(self, key: str, default: float | None = None) -> float:
        """A numeric config entry, with a clear error when it is missing or not a number."""
        return config_number(self.config, key, default)

    def string(self, key: str, default: str | None = None) -> str:
        value = self.config.get(key, default)
        if not isinstance(value, str):
            raise PayloadError(f"message config entry {key!r} must be a string, got {value!r}")
        return value

    def strings(self, key: str) -> list[str]:
        """A list-of-strings config entry (an absent key is an empty list: Flower cannot
        carry empty lists)."""
        value = self.config.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PayloadError(f"message config entry {key!r} must be a list of strings, got {value!r}")
        return [str(v) for v in value]

    def flag(self, key: str, default: bool = False) -> bool:
        return bool(self.config.get(key, default))

    def array(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise PayloadError(f"message has no array {key!r} (it has {sorted(self.arrays)})")
        return self.arrays[key]


def config_number(config: Mapping[str, object], key: str, default: float | None = None) -> float:
    """A numeric config entry, with a clear error when it is missing or not a number."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"message config entry {key!r} must be a number, got {value!r}")
    return float(value)


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
