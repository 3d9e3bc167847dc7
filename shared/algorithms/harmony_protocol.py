"""The messages of federated Harmony: request kinds and :class:`HarmonyRequest`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

COUNTS = "counts"
ASSIGN = "assign"
PASS = "pass"
BLOCK = "block"
RIDGE = "ridge"
CORRECT = "correct"


@dataclass(frozen=True)
class HarmonyRequest:
    """One request to every site.

    Attributes
    ----------
    kind : str
        Request name (``counts``, ``assign``, ``pass``, ``block``, ``ridge``, ``correct``).
    payload : dict[str, np.ndarray]
        Arrays sent to every site.
    site_payloads : tuple[dict[str, np.ndarray], ...] or None, default None
        Arrays for each site (in site order), when the request differs per site.
    """

    kind: str
    payload: dict[str, np.ndarray] = field(default_factory=dict)
    site_payloads: tuple[dict[str, np.ndarray], ...] | None = None

    def for_site(self, site: int) -> dict[str, Any]:
        """The message for site ``site`` (0-based, in the order of the replies)."""
        message: dict[str, Any] = {"kind": self.kind, **self.payload}
        if self.site_payloads is not None:
            message.update(self.site_payloads[site])
        return message
