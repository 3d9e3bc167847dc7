"""Server sides of the federated PCA and Gaussian-mixture phases of a run.

Both are message loops over :func:`~fedspatial.server.messaging.ask`; the arithmetic
lives in :mod:`fedspatial.shared.pca` and :mod:`fedspatial.shared.mixture`. Sites only
ever return sums over their cells.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from fedspatial.client.payload import arrays_record, record_arrays
from fedspatial.server.messaging import ask
from fedspatial.shared.mixture import (
    FederatedGaussianMixture,
    MixtureParams,
    MixtureStats,
    merge_mixture_stats,
)
from fedspatial.shared.pca import FederatedPCA, PCABasis

logger = logging.getLogger(__name__)


def _in_order(replies: Mapping[int, Any], names: Mapping[int, str]) -> list[Any]:
    # Sum in a fixed (site name) order so that results do not depend on reply order.
    return [replies[n] for n in sorted(replies, key=lambda n: names.get(n, str(n)))]


def federated_pca_rounds(
    grid: Grid,
    nodes: list[int],
    names: Mapping[int, str],
    common: Mapping[str, Any],
    *,
    n_features: int,
    n_components: int,
    seed: int = 0,
) -> PCABasis:
    """Run federated PCA on the sites' standardized features and store the basis at
    every site (``query.pca`` stages ``sums``, ``power`` x n_iter, ``rayleigh``, ``store``)."""
    pca = FederatedPCA(n_features, n_components, seed=seed)

    def stage(name: str, arrays: dict[str, np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
        replies = ask(
            grid, nodes, "pca", config={**common, "stage": name},
            arrays=arrays_record(arrays) if arrays else None, names=names,
        )
        return [record_arrays(r["arrays"]) for r in _in_order(replies, names) if "arrays" in r]

    sums = stage("sums")
    mean = pca.set_mean([s["sums"] for s in sums], [float(s["count"][0]) for s in sums])
    while pca.iterating:
        pca.step([r["product"] for r in stage("power", {"mean": mean, "basis": pca.basis})])
    basis = pca.finish([r["rayleigh"] for r in stage("rayleigh", {"mean": mean, "basis": pca.basis})])
    stage("store", basis.to_arrays())
    n = pca.n_cells
    total = (sum(float(s["sumsq"][0]) for s in sums) - n * float(mean @ mean)) / (n - 1)
    kept = basis.explained_variance.sum() / max(total, 1e-12)
    logger.info("federated PCA: %d components of %d features (%.0f%% of the variance)", n_components, n_features, 100 * kept)
    return basis


def federated_mixture_rounds(
    grid: Grid,
    nodes: list[int],
    names: Mapping[int, str],
    common: Mapping[str, Any],
    *,
    centroids: np.ndarray,
    covariance_type: str,
    max_iter: int = 100,
) -> tuple[MixtureParams, FederatedGaussianMixture]:
    """Fit a Gaussian mixture to the embeddings kept at the sites, started from the
    k-means assignment to ``centroids`` (``query.mixture``, one round per EM iteration)."""
    em = FederatedGaussianMixture(covariance_type=covariance_type, max_iter=max_iter)
    config = {**common, "covariance-type": covariance_type}

    def merged(arrays: dict[str, np.ndarray]) -> MixtureStats:
        replies = ask(grid, nodes, "mixture", config=config, arrays=arrays_record(arrays), names=names)
        return merge_mixture_stats([MixtureStats.from_arrays(record_arrays(r["arrays"])) for r in _in_order(replies, names)])

    params = em.init(merged({"centroids": centroids}))
    while not em.done:
        params = em.step(merged(params.to_arrays()))
    logger.info(
        "federated Gaussian mixture (%s): %d EM iterations, %s, mean log-likelihood %.4f",
        covariance_type, em.n_iter, "converged" if em.converged else "not converged", em.lower_bound,
    )
    return params, em
