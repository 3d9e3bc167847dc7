"""Site-side work behind the ClientApp handlers, on the site's private data.

Loading, harmonizing and graphing a site is cached per process (keyed by the data
paths and the feature space), because Flower may route every round to a fresh call.
What must survive between messages of one run (the embedding) lives in the node's
``context.state``, which Flower keeps at the site.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedspatial.client.data_source import NodeData, resolve_node_data
from fedspatial.client.payload import (
    config_number,
    feature_space_from_config,
    feature_space_to_config,
)
from fedspatial.shared import clustering, metrics
from fedspatial.shared.atomic import write_atomic
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.features import (
    FeatureSpace,
    FeatureStats,
    compute_feature_stats,
    feature_names,
)
from fedspatial.shared.models import build_model
from fedspatial.shared.plots import plot_section_domains
from fedspatial.shared.site import SiteSection, load_site_sections, prepare_graph_data
from fedspatial.shared.training import GraphData, TrainResult, embed, evaluate_loss, train_epochs

logger = logging.getLogger(__name__)
EMBEDDING_KEY = "fedspatial-embedding"
SPACE_KEY = "fedspatial-feature-space"
_CACHE: OrderedDict[tuple[Any, ...], SiteRuntime] = OrderedDict()
_CACHE_SIZE = 4


@dataclass
class SiteInfo:
    n_cells: int
    config: dict[str, Any]


def site_for(msg: Message, context: Context) -> SiteRuntime:
    """The (cached) runtime of the site this SuperNode serves.

    The run's settings come with every message (``config["run-config"]``, JSON) so that
    the server's config is the only source of truth; the data location comes from the
    node (node config, or the simulation manifest).
    """
    config: ConfigRecord | dict[str, object] = msg.content.get("config", {})  # type: ignore[assignment]
    run_config = json.loads(str(config["run-config"])) if "run-config" in config else dict(context.run_config)
    cfg = ExperimentConfig.from_run_config(run_config)
    node = resolve_node_data(dict(context.node_config), run_config, cfg.run_name)
    key = (node, cfg.data.spatial_key, cfg.data.label_key, cfg.data.feature_key)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    runtime = SiteRuntime(node, cfg)
    _CACHE[key] = runtime
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return runtime


def model_from_message(msg: Message) -> torch.nn.Module:
    cfg = msg.content["config"]
    model = build_model(json.loads(str(cfg["model-config"])))
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


@dataclass(frozen=True)
class SiteSetup:
    """What ``query.setup`` fixes for the whole run: the feature space and, for a
    batch-aware decoder, the federation-wide batch names (sections or sites)."""

    space: FeatureSpace
    batches: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return self.space.fingerprint(), self.batches


def store_setup(context: Context, config: ConfigRecord) -> None:
    """Keep what ``query.setup`` sent in the node's state for the rest of the run."""
    space = feature_space_from_config(config)
    entries: dict[str, Any] = dict(feature_space_to_config(space))
    if config.get("batches"):  # ConfigRecord cannot hold an empty list
        entries["batches"] = list(config["batches"])  # type: ignore[arg-type]
    context.state[SPACE_KEY] = ConfigRecord(entries)


def setup_of(context: Context) -> SiteSetup:
    if SPACE_KEY not in context.state:
        raise RuntimeError("this site has no feature space yet: the server must send query.setup first")
    record = context.state.config_records[SPACE_KEY]
    batches = record.get("batches") or []
    return SiteSetup(feature_space_from_config(record), tuple(str(b) for b in batches))  # type: ignore[union-attr]


def round_seed(context: Context, cfg: ConfigRecord) -> int:
    """Seed for this site and round: reproducible, different across sites and rounds."""
    node = str(context.node_config.get("site-name", context.node_config.get("partition-id", 0)))
    seed = int(config_number(cfg, "seed", 0))
    server_round = int(config_number(cfg, "server-round", 0))
    return (seed * 1_000_003 + server_round * 7919 + zlib.crc32(node.encode())) % 2**31


