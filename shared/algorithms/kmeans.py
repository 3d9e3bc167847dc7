"""Federated k-means for spatial domains, and site-side helpers around it.

Cell embeddings never leave a site. Per iteration a site sends only per-cluster
sums and counts (plus its inertia and how many of its cells changed cluster), so
that the server can run Lloyd's algorithm on the pooled data without seeing it,
and domain id ``k`` means the same thing at every site.

The protocol mirrors scikit-learn's Lloyd k-means step for step (same stopping
rule, same iteration count), so that the in-memory reference
:func:`federated_kmeans` equals ``sklearn.cluster.KMeans(algorithm="lloyd",
n_init=1, init=...)`` fit on the pooled cells. One deliberate difference: an
empty cluster keeps its previous centroid, whereas scikit-learn relocates it to
a far-away point (which a server that never sees points cannot do).

Server loop (one Flower round per iteration)::

    km = FederatedKMeans(max_iter=100, tol=1e-4)
    km.init(init_centroids, feature_variance=pooled_feature_variance_from_sites(moments))
    while not km.done:
        # send km.centroids and km.previous_centroids to the sites; each returns
        # cluster_stats(X, centroids, previous_centroids=previous)
        km.step(merge_cluster_stats(site_stats))
    # sites then label their cells with assign_clusters(X, km.centroids)

Only numpy, scipy and scikit-learn are used (no Flower, no torch).

The code lives in modules by concern; this module re-exports their public names,
so ``from fedspatial.shared.algorithms.kmeans import ...`` keeps working:

* :mod:`~fedspatial.shared.algorithms.kmeans_stats`: nearest-centroid assignment,
  per-cluster statistics, their merge and the centroid update;
* :mod:`~fedspatial.shared.algorithms.kmeans_variance`: pooled per-feature variance
  from per-site moments (for ``tol``);
* :mod:`~fedspatial.shared.algorithms.kmeans_lloyd`: the stopping rule, the server
  state :class:`FederatedKMeans` and the in-memory reference :func:`federated_kmeans`;
* :mod:`~fedspatial.shared.algorithms.kmeans_init`: starts from the sites' local
  k-means proposals;
* :mod:`~fedspatial.shared.algorithms.kmeans_labels`: domain confidence and spatial
  smoothing of the labels.
"""

from __future__ import annotations

from fedspatial.shared.algorithms.kmeans_init import init_from_site_centroids, local_kmeans
from fedspatial.shared.algorithms.kmeans_labels import (
    isotropic_posterior,
    refine_labels,
    shared_variance,
)
from fedspatial.shared.algorithms.kmeans_lloyd import (
    FederatedKMeans,
    federated_kmeans,
    kmeans_converged,
    kmeans_tolerance,
)
from fedspatial.shared.algorithms.kmeans_stats import (
    ClusterStats,
    assign_clusters,
    cluster_stats,
    merge_cluster_stats,
    update_centroids,
)
from fedspatial.shared.algorithms.kmeans_variance import (
    FeatureMoments,
    feature_moments,
    merge_feature_moments,
    pooled_feature_variance_from_sites,
)

__all__ = [
    "ClusterStats",
    "FeatureMoments",
    "FederatedKMeans",
    "assign_clusters",
    "cluster_stats",
    "feature_moments",
    "federated_kmeans",
    "init_from_site_centroids",
    "isotropic_posterior",
    "kmeans_converged",
    "kmeans_tolerance",
    "local_kmeans",
    "merge_cluster_stats",
    "merge_feature_moments",
    "pooled_feature_variance_from_sites",
    "refine_labels",
    "shared_variance",
    "update_centroids",
]
