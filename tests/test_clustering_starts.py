"""Several clustering starts carried side by side in one message (shared/protocol/payload.py)."""

from __future__ import annotations

import numpy as np

from fedspatial.shared.protocol.payload import chain_arrays, split_chains


def test_clustering_starts_share_one_message():
    chains = {0: {"centroids": np.zeros((2, 3))}, 2: {"centroids": np.ones((2, 3)), "previous": np.eye(3)[:2]}}
    flat = chain_arrays(chains)
    assert sorted(flat) == ["centroids@0", "centroids@2", "previous@2"]
    back = split_chains(flat)
    assert list(back) == [0, 2] and np.array_equal(back[2]["previous"], np.eye(3)[:2])
    # a message without start suffixes is start 0
    assert list(split_chains({"centroids": np.zeros(1)})) == [0]
