"""A site's side of federated Harmony: answers each request with sums over its cells."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedspatial.shared.algorithms import harmony_protocol as protocol
from fedspatial.shared.algorithms.harmony_kernels import (
    apply_correction,
    batch_sums,
    objective_terms,
    reassign_cells,
    ridge_sums,
    soft_assign,
)


def _scalar(value: float) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


class HarmonySite:
    """A site's side of federated Harmony: holds its cells, answers requests.

    Parameters
    ----------
    Z : np.ndarray
        The site's embeddings (n x d); never sent.
    batches : np.ndarray
        Global batch code of each cell (n,), integers in ``0..B-1``.

    Attributes
    ----------
    corrected : np.ndarray
        Current corrected embeddings (n x d); the result once the server is done.
    """

    def __init__(self, Z: np.ndarray, batches: np.ndarray) -> None:
        Z = np.asarray(Z, dtype=np.float64)
        batches = np.asarray(batches).reshape(-1)
        if Z.ndim != 2 or Z.shape[0] != batches.size:
            raise ValueError(f"Z {Z.shape} and batches ({batches.size},) do not match")
        if not np.isfinite(Z).all():
            raise ValueError("Z must be finite")
        if not np.issubdtype(batches.dtype, np.integer) or (batches.size and batches.min() < 0):
            raise ValueError("batches must be non-negative integer codes")
        self.Z_orig = Z
        self.batches = batches.astype(np.int64)
        self.corrected = Z.copy()
        self._n_batches = 0
        self._sigma = np.zeros(0)
        self._R = np.zeros((Z.shape[0], 0))
        self._dist = self._R
        self._pass_cells = np.zeros(0, dtype=np.int64)
        self._pass_starts = np.zeros(1, dtype=np.int64)

    @property
    def n_cells(self) -> int:
        return self.Z_orig.shape[0]

    def handle(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Answer one server request (``request["kind"]`` names it).

        Parameters
        ----------
        request : Mapping[str, Any]
            ``HarmonyRequest.for_site(...)`` of the server.

        Returns
        -------
        dict[str, np.ndarray]
            Cluster-level aggregates over this site's cells.
        """
        handlers = {
            protocol.COUNTS: self._counts,
            protocol.ASSIGN: self._assign,
            protocol.PASS: self._plan_pass,
            protocol.BLOCK: self._update_block,
            protocol.RIDGE: self._ridge,
            protocol.CORRECT: self._correct,
        }
        kind = str(request["kind"])
        if kind not in handlers:
            raise ValueError(f"unknown Harmony request {kind!r}")
        return handlers[kind](request)

    def _counts(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self._n_batches = int(request["n_batches"])
        if self.batches.size and self.batches.max() >= self._n_batches:
            raise ValueError(
                f"batch code {self.batches.max()} is out of range for {self._n_batches} batches"
            )
        counts = np.bincount(self.batches, minlength=self._n_batches).astype(np.float64)
        return {"batch_counts": counts}

    def _assign(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        centroids = np.asarray(request["centroids"], dtype=np.float64)
        if centroids.shape[1] != self.Z_orig.shape[1]:
            raise ValueError(
                f"centroids have {centroids.shape[1]} dimensions, embeddings {self.Z_orig.shape[1]}"
            )
        self._sigma = np.asarray(request["sigma"], dtype=np.float64)
        self._R, self._dist = soft_assign(self.corrected, centroids, self._sigma)
        return self._assignment_reply(self._R, self._dist, self.batches)

    def _assignment_reply(
        self, R: np.ndarray, dist: np.ndarray, batches: np.ndarray
    ) -> dict[str, np.ndarray]:
        """``O`` of these cells and their share of the objective (assign and block replies)."""
        error, entropy = objective_terms(R, dist, self._sigma)
        return {
            "O": batch_sums(R, batches, self._n_batches),
            "error": _scalar(error),
            "entropy": _scalar(entropy),
        }

    def _plan_pass(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        cells = np.asarray(request["cells"], dtype=np.int64)
        starts = np.asarray(request["block_starts"], dtype=np.int64)
        if cells.size != self.n_cells or starts[-1] != cells.size:
            raise ValueError("the pass must list each of this site's cells once")
        if not np.array_equal(np.sort(cells), np.arange(self.n_cells)):
            raise ValueError("the pass must list each of this site's cells once")
        self._pass_cells, self._pass_starts = cells, starts
        # Each block is taken out of O and E with its assignments as they are now:
        # a block's cells are not touched before their own block comes.
        K = self._R.shape[1]
        before = np.zeros((starts.size - 1, K, self._n_batches))
        for i in range(starts.size - 1):
            block = cells[starts[i] : starts[i + 1]]
            before[i] = batch_sums(self._R[block], self.batches[block], self._n_batches)
        return {"block_O": before}

    def _update_block(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        i = int(request["block"])
        block = self._pass_cells[self._pass_starts[i] : self._pass_starts[i + 1]]
        log_diversity = np.asarray(request["log_diversity"], dtype=np.float64)
        R_block = reassign_cells(self._dist[block], self.batches[block], log_diversity, self._sigma)
        self._R[block] = R_block
        return self._assignment_reply(R_block, self._dist[block], self.batches[block])

    def _ridge(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        weighted, mass = ridge_sums(self.Z_orig, self._R, self.batches, self._n_batches)
        return {"RZ": weighted, "R_sum": mass}

    def _correct(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        directions = np.asarray(request["directions"], dtype=np.float64)
        self.corrected = apply_correction(self.Z_orig, self._R, self.batches, directions)
        if bool(request["reassign"]):
            return self._assign(request)
        return {}
