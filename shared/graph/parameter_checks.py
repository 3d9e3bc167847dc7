"""Checks of the graph builders' arguments, with messages that name the argument."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_coords", "check_positive_int", "check_radius"]


def check_coords(coords: Any) -> np.ndarray:
    """Return ``coords`` as a finite float64 array of shape ``(N, d)``."""
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2:
        msg = f"coords must be a 2-D array of shape (n_points, n_dims); got shape {arr.shape}."
        raise ValueError(msg)
    if arr.shape[1] < 1:
        msg = "coords must have at least one spatial dimension."
        raise ValueError(msg)
    if not np.all(np.isfinite(arr)):
        n_bad = int((~np.isfinite(arr)).any(axis=1).sum())
        msg = f"coords contain non-finite values (NaN or inf) in {n_bad} point(s)."
        raise ValueError(msg)
    return arr


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int; ValueError (naming ``name``) unless it is an integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"{name} must be a positive integer; got {value!r}."
        raise ValueError(msg)
    return int(value)


def check_radius(radius: Any) -> float:
    """``radius`` as a float; ValueError unless it is a positive finite number."""
    if isinstance(radius, bool):
        msg = f"radius must be a positive finite number; got {radius!r}."
        raise ValueError(msg)
    try:
        r = float(radius)
    except (TypeError, ValueError):
        msg = f"radius must be a positive finite number; got {radius!r}."
        raise ValueError(msg) from None
    if not np.isfinite(r) or r <= 0:
        msg = f"radius must be a positive finite number; got {radius!r}."
        raise ValueError(msg)
    return r
