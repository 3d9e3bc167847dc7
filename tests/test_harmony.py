"""Tests for fedspatial.shared.algorithms.harmony (federated Harmony reproducing harmonypy)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedspatial.shared.algorithms.harmony import (
    ASSIGN,
    COUNTS,
    FederatedHarmony,
    HarmonySite,
    StdMt19937,
    block_bounds,
    federated_harmony,
    run_protocol,
    std_shuffle,
)
from fedspatial.shared.evaluation.integration import batch_asw, clisi, ilisi

logger = logging.getLogger(__name__)


def _federation(
    seed: int, sizes: list[int], site_batches: list[list[int]], n_batches: int, d: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Three cell types with strong per-batch shifts; each site draws its own batches.

    Values are rounded to float32 because harmonypy computes in float32.
    """
    rng = np.random.default_rng(seed)
    types = rng.normal(size=(3, d)) * 3
    shifts = rng.normal(size=(n_batches, d)) * 2
    Zs, batches, labels = [], [], []
    for n, allowed in zip(sizes, site_batches, strict=True):
        b = rng.choice(allowed, n)
        t = rng.integers(0, 3, n)
        Z = types[t] + shifts[b] + 0.5 * rng.normal(size=(n, d))
        Zs.append(Z.astype(np.float32).astype(np.float64))
        batches.append(b)
        labels.append(t)
    return Zs, batches, labels


# Batch 1 spans sites 0 and 1, batch 2 sites 1 and 2; each site holds two batches.
SITES = {"sizes": [150, 130, 120], "site_batches": [[0, 1], [1, 2], [2, 3]], "n_batches": 4}

CASES = {
    "defaults": (dict(seed=0, d=16, **SITES), {}),
    "fixed-lambda-tau-blocks": (
        dict(seed=1, sizes=[101, 90, 77], site_batches=[[0], [0, 1], [1, 2]], n_batches=3, d=10),
        dict(lamb=1.0, block_size=0.1, tau=5.0, random_state=3),
    ),
    "kmeans-convergence": (
        dict(seed=2, sizes=[200, 170, 163], site_batches=[[0, 1], [1], [0, 1]], n_batches=2, d=20),
        dict(theta=[1.0, 3.0], sigma=0.2, max_iter_kmeans=8, nclust=12),
    ),
}


