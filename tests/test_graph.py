"""Tests for fedspatial.shared.graph.neighbors on hand-checkable grids."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from fedspatial.shared.graph.neighbors import (
    knn_neighbors,
    neighbors_to_edge_index,
    radius_neighbors,
    section_neighbors,
    spatial_neighbors,
)

# 3x3 unit grid, row-major:
#   0 1 2        (x, y) = (col, row)
#   3 4 5
#   6 7 8
GRID = np.array([[x, y] for y in range(3) for x in range(3)], dtype=float)


# --------------------------------------------------------------------------- kNN
def test_knn_centre_of_grid_gets_the_four_edge_neighbours_in_index_order():
    nb = knn_neighbors(GRID, 4)
    assert nb.dtype == np.int64
    assert nb.shape == (9, 4)
    np.testing.assert_array_equal(nb[4], [1, 3, 5, 7])


def test_knn_corner_of_grid_nearest_first_ties_by_index():
    nb = knn_neighbors(GRID, 4)
    # corner 0: 1 and 3 at distance 1, then 4 at sqrt(2), then 2 and 6 at distance 2
    np.testing.assert_array_equal(nb[0], [1, 3, 4, 2])
    # corner 8: 5 and 7 at 1, 4 at sqrt(2), then 2 and 6 at 2 -> the lower index 2
    np.testing.assert_array_equal(nb[8], [5, 7, 4, 2])
    # edge point 1: 0, 2, 4 at distance 1, then 3 and 5 at sqrt(2)
    np.testing.assert_array_equal(nb[1], [0, 2, 4, 3])


def test_knn_ties_beyond_the_first_candidates_use_the_lower_index():
    # 12 points at distance exactly 5 from the origin (Pythagorean triples), in
    # shuffled index order: the k nearest of the origin are the k lowest indices,
    # whatever subset the KD-tree happens to return first.
    ring = np.array(
        [
            [3, 4],
            [4, 3],
            [-3, 4],
            [-4, 3],
            [3, -4],
            [4, -3],
            [-3, -4],
            [-4, -3],
            [5, 0],
            [-5, 0],
            [0, 5],
            [0, -5],
        ],
        dtype=float,
    )
    rng = np.random.default_rng(0)
    for _ in range(10):
        pts = np.vstack([[0.0, 0.0], ring[rng.permutation(len(ring))]])
        for k in (1, 2, 5):
            np.testing.assert_array_equal(knn_neighbors(pts, k)[0], np.arange(1, k + 1))


def test_knn_excludes_self_and_pads_small_sections():
    pts = np.array([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    nb = knn_neighbors(pts, 4)
    np.testing.assert_array_equal(nb, [[2, 1, -1, -1], [2, 0, -1, -1], [0, 1, -1, -1]])
    assert not any(i in row for i, row in enumerate(nb))


def test_knn_single_point_and_empty_section():
    np.testing.assert_array_equal(knn_neighbors(np.array([[5.0, 5.0]]), 3), [[-1, -1, -1]])
    assert knn_neighbors(np.empty((0, 2)), 3).shape == (0, 3)


def test_knn_coincident_points_are_neighbours_at_distance_zero():
    pts = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    nb = knn_neighbors(pts, 2)
    np.testing.assert_array_equal(nb, [[1, 2], [0, 2], [0, 1], [0, 1]])


def test_knn_three_dimensional_coordinates():
    pts = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 3], [5, 5, 5]], dtype=float)
    np.testing.assert_array_equal(knn_neighbors(pts, 1)[:, 0], [1, 0, 1, 2])


@pytest.mark.parametrize(
    ("coords", "k"),
    [(np.zeros(3), 1), (np.array([[0.0, np.nan]]), 1), (GRID, 0), (GRID, 1.5)],
)
def test_knn_rejects_bad_input(coords, k):
    with pytest.raises(ValueError):
        knn_neighbors(coords, k)


# --------------------------------------------------------------------------- radius
def test_radius_centre_has_four_neighbours_at_distance_one():
    nb = radius_neighbors(GRID, 1.0)
    assert nb.dtype == np.int64
    # max degree with r=1 is the centre's 4
    assert nb.shape == (9, 4)
    np.testing.assert_array_equal(nb[4], [1, 3, 5, 7])
    np.testing.assert_array_equal(nb[0], [1, 3, -1, -1])
    np.testing.assert_array_equal(nb[1], [0, 2, 4, -1])


def test_radius_nearest_first_then_by_index():
    nb = radius_neighbors(GRID, 1.5)  # includes diagonals at sqrt(2)
    assert nb.shape == (9, 8)
    np.testing.assert_array_equal(nb[4], [1, 3, 5, 7, 0, 2, 6, 8])
    np.testing.assert_array_equal(nb[0], [1, 3, 4, -1, -1, -1, -1, -1])


def test_radius_max_neighbors_keeps_the_nearest_and_fixes_the_width():
    nb = radius_neighbors(GRID, 1.5, max_neighbors=3)
    assert nb.shape == (9, 3)
    np.testing.assert_array_equal(nb[4], [1, 3, 5])
    np.testing.assert_array_equal(nb[0], [1, 3, 4])
    # width is max_neighbors even when the real degree is smaller
    nb = radius_neighbors(GRID, 1.0, max_neighbors=6)
    assert nb.shape == (9, 6)
    np.testing.assert_array_equal(nb[0], [1, 3, -1, -1, -1, -1])
    assert ((nb >= 0).sum(axis=1) <= 6).all()


def test_radius_isolated_points_and_tiny_sections():
    assert radius_neighbors(GRID, 0.5).shape == (9, 0)
    np.testing.assert_array_equal(radius_neighbors(GRID, 0.5, max_neighbors=2), -np.ones((9, 2)))
    assert radius_neighbors(np.array([[1.0, 2.0]]), 1.0).shape == (1, 0)
    assert radius_neighbors(np.array([[1.0, 2.0]]), 1.0, max_neighbors=2).tolist() == [[-1, -1]]
    assert radius_neighbors(np.empty((0, 2)), 1.0).shape == (0, 0)


@pytest.mark.parametrize("radius", [0.0, -1.0, np.inf, np.nan, "a"])
def test_radius_rejects_bad_radius(radius):
    with pytest.raises(ValueError, match="radius"):
        radius_neighbors(GRID, radius)


# --------------------------------------------------------------------------- dispatcher
def test_section_neighbors_dispatches():
    np.testing.assert_array_equal(section_neighbors(GRID, n_neighbors=4), knn_neighbors(GRID, 4))
    np.testing.assert_array_equal(
        section_neighbors(GRID, method="radius", radius=1.0), radius_neighbors(GRID, 1.0)
    )
    np.testing.assert_array_equal(
        section_neighbors(GRID, method="knn", n_neighbors=2, max_neighbors=2),
        knn_neighbors(GRID, 2),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "delaunay"}, "Unknown graph method"),
        ({"method": "radius"}, "requires a radius"),
        ({"method": "radius", "radius": 0.0}, "radius"),
        ({"method": "knn", "radius": 1.0}, "only used with method='radius'"),
        ({"method": "knn", "n_neighbors": 6, "max_neighbors": 4}, "max_neighbors"),
        ({"method": "knn", "n_neighbors": 0}, "n_neighbors"),
        ({"method": "radius", "radius": 1.0, "max_neighbors": 0}, "max_neighbors"),
    ],
)
def test_section_neighbors_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        section_neighbors(GRID, **kwargs)


# --------------------------------------------------------------------------- edge_index
def test_edge_index_source_to_target_flow_and_padding_skipped():
    nb = np.array([[1, 2], [0, -1], [-1, -1]])
    ei = neighbors_to_edge_index(nb)
    assert ei.dtype == np.int64
    # row 0: neighbour j (source); row 1: node i (target)
    np.testing.assert_array_equal(ei, [[1, 2, 0], [0, 0, 1]])


def test_edge_index_of_grid_graph_has_one_edge_per_listed_neighbour():
    nb = knn_neighbors(GRID, 4)
    ei = neighbors_to_edge_index(nb)
    assert ei.shape == (2, 36)
    centre_sources = ei[0, ei[1] == 4]
    np.testing.assert_array_equal(centre_sources, [1, 3, 5, 7])


def test_edge_index_empty_and_invalid():
    assert neighbors_to_edge_index(np.empty((3, 0), dtype=np.int64)).shape == (2, 0)
    with pytest.raises(ValueError):
        neighbors_to_edge_index(np.array([[3]]))
    with pytest.raises(ValueError):
        neighbors_to_edge_index(np.array([1, 2]))


# --------------------------------------------------------------------------- AnnData
def _grid_adata() -> ad.AnnData:
    adata = ad.AnnData(np.zeros((9, 2), dtype=np.float32))
    adata.obsm["spatial"] = GRID.copy()
    return adata


def test_spatial_neighbors_writes_documented_fields_in_place():
    adata = _grid_adata()
    assert spatial_neighbors(adata, method="radius", radius=1.5) is None
    conn = adata.obsp["spatial_connectivities"]
    dist = adata.obsp["spatial_distances"]
    assert sparse.issparse(conn) and conn.format == "csr"
    assert sparse.issparse(dist) and dist.format == "csr"
    # row i lists the neighbours of i
    np.testing.assert_array_equal(conn[0].indices, [1, 3, 4])
    np.testing.assert_array_equal(conn[0].data, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(dist[0].toarray().ravel()[[1, 3, 4]], [1.0, 1.0, np.sqrt(2)])
    assert conn.nnz == dist.nnz == 2 * (12 + 8)  # 12 edge-adjacent + 8 diagonal pairs
    info = adata.uns["spatial_neighbors"]
    assert info["connectivities_key"] == "spatial_connectivities"
    assert info["distances_key"] == "spatial_distances"
    assert info["params"]["method"] == "radius"
    assert info["params"]["radius"] == 1.5


def test_spatial_neighbors_knn_matches_section_neighbors_and_copy_semantics():
    adata = _grid_adata()
    out = spatial_neighbors(adata, n_neighbors=4, key_added="grid", copy=True)
    assert out is not None and out is not adata
    assert "grid_connectivities" not in adata.obsp
    assert "grid_neighbors" not in adata.uns
    conn = out.obsp["grid_connectivities"]
    nb = knn_neighbors(GRID, 4)
    for i in range(9):
        np.testing.assert_array_equal(conn[i].indices, np.sort(nb[i]))
    assert out.uns["grid_neighbors"]["params"]["n_neighbors"] == 4
    # kNN is directed: corner 8 lists 2 (tie with 6, lower index), corner 2 lists 0 not 8
    assert conn[8, 2] == 1.0 and conn[2, 8] == 0.0


def test_spatial_neighbors_never_connects_sections():
    # two copies of the grid on top of each other, in two sections
    adata = ad.AnnData(np.zeros((18, 1), dtype=np.float32))
    adata.obsm["xy"] = np.vstack([GRID, GRID])
    adata.obs["section"] = pd.Categorical(["a"] * 9 + ["b"] * 9)
    spatial_neighbors(adata, spatial_key="xy", library_key="section", n_neighbors=4)
    conn = adata.obsp["spatial_connectivities"].toarray()
    assert conn[:9, 9:].sum() == 0 and conn[9:, :9].sum() == 0
    np.testing.assert_array_equal(np.flatnonzero(conn[13]), [10, 12, 14, 16])
    assert adata.uns["spatial_neighbors"]["params"]["library_key"] == "section"


def test_spatial_neighbors_errors():
    adata = _grid_adata()
    with pytest.raises(KeyError, match="obsm"):
        spatial_neighbors(adata, spatial_key="missing")
    with pytest.raises(KeyError, match="obs"):
        spatial_neighbors(adata, library_key="missing")
    with pytest.raises(ValueError, match="requires a radius"):
        spatial_neighbors(adata, method="radius")


def test_bound_in_degree_on_a_line():
    from fedspatial.shared.graph.neighbors import bound_in_degree, in_degree

    coords = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    nb = knn_neighbors(coords, 2)
    assert nb.tolist() == [[1, 2], [0, 2], [1, 3], [2, 4], [3, 2]]
    assert in_degree(nb).tolist() == [1, 2, 4, 2, 1]
    # Point 2 keeps the lists where it ranks nearest (3: first; then 0 before 1 and 4).
    bounded = bound_in_degree(nb, 2)
    assert bounded.tolist() == [[1, 2], [0, -1], [1, 3], [2, 4], [3, -1]]
    assert in_degree(bounded).max() == 2
    assert bound_in_degree(nb, 4).tolist() == nb.tolist()
    with pytest.raises(ValueError, match="max_in_degree"):
        bound_in_degree(nb, 0)
