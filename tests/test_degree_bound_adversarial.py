"""Removing one cell changes at most ``dp_degree_bound(k)`` other cells' DP-SGD samples.

Issue 13, hole 2: the accountant charges ``D`` = the most samples of *other* cells that
removing one cell changes. Each test removes cells one by one from a layout, rebuilds the
site's graph as :func:`~fedspatial.shared.data.sections.prepare_graph_data` builds it
(per section, first two coordinate columns, plain kNN or radius capped at ``k``), and
compares every remaining cell's sample (its id, then its neighbour list, both as ORIGINAL
cell ids, in order) with the sample before. It checks the proof's two steps: the changed
samples are exactly those whose list held the removed cell, and there are at most
``dp_degree_bound(k, graph)`` of them. The negative control shows the old
``bound_in_degree`` pipeline breaking its claimed ``D = k``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from fedspatial.shared.data.sections import SiteSection, prepare_graph_data
from fedspatial.shared.features.selection import FeatureSpace
from fedspatial.shared.graph.degree_bound import (
    MAX_DP_NEIGHBORS,
    MIN_SEPARATION,
    _gap_needed,
    bound_in_degree,
    check_dp_coordinates,
    dp_degree_bound,
    in_degree,
)
from fedspatial.shared.graph.section_graph import section_neighbors

logger = logging.getLogger(__name__)

_SPACE = FeatureSpace(shared=["g"], selected=["g"], mean=np.zeros(1, np.float32),
                      std=np.ones(1, np.float32), target_sum=1.0, feature_key=None)


# --------------------------------------------------------------------------- the site's graph
def _site_neighbors(sections: list[np.ndarray], k: int, graph: str = "knn", radius: float = 0.0) -> np.ndarray:
    """``int64 (N, m)`` lists of the sections concatenated, built as the site builds them."""
    site = []
    for i, xy in enumerate(sections):
        check_dp_coordinates(np.asarray(xy, dtype=np.float64)[:, :2], f"s{i}")  # the layouts are valid inputs
        adata = ad.AnnData(np.zeros((len(xy), 1), np.float32), obsm={"spatial": np.asarray(xy, dtype=np.float64)})
        site.append(SiteSection("site", f"s{i}", Path("."), adata))
    data = prepare_graph_data(site, _SPACE, graph=graph, n_neighbors=k, radius=radius,
                              inputs=lambda s: np.zeros((s.adata.n_obs, 1), np.float32))
    return data.neighbors.numpy()


def _as_original(nb: np.ndarray, ids: np.ndarray, width: int) -> np.ndarray:
    """Rows ``[id, neighbour ids...]`` in original cell ids, padded with -1 to ``width``."""
    out = np.full((len(nb), 1 + width), -1, dtype=np.int64)
    out[:, 0] = ids
    out[:, 1 : 1 + nb.shape[1]] = np.where(nb >= 0, ids[np.maximum(nb, 0)], -1)
    return out


def _removal_counts(
    sections: list[np.ndarray], k: int, cells: np.ndarray, *, graph: str = "knn", radius: float = 0.0, prune: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """For each removed cell in ``cells`` (global ids): how many other samples changed, and
    how many of those did not hold it (``int (len(cells),)`` each).

    ``prune > 0`` runs the old pipeline (``bound_in_degree(graph, prune)``) instead; the
    plain graph is also checked against the proof's locality step (changed == held it).
    """
    def build(secs: list[np.ndarray]) -> np.ndarray:
        nb = _site_neighbors(secs, k, graph, radius)
        return bound_in_degree(nb, prune) if prune else nb

    sizes = np.array([len(s) for s in sections])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n = int(sizes.sum())
    width = max(k, build(sections).shape[1])
    before = _as_original(build(sections), np.arange(n), width)
    counts, strays = [], []
    for r in cells:
        sec = int(np.searchsorted(starts, r, side="right") - 1)
        reduced = [np.delete(s, r - starts[sec], axis=0) if i == sec else s for i, s in enumerate(sections)]
        ids = np.delete(np.arange(n), r)
        after = _as_original(build(reduced), ids, width)
        changed = ids[(after != before[ids]).any(axis=1)]
        held = ids[(before[ids, 1:] == r).any(axis=1)]
        if not prune:
            assert np.array_equal(changed, held), f"removing {r} changed {sorted(set(changed) ^ set(held))} unexpectedly"
        counts.append(changed.size)
        strays.append(np.setdiff1d(changed, held).size)
    return np.array(counts), np.array(strays)


# --------------------------------------------------------------------------- layouts
def _hex(rows: int, cols: int, *, pixel: bool) -> np.ndarray:
    """Visium spots: array coordinates (integers, col = row mod 2) or equilateral 'pixels'."""
    r, c = np.meshgrid(np.arange(rows), np.arange(2 * cols), indexing="ij")
    keep = (r + c) % 2 == 0
    x, y = c[keep].astype(np.float64), r[keep].astype(np.float64)
    return np.c_[x, y * np.sqrt(3.0)] if pixel else np.c_[x, y]


def _polygon(m: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(m) / m
    return radius * np.c_[np.cos(t), np.sin(t)]


def _hexagon() -> np.ndarray:
    """Centre first, then a regular hexagon whose computed side and radius are all exactly
    1.0 (``s`` is the float64 just above sqrt(3)/2 for which ``0.25 + s*s == 1.0``): every
    corner ties the centre with its two neighbours and, the centre having the lowest index,
    lists it. In-degree 6 = 6k at k = 1: the bound is tight."""
    s = np.nextafter(np.sqrt(3.0) / 2, 1.0)
    return np.array([[0, 0], [1, 0], [0.5, s], [-0.5, s], [-1, 0], [-0.5, -s], [0.5, -s]])


def _five_rays(k: int) -> np.ndarray:
    """Centre first, then k cells on each of 5 rays (72 degrees apart) at distances in [1, 1.5):
    every ray cell lists the centre, which is 5k of a possible 6k."""
    dist = 1 + 0.5 * np.arange(k) / k
    rays = [np.c_[dist * np.cos(a), dist * np.sin(a)] for a in 2 * np.pi * np.arange(5) / 5]
    return np.concatenate([np.zeros((1, 2)), *rays])


def _layouts() -> dict[str, tuple[list[np.ndarray], int, str, float]]:
    """name -> (sections, k, graph, radius)."""
    rng = np.random.default_rng(13)
    blobs = np.concatenate([rng.normal(c, 0.01, (60, 2)) for c in rng.random((5, 2))])
    line = np.c_[np.sort(rng.random(80)) * 10, np.zeros(80)]
    rings = np.concatenate([np.zeros((1, 2)), _polygon(6), _polygon(12, 2, 0.1), _polygon(18, 3, 0.2)])
    three_d = np.c_[rng.random((150, 2)), rng.random(150)]  # the site uses the first two columns
    return {
        "uniform (2 sections)": ([rng.random((200, 2)), rng.random((150, 2)) * 50], 6, "knn", 0.0),
        "clustered blobs": ([blobs], 6, "knn", 0.0),
        "visium hex, pixel": ([_hex(14, 14, pixel=True)], 6, "knn", 0.0),
        "visium hex, array": ([_hex(14, 14, pixel=False)], 6, "knn", 0.0),
        "square grid k=4": ([np.argwhere(np.ones((15, 15))).astype(float)], 4, "knn", 0.0),
        "square grid k=6": ([np.argwhere(np.ones((15, 15))).astype(float)], 6, "knn", 0.0),
        "square grid k=8": ([np.argwhere(np.ones((15, 15))).astype(float)], 8, "knn", 0.0),
        "collinear, even": ([np.c_[np.arange(60.0), np.zeros(60)]], 6, "knn", 0.0),
        "collinear, random": ([line], 3, "knn", 0.0),
        "hexagon around centre k=1": ([_hexagon()], 1, "knn", 0.0),
        "float hexagon around centre k=1": ([np.concatenate([np.zeros((1, 2)), _polygon(6)])], 1, "knn", 0.0),
        "heptagon around centre k=2": ([np.concatenate([np.zeros((1, 2)), _polygon(7)])], 2, "knn", 0.0),
        "concentric rings k=6": ([rings], 6, "knn", 0.0),
        "five rays k=6": ([_five_rays(6)], 6, "knn", 0.0),
        "xyz coordinates": ([three_d], 6, "knn", 0.0),
        "radius, uniform": ([rng.random((250, 2))], 6, "radius", 0.12),
        "radius, visium hex": ([_hex(12, 12, pixel=True)], 6, "radius", 2.01),
    }


LAYOUTS = _layouts()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_removing_one_cell_changes_at_most_the_dp_bound(name: str) -> None:
    sections, k, graph, radius = LAYOUTS[name]
    n = sum(len(s) for s in sections)
    cells = np.arange(n) if n <= 120 else np.random.default_rng(0).choice(n, 120, replace=False)
    counts, _ = _removal_counts(sections, k, cells, graph=graph, radius=radius)
    bound = dp_degree_bound(k, graph)
    logger.info("%s: max %d changed samples (bound %d)", name, counts.max(), bound)
    assert counts.max() <= bound, f"{name}: a removal changed {counts.max()} samples > D = {bound}"
    # every cell, not only the removed ones: the changed count is the in-degree (locality step)
    assert in_degree(_site_neighbors(sections, k, graph, radius)).max() <= bound
    if name.startswith("collinear"):
        assert counts.max() <= dp_degree_bound(k, graph, dim=1)  # two half-lines: 2k


def test_the_layouts_come_close_to_the_bound() -> None:
    """The bound is tight for k = 1 and within 5/6 for k = 6: the layouts do test it."""
    hexagon, _, _, _ = LAYOUTS["hexagon around centre k=1"]
    assert _removal_counts(hexagon, 1, np.array([0]))[0][0] == dp_degree_bound(1, "knn") == 6
    rays, _, _, _ = LAYOUTS["five rays k=6"]
    assert _removal_counts(rays, 6, np.array([0]))[0][0] == 5 * 6


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_small_random_sets_every_cell(k: int) -> None:
    """Many small sets, real-valued and on an integer lattice (exact ties), every cell removed."""
    rng = np.random.default_rng(k)
    worst = 0
    for trial in range(40):
        n = int(rng.integers(2, 14))
        spots = rng.choice(36, size=n, replace=False)
        # odd trials: distinct points of a 6 x 6 lattice (many exact ties); even: real-valued
        xy = np.c_[spots // 6, spots % 6].astype(float) if trial % 2 else rng.random((n, 2))
        counts, _ = _removal_counts([xy], k, np.arange(n))
        worst = max(worst, int(counts.max()))
    assert worst <= dp_degree_bound(k, "knn")


# --------------------------------------------------------------------------- negative controls
@pytest.mark.parametrize("name", ["uniform (2 sections)", "clustered blobs"])
def test_old_in_degree_pruning_breaks_its_claimed_bound(name: str) -> None:
    """bound_in_degree with D = k: one removal changes more than D samples, some of which
    never held the removed cell (the bug this file's main test would have caught)."""
    sections, k, _, _ = LAYOUTS[name]
    n = sum(len(s) for s in sections)
    counts, strays = _removal_counts(sections, k, np.arange(0, n, 3), prune=k)
    logger.info("%s, old pipeline: max %d changed samples (%d not holding it), claimed D = %d",
                name, counts.max(), strays.max(), k)
    assert counts.max() > k, f"{name}: the pruned graph kept within D = {k} ({counts.max()})"
    assert strays.max() > 0


def test_coincident_cells_void_the_bound_and_are_refused() -> None:
    """50 cells on one spot all list the lowest-index one: 49 > 6k; the check refuses them."""
    rng = np.random.default_rng(0)
    xy = np.concatenate([np.zeros((50, 2)), rng.random((100, 2)) + 1])
    assert in_degree(section_neighbors(xy, n_neighbors=6))[0] == 49 > dp_degree_bound(6, "knn")
    with pytest.raises(ValueError, match=r"section 'slide-2'.*50 of its 150 cells.*1 locations"):
        check_dp_coordinates(xy, "slide-2")


# --------------------------------------------------------------------------- the API
def test_dp_degree_bound_values_and_refusals() -> None:
    assert dp_degree_bound(6, "knn") == dp_degree_bound(6, "radius") == 36
    assert dp_degree_bound(4, "knn", dim=1) == 8
    with pytest.raises(ValueError, match="planar"):
        dp_degree_bound(6, "knn", dim=3)
    with pytest.raises(ValueError, match="no degree bound"):
        dp_degree_bound(6, "delaunay")
    with pytest.raises(ValueError, match=r"lower neighbors\.n-neighbors"):
        dp_degree_bound(MAX_DP_NEIGHBORS + 1, "knn")
    with pytest.raises(ValueError, match="n_neighbors"):
        dp_degree_bound(0, "knn")
    # the floating-point step of the proof holds for every k the bound accepts
    assert _gap_needed(MAX_DP_NEIGHBORS) <= MIN_SEPARATION


def test_check_dp_coordinates() -> None:
    rng = np.random.default_rng(0)
    xy = rng.random((50, 2))
    np.testing.assert_array_equal(check_dp_coordinates(xy, "a"), xy)
    check_dp_coordinates(xy[:, :1], "a")  # a line is planar too
    check_dp_coordinates(xy[:1], "a")
    with pytest.raises(ValueError, match=r"section 'z'.*3 columns.*coords\[:, :2\]"):
        check_dp_coordinates(np.c_[xy, xy[:, 0]], "z")
    near = xy.copy()
    near[1] = near[0] + 1e-12
    with pytest.raises(ValueError, match=r"section 'n': 1 pair\(s\) of cells lie closer than 1e-08"):
        check_dp_coordinates(near, "n")
    dup = np.concatenate([xy, xy[:3]])
    with pytest.raises(ValueError, match=r"section 'd': 6 of its 53 cells.*3 locations"):
        check_dp_coordinates(dup, "d")
    with pytest.raises(ValueError, match="non-finite"):
        check_dp_coordinates(np.array([[0.0, np.nan], [1.0, 1.0]]), "f")