def _harmonypy(Z: np.ndarray, batches: np.ndarray, **params: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pooled harmonypy: its initial centroids (K x d) and its corrected embedding.

    harmonypy does not accept initial centroids, so its own initialization is read
    from a run with max_iter_harmony=0 (its Y after initialization) and fed to the
    federated run.
    """
    hm = pytest.importorskip("harmonypy")
    meta = {"batch": batches}
    init_params = {k: v for k, v in params.items() if k != "max_iter_harmony"}
    init = hm.run_harmony(Z, meta, "batch", verbose=False, max_iter_harmony=0, **init_params)
    result = hm.run_harmony(Z, meta, "batch", verbose=False, **params)
    return np.asarray(init.Y).T, np.asarray(result.Z_corr)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_pooled_harmonypy(case: str) -> None:
    data, params = CASES[case]
    Zs, batches, _ = _federation(**data)
    init, expected = _harmonypy(np.vstack(Zs), np.concatenate(batches), **params)
    fed_params = {k: v for k, v in params.items() if k != "nclust"}
    corrected = federated_harmony(
        Zs, batches, init_centroids=init, n_batches=data["n_batches"], **fed_params
    )
    diff = np.abs(np.vstack(corrected) - expected).max()
    logger.info("%s: max |federated - harmonypy| = %.3g", case, diff)
    assert [c.shape for c in corrected] == [Z.shape for Z in Zs]
    assert diff < 1e-5  # the README states 1e-5


def test_batch_mixing_improves_and_cell_types_stay_apart() -> None:
    Zs, batches, labels = _federation(seed=0, d=16, **SITES)
    corrected = federated_harmony(Zs, batches, n_batches=4)  # federated k-means init
    b, t = np.concatenate(batches), np.concatenate(labels)
    before, after = np.vstack(Zs), np.vstack(corrected)
    # Separated before (iLISI ~0); pooled harmonypy reaches about 0.26 here.
    assert ilisi(after, b) > ilisi(before, b) + 0.2
    assert batch_asw(after, b, t) > batch_asw(before, b, t) + 0.3
    assert clisi(after, t) > 0.9


def _recording_sites(
    Zs: list[np.ndarray], batches: list[np.ndarray], log: list[tuple[int, str, str, tuple]]
) -> list[HarmonySite]:
    sites = [HarmonySite(Z, b) for Z, b in zip(Zs, batches, strict=True)]
    for s, site in enumerate(sites):
        handle = site.handle

        def recorded(request: Mapping[str, Any], s: int = s, handle: Any = handle) -> dict:
            reply = handle(request)
            log.extend((s, request["kind"], k, np.shape(v)) for k, v in reply.items())
            return reply

        site.handle = recorded  # type: ignore[method-assign]
    return sites


def test_site_replies_are_cluster_level() -> None:
    Zs, batches, _ = _federation(seed=0, d=16, **SITES)
    K, B, d = 7, SITES["n_batches"], 16
    init = np.random.default_rng(0).normal(size=(K, d))
    log: list[tuple[int, str, str, tuple]] = []
    sites = _recording_sites(Zs, batches, log)
    server = FederatedHarmony(init, n_batches=B, n_sites=3, max_iter_harmony=3)
    run_protocol(server, sites)
    n_blocks = block_bounds(sum(SITES["sizes"]), 0.05).size - 1

    allowed = {K, B, d, n_blocks}
    assert allowed.isdisjoint(SITES["sizes"])  # so a per-cell array would show
    assert {kind for _, kind, _, _ in log} == {
        "counts",
        "assign",
        "pass",
        "block",
        "ridge",
        "correct",
    }
    for _, _, key, shape in log:
        assert set(shape) <= allowed, (key, shape)
    # Every site sends the same shapes: nothing depends on how many cells it has.
    shapes: dict[tuple[str, str], set[tuple]] = {}
    for _, kind, key, shape in log:
        shapes.setdefault((kind, key), set()).add(shape)
    assert all(len(s) == 1 for s in shapes.values()), shapes


def test_server_is_a_state_machine() -> None:
    Zs, batches, _ = _federation(seed=0, d=16, **SITES)
    sites = [HarmonySite(Z, b) for Z, b in zip(Zs, batches, strict=True)]
    init = np.random.default_rng(1).normal(size=(5, 16))
    server = FederatedHarmony(init, n_batches=4, n_sites=3, max_iter_harmony=1)
    first = server.next_request()
    assert first is not None and first.kind == COUNTS
    assert server.next_request() is first  # unchanged until the replies come
    with pytest.raises(ValueError, match="replies"):
        server.receive([sites[0].handle(first.for_site(0))])
    server.receive([site.handle(first.for_site(s)) for s, site in enumerate(sites)])
    assign = server.next_request()
    assert assign is not None and assign.kind == ASSIGN
    bad = [{"O": np.zeros((5, 3)), "error": np.zeros(()), "entropy": np.zeros(())}] * 3
    with pytest.raises(ValueError, match="shape"):
        server.receive(bad)
    run_protocol(server, sites)
    assert server.done and server.next_request() is None and server.n_iter == 1
    with pytest.raises(RuntimeError):
        server.receive([{}, {}, {}])


def test_site_validates_its_inputs() -> None:
    site = HarmonySite(np.zeros((4, 2)), np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="out of range"):
        site.handle({"kind": COUNTS, "n_batches": np.asarray(3)})
    with pytest.raises(ValueError, match="unknown"):
        site.handle({"kind": "gossip"})
    with pytest.raises(ValueError, match="match"):
        HarmonySite(np.zeros((4, 2)), np.array([0, 1]))


def test_mt19937_matches_the_cpp_standard() -> None:
    # The C++ standard requires the 10000th output of a default std::mt19937.
    assert StdMt19937(5489).outputs(10000)[-1] == 4123659995


def _hash(order: np.ndarray) -> int:
    value = 0
    for x in order.tolist():
        value = (value * 1000003 + x) % 1000000007
    return value


@pytest.mark.parametrize(
    ("n", "skip", "seed", "expected"),
    [
        (500, 37, 0, (379190083, 215, 497)),  # even n: one single draw, then pairs
        (501, 0, 7, (205081581, 221, 445)),  # odd n: pairs only
        (70001, 5, 2, (625020938, 11075, 40280)),  # n * n > 2**32: one draw per element
    ],
)
def test_std_shuffle_matches_libstdcxx(
    n: int, skip: int, seed: int, expected: tuple[int, int, int]
) -> None:
    # Expected values printed by std::shuffle(v.begin(), v.end(), rng) after
    # std::mt19937 rng(seed); rng.discard(skip); compiled with g++ 12 (libstdc++).
    rng = StdMt19937(seed)
    rng.discard(skip)
    order = std_shuffle(rng, n)
    assert (_hash(order), order[0], order[-1]) == expected
    assert np.array_equal(np.sort(order), np.arange(n))


def test_block_bounds_follow_harmonypy() -> None:
    assert block_bounds(400, 0.05).tolist() == list(range(0, 401, 20))
    assert block_bounds(10, 0.05).tolist() == list(range(11))  # one cell per block
    bounds = block_bounds(268, 0.1)  # 10 blocks of 26, the last takes 34
    assert bounds.size == 11 and bounds[-2] == 234 and bounds[-1] == 268