class SiteRuntime:
    """One site's data and the operations the federation may ask of it."""

    def __init__(self, node: NodeData, cfg: ExperimentConfig) -> None:
        self.node = node
        self.cfg = cfg
        self._graph: dict[tuple[str, tuple[str, ...]], GraphData] = {}

    @cached_property
    def sections(self) -> list[SiteSection]:
        return load_site_sections(self.node.sources, spatial_key=self.cfg.data.spatial_key)

    @property
    def n_cells(self) -> int:
        return sum(s.adata.n_obs for s in self.sections)

    @property
    def feature_key(self) -> str | None:
        return self.cfg.data.feature_key or None

    def describe(self) -> SiteInfo:
        names = [feature_names(s.adata, self.feature_key) for s in self.sections]
        shared = [f for f in names[0] if all(f in set(n) for n in names[1:])] if names else []
        labels: set[str] = set()
        label_key = self.cfg.data.label_key
        for s in self.sections:
            if label_key in s.adata.obs:
                labels |= {str(v) for v in s.adata.obs[label_key].dropna().unique()}
        return SiteInfo(
            n_cells=self.n_cells,
            config={
                "site": self.node.name,
                "sections": [s.key for s in self.sections],
                "section-sites": [s.site for s in self.sections],
                "section-sizes": [int(s.adata.n_obs) for s in self.sections],
                "features": shared,
                "labels": sorted(labels),
            },
        )

    def feature_stats(self, features: list[str], *, target_sum: float) -> FeatureStats:
        return compute_feature_stats(
            [s.adata for s in self.sections], features, target_sum=target_sum, feature_key=self.feature_key
        )

    def batch_name(self, section: SiteSection) -> str:
        """The batch a section belongs to for a batch-aware decoder."""
        return section.site if self.cfg.model.batch == "site" else section.key

    def graph_data(self, setup: SiteSetup) -> GraphData:
        key = setup.key
        if key not in self._graph:
            batch_of = None
            if setup.batches:
                codes = {b: i for i, b in enumerate(setup.batches)}
                batch_of = {s.key: codes[self.batch_name(s)] for s in self.sections}
            g = self.cfg.neighbors
            self._graph = {
                key: prepare_graph_data(
                    self.sections,
                    setup.space,
                    spatial_key=self.cfg.data.spatial_key,
                    graph=g.graph,
                    n_neighbors=g.n_neighbors,
                    radius=g.radius,
                    scale=self.cfg.features.scale,
                    batch_of=batch_of,
                )
            }
        return self._graph[key]

    def train(self, model: torch.nn.Module, setup: SiteSetup, *, seed: int) -> TrainResult:
        data = self.graph_data(setup)
        t = self.cfg.training
        return train_epochs(
            model,
            data,
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            weight_decay=t.weight_decay,
            proximal_mu=t.proximal_mu,
            seed=seed,
            description=f"{self.node.name} train",
        )

    def evaluate(self, model: torch.nn.Module, setup: SiteSetup) -> float:
        return evaluate_loss(model, self.graph_data(setup))

    # -- clustering ---------------------------------------------------------------------
    def embed_and_propose(
        self, model: torch.nn.Module, setup: SiteSetup, n_domains: int, context: Context
    ) -> dict[str, np.ndarray]:
        z = embed(model, self.graph_data(setup))
        context.state[EMBEDDING_KEY] = ArrayRecord({"z": Array(z)})
        centroids, counts = clustering.local_kmeans(z, n_domains, seed=self.cfg.seed)
        moments = clustering.feature_moments(z).to_arrays()
        return {
            "centroids": centroids,
            "counts": counts.astype(np.float64),
            **{f"moments-{k}": v for k, v in moments.items()},
        }

    def _embedding(self, context: Context) -> np.ndarray:
        if EMBEDDING_KEY not in context.state:
            raise RuntimeError("no embedding at this site: the server must send query.embed first")
        return context.state[EMBEDDING_KEY]["z"].numpy()  # type: ignore[union-attr]

    def cluster_stats(
        self, centroids: np.ndarray, previous: np.ndarray | None, context: Context
    ) -> clustering.ClusterStats:
        return clustering.cluster_stats(self._embedding(context), centroids, previous_centroids=previous)

    def finalize(
        self, centroids: np.ndarray, cfg: ConfigRecord, setup: SiteSetup, context: Context
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Domains, confidence, outputs written at the site; returns (report JSON, arrays)."""
        z = self._embedding(context)
        data = self.graph_data(setup)
        labels, _ = clustering.assign_clusters(z, centroids)
        posterior = clustering.isotropic_posterior(z, centroids, config_number(cfg, "variance"))
        neighbors = data.neighbors.numpy()
        refine = bool(cfg.get("refine", True))
        run_name = str(cfg.get("run-name", self.cfg.run_name))
        label_key = self.cfg.data.label_key
        out_dir = self.node.output_dir
        report: dict[str, Any] = {"site": self.node.name, "sections": {}, "contingency": {}, "outputs": []}
        per_site: dict[str, list[metrics.Contingency]] = {}
        for section, (key, start, stop) in zip(self.sections, data.sections, strict=True):
            dom = labels[start:stop]
            if refine:
                local = neighbors[start:stop]
                local = np.where(local >= 0, local - start, -1)
                dom = clustering.refine_labels(dom, local)
            conf = posterior[start:stop][np.arange(stop - start), dom]
            annotated = section.adata.copy()
            annotated.obsm["X_fedspatial"] = z[start:stop]
            annotated.obs["fedspatial_domain"] = _domain_categorical(dom, len(centroids))
            annotated.obs["fedspatial_confidence"] = conf.astype(np.float32)
            annotated.uns["fedspatial"] = {"run": run_name, "n_domains": len(centroids), "refine": refine}
            path = out_dir / f"{section.site}__{section.name}.h5ad"
            write_atomic(path, lambda tmp, a=annotated: a.write_h5ad(tmp))
            entry: dict[str, Any] = {"site": section.site, "n_cells": int(stop - start), "output": str(path)}
            truth = section.adata.obs.get(label_key)
            if truth is not None:
                entry.update(metrics.section_scores(truth.to_numpy(), dom))
                per_site.setdefault(section.site, []).append(metrics.contingency(truth.to_numpy(), dom))
            png = out_dir / f"{section.site}__{section.name}_domains.png"
            plot_section_domains(
                np.asarray(section.adata.obsm[self.cfg.data.spatial_key])[:, :2],
                dom,
                truth.to_numpy() if truth is not None else None,
                title=section.key,
                path=png,
            )
            entry["plot"] = str(png)
            report["sections"][key] = entry
            report["outputs"] += [str(path), str(png)]
        for site, tables in per_site.items():
            merged = metrics.merge_contingency(tables)
            report["contingency"][site] = {
                "labels": merged.labels,
                "domains": [int(d) for d in merged.domains],
                "counts": merged.counts.tolist(),
            }
        logger.info("%s: wrote %d annotated sections to %s", self.node.name, len(self.sections), out_dir)
        return json.dumps(report), {"domain-counts": np.bincount(labels, minlength=len(centroids)).astype(np.int64)}


def _domain_categorical(dom: np.ndarray, k: int) -> Any:
    import pandas as pd

    return pd.Categorical(dom.astype(str), categories=[str(i) for i in range(k)])
