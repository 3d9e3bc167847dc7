"""Reading the arrays a site or the server sent back into float64 numpy values.

A message's arrays arrive as numpy arrays (or array-likes) keyed by name; these helpers
turn the named entries back into the float64 arrays and scalars the algorithms hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["float64_arrays", "scalar"]


def float64_arrays(arrays: Mapping[str, Any], keys: Sequence[str]) -> list[np.ndarray]:
    """``arrays[key]`` as float64 numpy arrays, in the order of ``keys``."""
    return [np.asarray(arrays[key], dtype=np.float64) for key in keys]


def scalar(arrays: Mapping[str, Any], key: str) -> float:
    """The single value stored under ``key`` (any shape holding one element first)."""
    return float(np.asarray(arrays[key]).reshape(-1)[0])
