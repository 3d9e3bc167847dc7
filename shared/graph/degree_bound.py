"""How many training samples one cell can change: the bound node-level DP needs.

Under ``privacy.local-dp`` with a graph encoder, a DP-SGD sample is a cell's ego
neighbourhood (the cell and its neighbour list). The accountant
(:mod:`fedspatial.shared.privacy.accounting`, "Assumption 1") needs ``D``: the most
samples of *other* cells that adding or removing one cell can change. This module gives
that ``D`` (:func:`dp_degree_bound`) and the check on a section's coordinates that the
proof needs (:func:`check_dp_coordinates`). The graph it applies to is the site's plain
per-section graph (:func:`~fedspatial.shared.graph.section_graph.section_neighbors` on the
first two coordinate columns, as
:func:`~fedspatial.shared.data.sections.prepare_graph_data` builds it), with no pruning.

Proof sketch (``k`` = ``n_neighbors``; for ``graph="radius"`` the site caps each list at
``k``, the nearest ones within the radius).

1. *Locality.* Each cell ``x`` ranks the other cells of its section by (computed distance
   to ``x``, index); its list is the first ``k`` of them (kNN), or the first ``k`` of those
   within the radius. A computed distance depends on the two cells' coordinates only, and
   removing a row keeps the order of the others' indices, so removing cell ``r`` restricts
   every ranking to the remaining cells: ``x``'s list changes if and only if it held ``r``
   (``r`` leaves, the next cell moves up). Other sections never change (graphs are built
   per section). Removing ``r`` therefore changes ``r``'s own sample and exactly
   ``in(r)`` others, ``in(r)`` = the number of lists holding ``r`` (adding ``r`` is the
   same event read backwards).
2. *Cones.* Split the plane around ``r`` into six half-open 60-degree cones. Let the cells
   of one cone that list ``r`` be ``y_1..y_m`` and ``y*`` the farthest from ``r`` (distance
   ``b``). Any other ``y_j`` (distance ``a``, ``0 < a <= b``) is seen from ``r`` at an angle
   ``theta < 60`` degrees from ``y*``, so ``|y_j - y*|^2 = a^2 + b^2 - 2ab cos(theta)
   < b^2 - a(b - a) <= b^2``: every ``y_j`` is strictly closer to ``y*`` than ``r`` is,
   ranks before ``r`` whatever the tie-break (and lies within the radius when ``r``
   does). ``r`` is among ``y*``'s first ``k``, so ``m - 1 <= k - 1``. Six cones:
   ``in(r) <= 6k``. Tight for ``k = 1`` (a regular hexagon around ``r``, ``r`` with the
   lowest index). On a line two half-lines replace the cones: ``2k``.
3. *Coincident cells void it* (``a = 0``): ``g`` cells on one spot can all list the one of
   lowest index, so ``in(r)`` reaches ``g - 1``. They are refused
   (:func:`check_dp_coordinates`); the guarantee is stated over sections whose cells have
   distinct positions.
4. *Floating point.* Rankings use computed distances, within a relative ``4u``
   (``u = 2**-53``) of the exact ones. Rotate the cones so that no two of ``6k + 1``
   hypothetical listing cells share a cone while more than ``60 - gamma`` degrees apart
   (each of the ``P = 3k(6k + 1)`` pairs forbids a window narrower than ``gamma``; take
   ``gamma = (pi/3)/(P + 1)``). Then ``|y_j - y*|^2 <= b^2 (1 - gamma a/b)`` (as
   ``2 cos(60 - gamma) - 1 >= gamma``), and with ``a/b >= delta/L`` (``delta`` the
   smallest distance between two cells, ``L`` the section's bounding-box diagonal) the
   strict order survives rounding once ``gamma delta/L > 16u``. ``delta/L >=``
   :data:`MIN_SEPARATION` and ``k <=`` :data:`MAX_DP_NEIGHBORS` give
   ``gamma delta/L >= 1.4e-14``, eight times that.
5. *3-D* needs another constant (cones of half-angle 30 degrees covering the sphere); none
   is implemented, and the site's graph is planar anyway: refused.

:func:`bound_in_degree` is *not* such a bound and must not be used for DP: which edges it
keeps depends on the whole graph, so removing one cell can change samples that never
held it (``tests/test_degree_bound_adversarial.py`` shows it).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.spatial import cKDTree

from fedspatial.shared.graph.parameter_checks import check_coords, check_positive_int

__all__ = [
    "MAX_DP_NEIGHBORS",
    "MIN_SEPARATION",
    "bound_in_degree",
    "check_dp_coordinates",
    "dp_degree_bound",
    "in_degree",
]

logger = logging.getLogger(__name__)

MAX_DP_NEIGHBORS = 200
"""Largest ``n_neighbors`` for which the floating-point step of the proof is checked."""
MIN_SEPARATION = 1e-8
"""Smallest distance between two cells of a section, relative to the section's bounding-box
diagonal, that :func:`check_dp_coordinates` accepts (proof step 4)."""
_CONES = {1: 2, 2: 6}
"""Cones of opening < 60 degrees around a point that cover the space, by dimension."""
_ROUNDING_MARGIN = 16 * 2.0**-53
"""Relative squared-distance gap that float64 distance rankings always resolve (step 4)."""


def dp_degree_bound(n_neighbors: int, graph: str, dim: int = 2) -> int:
    """``D``: the most other cells' samples that adding or removing one cell changes.

    Valid for the site's plain per-section graph (no in-degree pruning) over sections
    that pass :func:`check_dp_coordinates`; the proof is in the module docstring.

    Parameters
    ----------
    n_neighbors
        ``k``: the list length (kNN), or the cap on the list (``graph="radius"``: the site
        keeps the ``k`` nearest cells within the radius). ``1 <= k <=``
        :data:`MAX_DP_NEIGHBORS`.
    graph
        ``"knn"`` or ``"radius"`` (capped at ``n_neighbors``; an uncapped radius graph has
        no bound: every cell within the radius of ``r`` lists it).
    dim
        Number of coordinate columns the graph is built on: 2 (the site: the first two
        columns) or 1. Default 2.

    Returns
    -------
    int
        ``6 k`` in the plane, ``2 k`` on a line.

    Raises
    ------
    ValueError
        For another graph, a dimension other than 1 or 2, or ``k`` out of range.
    """
    k = check_positive_int(n_neighbors, "n_neighbors")
    if graph not in ("knn", "radius"):
        msg = f"neighbors.graph {graph!r}: no degree bound is known; use 'knn' (or 'radius') under privacy.local-dp."
        raise ValueError(msg)
    if k > MAX_DP_NEIGHBORS:
        msg = (
            f"n_neighbors={k}: the degree bound is proven (floating point included) for at most "
            f"{MAX_DP_NEIGHBORS} neighbours under privacy.local-dp; lower neighbors.n-neighbors."
        )
        raise ValueError(msg)
    if dim not in _CONES:
        msg = (
            f"dim={dim!r}: the degree bound under privacy.local-dp is proven for planar (or 1-D) "
            "coordinates only; build the graph on two coordinate columns (the site uses the first two)."
        )
        raise ValueError(msg)
    return _CONES[dim] * k


def check_dp_coordinates(coords: np.ndarray, section_name: str) -> np.ndarray:
    """Refuse a section whose coordinates void :func:`dp_degree_bound`.

    Parameters
    ----------
    coords
        ``(N, d)`` coordinates the section's graph is built on (``d`` = 1 or 2; the site
        passes ``obsm[spatial_key][:, :2]``).
    section_name
        Named in the error messages.

    Returns
    -------
    numpy.ndarray
        ``float64 (N, d)``: the checked coordinates.

    Raises
    ------
    ValueError
        When ``d`` is not 1 or 2, when two cells share their coordinates (``g`` cells on
        one spot can all list the same one, so one cell could change ``g - 1`` samples),
        or when two cells lie closer than :data:`MIN_SEPARATION` times the section's
        bounding-box diagonal (float64 rankings could then break the proof's strict
        inequality). Each message names the section and the number of cells or pairs.
    """
    xy = check_coords(coords)
    n, dim = xy.shape
    if dim not in _CONES:
        msg = (
            f"section {section_name!r}: privacy.local-dp needs planar coordinates, shape (n_cells, 2); got "
            f"{dim} columns. The bound on how many samples one cell changes is proven in the plane: pass "
            "the two columns the graph is built on (coords[:, :2]), or train with model.encoder: cell."
        )
        raise ValueError(msg)
    if n < 2:
        return xy
    _, inverse, counts = np.unique(xy, axis=0, return_inverse=True, return_counts=True)
    shared = counts[np.ravel(inverse)] > 1
    if shared.any():
        msg = (
            f"section {section_name!r}: {int(shared.sum())} of its {n} cells share their coordinates with "
            f"another cell ({int((counts > 1).sum())} locations hold more than one cell). Under "
            "privacy.local-dp coincident cells void the bound on how many training samples one cell "
            "changes (cells on one spot can all list the same neighbour). Remove or merge the duplicated "
            "cells (e.g. segmentation artefacts, stacked z-planes), or train with model.encoder: cell."
        )
        raise ValueError(msg)
    extent = float(np.linalg.norm(xy.max(axis=0) - xy.min(axis=0)))
    tol = MIN_SEPARATION * extent
    close = cKDTree(xy).query_pairs(tol, output_type="ndarray")
    if len(close):
        nearest = float(np.min(np.linalg.norm(xy[close[:, 0]] - xy[close[:, 1]], axis=1)))
        msg = (
            f"section {section_name!r}: {len(close)} pair(s) of cells lie closer than {MIN_SEPARATION:g} x the "
            f"section's extent ({extent:g}; closest pair {nearest:g} apart). Under privacy.local-dp the bound "
            "on how many training samples one cell changes needs cells that float64 distances keep apart: "
            "remove or merge the near-duplicate cells, or train with model.encoder: cell."
        )
        raise ValueError(msg)
    return xy


def _gap_needed(n_neighbors: int) -> float:
    """Smallest ``delta/L`` for which step 4 of the proof holds at ``k = n_neighbors``
    (the tests check that :data:`MIN_SEPARATION` covers :data:`MAX_DP_NEIGHBORS`)."""
    pairs = 3 * n_neighbors * (6 * n_neighbors + 1)
    gamma = (math.pi / 3) / (pairs + 1)
    return _ROUNDING_MARGIN / gamma



def in_degree(neighbors: np.ndarray) -> np.ndarray:
    """How many neighbour lists each point appears in (``-1`` padding ignored).

    ``neighbors`` is ``int (N, m)``; returns ``int64 (N,)``. For the plain graph,
    ``in_degree(nb)[r]`` is the number of other samples removing ``r`` changes.
    """
    nb = np.asarray(neighbors, dtype=np.int64)
    return np.bincount(nb[nb >= 0], minlength=nb.shape[0])


def bound_in_degree(neighbors: np.ndarray, max_in_degree: int) -> np.ndarray:
    """Drop edges so that every point appears in at most ``max_in_degree`` neighbour lists.

    **Not for differential privacy.** The pruned graph is a function of the whole kNN
    graph: removing one cell re-admits or drops edges of other cells, so it changes
    samples that never held it (11-14 samples at ``k = max_in_degree = 6``, against the
    6 a DP accountant would charge). Under ``privacy.local-dp`` the site trains on the
    plain graph and charges :func:`dp_degree_bound`. Kept for non-private uses that want
    a graph where no cell dominates many niches.

    Each point ``v`` stays in the lists where it ranks nearest (lowest column), ties
    broken by the lower row index, up to ``max_in_degree`` of them; it is removed from
    the others. Kept neighbours move forward so that each row stays nearest first,
    padded with ``-1`` at the end. The rule is local to ``v``'s incoming edges, so the
    result does not depend on the order of the points.

    Parameters
    ----------
    neighbors
        ``int64 (N, m)`` neighbour lists padded with ``-1`` (:func:`section_neighbors`).
    max_in_degree
        Largest number of lists a point may appear in (``>= 1``).

    Returns
    -------
    numpy.ndarray
        ``int64 (N, m)``: a subset of each row, same order, padded with ``-1``.
    """
    cap = check_positive_int(max_in_degree, "max_in_degree")
    nb = np.asarray(neighbors, dtype=np.int64)
    if nb.ndim != 2:
        msg = f"neighbors must be a 2-D array (n_nodes, max_degree); got shape {nb.shape}."
        raise ValueError(msg)
    rows, cols = np.nonzero(nb >= 0)
    targets = nb[rows, cols]
    # incoming edges of each target, nearest rank first, then lower row index
    order = np.lexsort((rows, cols, targets))
    rows, cols, targets = rows[order], cols[order], targets[order]
    first = np.searchsorted(targets, targets, side="left")
    rank = np.arange(targets.size) - first
    drop = rank >= cap
    out = nb.copy()
    out[rows[drop], cols[drop]] = -1
    # compact each row: kept entries first, in their original (nearest-first) order
    keep = out >= 0
    position = np.argsort(~keep, axis=1, kind="stable")
    out = np.take_along_axis(out, position, axis=1)
    if drop.any():
        logger.debug("bound_in_degree: removed %d of %d edges (cap %d)", int(drop.sum()), targets.size, cap)
    return out
