"""Server sides of the federated PCA, small-panel mapping and Gaussian-mixture phases of a run.

Both are message loops over :func:`~fedspatial.server.messaging.ask`; the arithmetic
lives in :mod:`fedspatial.shared.algorithms.pca` and :mod:`fedspatial.shared.algorithms.mixture`. Sites only
ever return sums over their cells.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from fedspatial.client.payload import (
    arrays_record,
    chain_arrays,
    feature_space_to_config,
    record_arrays,
    split_chains,
)
from fedspatial.server.messaging import ask
from fedspatial.shared.algorithms.mixture import (
    FederatedGaussianMixture,
    MixtureParams,
    MixtureStats,
    merge_mixture_stats,
)
from fedspatial.shared.algorithms.panels import PanelMap, fit_panel_map, merge_panel_moments
from fedspatial.shared.algorithms.pca import FederatedPCA, PCABasis
from fedspatial.shared.features.selection import (
    FeatureStats,
    build_feature_space,
    merge_feature_stats,
)

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
    centroids: list[np.ndarray],
    covariance_type: str,
    max_iter: int = 100,
) -> tuple[MixtureParams, list[FederatedGaussianMixture]]:
    """Fit a Gaussian mixture to the embeddings kept at the sites from each start (the
    k-means assignment to each of ``centroids``), the starts side by side in the same
    messages (``query.mixture``, one round per EM iteration); returns the parameters of
    the start reaching the highest log-likelihood (scikit-learn's ``n_init`` rule) and
    every start's EM state."""
    chains = [FederatedGaussianMixture(covariance_type=covariance_type, max_iter=max_iter) for _ in centroids]
    config = {**common, "covariance-type": covariance_type}

    def merged(arrays: dict[int, dict[str, np.ndarray]]) -> dict[int, MixtureStats]:
        replies = ask(grid, nodes, "mixture", config=config, arrays=arrays_record(chain_arrays(arrays)), names=names)
        per_site = [split_chains(record_arrays(r["arrays"])) for r in _in_order(replies, names)]
        return {i: merge_mixture_stats([MixtureStats.from_arrays(site[i]) for site in per_site]) for i in arrays}

    params = {i: chains[i].init(stats) for i, stats in merged({i: {"centroids": c} for i, c in enumerate(centroids)}).items()}
    while not all(em.done for em in chains):
        active = {i: params[i].to_arrays() for i, em in enumerate(chains) if not em.done}
        for i, stats in merged(active).items():
            params[i] = chains[i].step(stats)
    best = max(range(len(chains)), key=lambda i: chains[i].lower_bound)
    em = chains[best]
    logger.info(
        "federated Gaussian mixture (%s): start %d of %d kept (mean log-likelihood %.4f; all: %s), %d EM iterations, %s",
        covariance_type, best + 1, len(chains), em.lower_bound,
        ", ".join(f"{c.lower_bound:.4f}" for c in chains), em.n_iter, "converged" if em.converged else "not converged",
    )
    return params[best], chains


def federated_feature_stats(
    grid: Grid,
    nodes: list[int],
    names: Mapping[int, str],
    common: Mapping[str, Any],
    *,
    features: list[str],
    target_sum: float,
    sections: list[str] | None = None,
) -> FeatureStats:
    """Per-feature aggregates over ``features`` (``query.feature_stats``; only over the
    named sections when given), summed in site-name order."""
    config = {**common, "features": features, "target-sum": target_sum, **({"sections": sections} if sections else {})}
    replies = ask(grid, nodes, "feature_stats", config=config, names=names)
    return merge_feature_stats(
        [FeatureStats.from_arrays(features, int(r["metrics"]["num-examples"]), record_arrays(r["arrays"])) for r in _in_order(replies, names)]
    )


def federated_panel_rounds(
    grid: Grid,
    reference_nodes: list[int],
    panel_nodes: list[int],
    names: Mapping[int, str],
    common: Mapping[str, Any],
    *,
    panel_id: str,
    panel: list[str],
    reference_sections: list[str],
    target_sum: float,
    feature_key: str | None,
) -> PanelMap:
    """Map one small panel onto the model inputs: the panel's standardization and the
    regression sums come from the reference sections (``query.feature_stats``,
    ``query.panel`` stage ``moments``), the fitted map goes to the sites holding
    sections with that panel (stage ``store``)."""
    stats = federated_feature_stats(
        grid, reference_nodes, names, common, features=panel, target_sum=target_sum, sections=reference_sections
    )
    space = build_feature_space(stats, n_top_features=None, target_sum=target_sum, feature_key=feature_key)
    config = {**common, **feature_space_to_config(space), "panel-id": panel_id}
    replies = ask(grid, reference_nodes, "panel", config={**config, "stage": "moments"}, names=names)
    panel_map = fit_panel_map(merge_panel_moments([record_arrays(r["arrays"]) for r in _in_order(replies, names)]))
    ask(grid, panel_nodes, "panel", config={**config, "stage": "store"}, arrays=arrays_record(panel_map.to_arrays()), names=names)
    logger.info(
        "panel %s: %d features mapped onto %d model inputs (R^2 %.2f on average, %.2f for the first)",
        panel_id, len(panel), len(panel_map.r2), float(panel_map.r2.mean()), float(panel_map.r2[0]),
    )
    return panel_map
