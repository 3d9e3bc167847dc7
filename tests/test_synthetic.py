"""Tests of the built-in synthetic federation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import sparse
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from fedspatial.shared.data.io import load_site
from fedspatial.shared.data.synthetic import (
    SyntheticSpec,
    make_synthetic_federation,
    site_name,
    write_synthetic_federation,
)

SMALL = SyntheticSpec(spots_per_section=(80, 140), n_features=60, seed=7)


@pytest.fixture(scope="module")
def default_federation():
    return make_synthetic_federation()


def _all_sections(federation):
    return [a for sections in federation.values() for a in sections]


def test_default_federation_layout(default_federation):
    spec = SyntheticSpec()
    assert list(default_federation) == ["hospital_a", "hospital_b", "hospital_c"]
    assert [len(s) for s in default_federation.values()] == list(spec.sections_per_site)
    sizes = [a.n_obs for a in _all_sections(default_federation)]
    assert all(spec.spots_per_section[0] <= n <= spec.spots_per_section[1] for n in sizes)
    assert len(set(sizes)) > 1, "section sizes should differ"


def test_required_fields(default_federation):
    spec = SyntheticSpec()
    names = []
    for site, sections in default_federation.items():
        for adata in sections:
            assert sparse.issparse(adata.X) and adata.X.format == "csr"
            assert adata.X.dtype == np.float32
            assert np.array_equal(adata.X.data, np.round(adata.X.data)), "raw integer counts"
            assert adata.X.data.min() >= 0
            coords = adata.obsm["spatial"]
            assert coords.dtype == np.float64 and coords.shape == (adata.n_obs, 2)
            assert list(adata.obs["domain"].cat.categories) == spec.domain_names
            assert (adata.obs["site"] == site).all()
            section = adata.obs["section"].iloc[0]
            assert (adata.obs["section"] == section).all() and section.startswith(site)
            assert all(name.startswith(section) for name in adata.obs_names[:5])
            assert adata.var_names[0] == "F0000" and adata.n_vars == spec.n_features
            assert adata.uns["synthetic"] == spec.to_dict()
            names.extend(adata.obs_names)
    assert len(names) == len(set(names)), "obs_names must be unique across the federation"


def test_deterministic_by_seed():
    first, second = make_synthetic_federation(SMALL), make_synthetic_federation(SMALL)
    for a, b in zip(_all_sections(first), _all_sections(second), strict=True):
        assert (a.X != b.X).nnz == 0
        np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
        assert a.obs.equals(b.obs)
    reseeded = SyntheticSpec(spots_per_section=(80, 140), n_features=60, seed=8)
    a, b = _all_sections(first)[0], _all_sections(make_synthetic_federation(reseeded))[0]
    assert a.n_obs != b.n_obs or (a.X != b.X).nnz > 0, "a new seed must give new data"


def test_domain_absent_at_one_site_and_rare_elsewhere(default_federation):
    counts = {
        site: sum(a.obs["domain"].value_counts().to_numpy() for a in sections)
        for site, sections in default_federation.items()
    }
    totals = {site: c.sum() for site, c in counts.items()}
    assert counts["hospital_c"][-1] == 0, "last domain is absent at the last site"
    assert counts["hospital_a"][-1] > 0 and counts["hospital_b"][-1] > 0
    for site in ("hospital_a", "hospital_b"):
        assert counts[site].min() / totals[site] < 0.06, f"{site} should have a rare domain"


def test_batch_effects_present(default_federation):
    libraries = {
        site: np.mean([np.asarray(a.X.sum(axis=1)).mean() for a in sections])
        for site, sections in default_federation.items()
    }
    assert max(libraries.values()) / min(libraries.values()) > 1.4
    zero_fraction = {
        site: np.mean([1 - a.X.nnz / np.prod(a.shape) for a in sections])
        for site, sections in default_federation.items()
    }
    assert zero_fraction["hospital_b"] > zero_fraction["hospital_a"], "extra dropout at hospital_b"


def test_hexagonal_grid_and_spatial_coherence(default_federation):
    adata = default_federation["hospital_a"][0]
    coords = adata.obsm["spatial"]
    dist, idx = cKDTree(coords).query(coords, k=7)
    assert np.median(dist[:, 1:]) == pytest.approx(100.0, rel=0.05)
    labels = adata.obs["domain"].cat.codes.to_numpy()
    same = (labels[idx[:, 1:]] == labels[:, None]).mean()
    assert same > 0.75, "domains must be spatially coherent"


def _cluster_ari(expr: np.ndarray, labels: np.ndarray, n_clusters: int) -> float:
    centred = expr - expr.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    pcs = u[:, :15] * s[:15]
    predicted = KMeans(n_clusters, n_init=3, random_state=0).fit_predict(pcs)
    return adjusted_rand_score(labels, predicted)


def test_spatial_smoothing_helps(default_federation):
    """Single spots are noisy; averaging over the hexagonal neighbourhood should help clearly."""
    adata = default_federation["hospital_c"][1]
    counts = adata.X.toarray()
    expr = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    _, idx = cKDTree(adata.obsm["spatial"]).query(adata.obsm["spatial"], k=7)
    smoothed = expr[idx].mean(axis=1)[idx].mean(axis=1)  # two rounds: second-ring neighbours
    labels = adata.obs["domain"].cat.codes.to_numpy()
    k = len(np.unique(labels))
    single, spatial = _cluster_ari(expr, labels, k), _cluster_ari(smoothed, labels, k)
    assert single < 0.4
    assert spatial > 0.6


def test_spec_validation_and_round_trip():
    with pytest.raises(ValueError, match="sections_per_site"):
        SyntheticSpec(n_sites=4)
    with pytest.raises(ValueError, match="spots_per_section"):
        SyntheticSpec(spots_per_section=(500, 100))
    spec = SyntheticSpec(n_sites=2, sections_per_site=[1, 2], seed=3)
    assert SyntheticSpec(**json.loads(json.dumps(spec.to_dict()))) == spec
    assert [site_name(i) for i in (0, 25, 26)] == ["hospital_a", "hospital_z", "hospital_aa"]


def test_write_and_reload(tmp_path):
    root = tmp_path / "fed"
    manifest_path = write_synthetic_federation(root, SMALL)
    manifest = json.loads(manifest_path.read_text())
    assert manifest_path == root.resolve() / "federation.json"
    assert manifest["spec"] == SMALL.to_dict()
    assert [s["name"] for s in manifest["sites"]] == SMALL.site_names
    expected = make_synthetic_federation(SMALL)
    for site in manifest["sites"]:
        sections = load_site(site["data-path"])
        assert [s.name for s in sections] == [
            f"{site['name']}_s{i + 1}" for i in range(len(sections))
        ]
        for section, original in zip(sections, expected[site["name"]], strict=True):
            assert (section.adata.X != original.X).nnz == 0
            np.testing.assert_array_equal(section.adata.obsm["spatial"], original.obsm["spatial"])
            assert list(section.adata.obs["domain"].cat.categories) == SMALL.domain_names
            assert SyntheticSpec.from_dict(section.adata.uns["synthetic"]) == SMALL
    assert not list(root.rglob(".*")), "no temporary files left behind"


def test_write_refuses_to_overwrite(tmp_path):
    root = tmp_path / "fed"
    write_synthetic_federation(root, SMALL)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_federation(root, SMALL)
    smaller = SyntheticSpec(
        n_sites=2, sections_per_site=(1, 1), spots_per_section=(40, 60), n_features=30
    )
    write_synthetic_federation(root, smaller, overwrite=True)
    assert len(list((root / "hospital_a").glob("*.h5ad"))) == 1, "stale sections removed"
    assert json.loads((root / "federation.json").read_text())["spec"] == smaller.to_dict()


def test_write_into_empty_existing_folder(tmp_path):
    assert write_synthetic_federation(tmp_path, SMALL).is_file()
