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
    arrays_record,
    config_number,
    feature_space_from_config,
    feature_space_to_config,
    record_arrays,
)
from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.algorithms.mixture import MixtureParams, MixtureStats, site_mixture_stats
from fedspatial.shared.algorithms.panels import PanelMap, panel_moments
from fedspatial.shared.algorithms.pca import (
    PCABasis,
    site_column_sums,
    site_power_product,
    site_rayleigh,
)
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.sections import (
    SiteSection,
    load_site_sections,
    prepare_graph_data,
    section_features,
)
from fedspatial.shared.evaluation import metrics
from fedspatial.shared.features.selection import (
    FeatureSpace,
    FeatureStats,
    compute_feature_stats,
    feature_names,
)
from fedspatial.shared.graph.neighbors import bound_in_degree
from fedspatial.shared.models import build_model
from fedspatial.shared.plots import plot_section_domains
from fedspatial.shared.privacy.dp import (
    LEDGER_FILE,
    NodeBound,
    PrivacyLedger,
    Release,
    calibrate_noise,
    dp_train_epochs,
    noisy_feature_stats,
    plan_round,
)
from fedspatial.shared.storage.atomic import write_atomic
from fedspatial.shared.training.loop import (
    GraphData,
    TrainResult,
    embed,
    evaluate_loss,
    train_epochs,
)

logger = logging.getLogger(__name__)
EMBEDDING_KEY = "fedspatial-embedding"
SPACE_KEY = "fedspatial-feature-space"
LEDGER_KEY = "fedspatial-privacy-ledger"
PCA_KEY = "fedspatial-pca"
PANEL_KEY = "fedspatial-panel-"
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
    pca: PCABasis | None = None
    """Federated PCA basis the model inputs are projected on (``features.n-pcs``)."""
    mapped: tuple[tuple[str, str], ...] = ()
    """``(section key, panel id)`` of the federation's sections mapped from a small panel
    (:mod:`fedspatial.shared.algorithms.panels`)."""
    maps: tuple[tuple[str, FeatureSpace, PanelMap], ...] = ()
    """``(panel id, panel feature space, map to the model inputs)`` received so far."""

    @property
    def key(self) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
        return self.space.fingerprint(), self.batches, self.mapped

    @property
    def model_key(self) -> tuple[Any, ...]:
        pca = "" if self.pca is None else f"{zlib.crc32(self.pca.components.tobytes()):08x}"
        maps = tuple((pid, f"{zlib.crc32(m.coef.tobytes()):08x}") for pid, _, m in self.maps)
        return self.space.fingerprint(), self.batches, self.mapped, pca, maps

    @property
    def panel_of(self) -> dict[str, str]:
        return dict(self.mapped)


def store_setup(context: Context, config: ConfigRecord) -> None:
    """Keep what ``query.setup`` sent in the node's state for the rest of the run."""
    space = feature_space_from_config(config)
    entries: dict[str, Any] = dict(feature_space_to_config(space))
    if config.get("batches"):  # ConfigRecord cannot hold an empty list
        entries["batches"] = list(config["batches"])  # type: ignore[arg-type]
    entries["mapped-sections"] = str(config.get("mapped-sections", "{}"))
    context.state[SPACE_KEY] = ConfigRecord(entries)


def setup_of(context: Context) -> SiteSetup:
    if SPACE_KEY not in context.state:
        raise RuntimeError("this site has no feature space yet: the server must send query.setup first")
    record = context.state.config_records[SPACE_KEY]
    batches = record.get("batches") or []
    pca = PCABasis.from_arrays(record_arrays(context.state.array_records[PCA_KEY])) if PCA_KEY in context.state else None
    mapped = json.loads(str(record.get("mapped-sections", "{}")))
    maps = tuple(
        (
            pid,
            feature_space_from_config(context.state.config_records[f"{PANEL_KEY}{pid}-space"]),
            PanelMap.from_arrays(record_arrays(context.state.array_records[f"{PANEL_KEY}{pid}-map"])),
        )
        for pid in sorted(set(mapped.values()))
        if f"{PANEL_KEY}{pid}-map" in context.state
    )
    return SiteSetup(
        feature_space_from_config(record), tuple(str(b) for b in batches), pca,  # type: ignore[union-attr]
        mapped=tuple(sorted(mapped.items())), maps=maps,
    )


def store_pca(context: Context, basis: PCABasis) -> None:
    """Keep the federation's PCA basis in the node's state for the rest of the run."""
    context.state[PCA_KEY] = arrays_record(basis.to_arrays())


def store_panel_map(context: Context, panel_id: str, space: FeatureSpace, panel_map: PanelMap) -> None:
    """Keep a small panel's standardization and its map to the model inputs for the run."""
    context.state[f"{PANEL_KEY}{panel_id}-space"] = ConfigRecord(feature_space_to_config(space))  # type: ignore[arg-type]
    context.state[f"{PANEL_KEY}{panel_id}-map"] = arrays_record(panel_map.to_arrays())


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
        self._graph: dict[tuple[Any, ...], GraphData] = {}
        self._model_graph: dict[tuple[Any, ...], GraphData] = {}
        self._dp_graph: dict[tuple[Any, ...], GraphData] = {}

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
                # JSON: the server may map a section with a small panel instead of intersecting
                "section-features": json.dumps({s.key: n for s, n in zip(self.sections, names, strict=True)}),
                "labels": sorted(labels),
            },
        )

    def feature_stats(
        self,
        features: list[str],
        *,
        target_sum: float,
        context: Context | None = None,
        sections: list[str] | None = None,
    ) -> FeatureStats:
        """Per-feature aggregates (over the named sections only, when given); released
        through the Gaussian mechanism (and charged to the site's ledger) when
        ``privacy.feature-stats-noise`` > 0."""
        chosen = [s for s in self.sections if sections is None or s.key in set(sections)]
        stats = compute_feature_stats(
            [s.adata for s in chosen], features, target_sum=target_sum, feature_key=self.feature_key
        )
        sigma = self.cfg.privacy.feature_stats_noise
        if sigma <= 0:
            return stats
        if context is None:
            raise ValueError("noisy feature statistics need the node context (for the privacy ledger)")
        ledger = self.ledger(context)
        equivalent = sigma / np.sqrt(6.0)  # six blocks, see noisy_feature_stats
        try:
            ledger.check("feature-stats", 0, equivalent, 1.0, 1)
        finally:
            self.save_ledger(context, ledger)
        n, arrays, equivalent = noisy_feature_stats(
            stats.n_cells, stats.to_arrays(), target_sum=target_sum, noise_multiplier=sigma
        )
        ledger.record(Release("feature-stats", 0, equivalent, 1.0, 1, details={"noise-multiplier": sigma}))
        self.save_ledger(context, ledger)
        return FeatureStats.from_arrays(stats.features, n, arrays)

    # -- privacy ledger -------------------------------------------------------------------
    @property
    def degree_bound(self) -> int:
        return self.cfg.privacy.max_degree or self.cfg.neighbors.n_neighbors

    @property
    def budget(self) -> float:
        """The stricter of the run's budget and the site's own (node config)."""
        p = self.cfg.privacy
        run_budget = p.budget_epsilon or p.target_epsilon
        return min(run_budget, self.node.privacy_budget or run_budget)

    def ledger(self, context: Context) -> PrivacyLedger:
        """The site's ledger: from the node's state, else from the ledger file of this run
        (a restarted SuperNode or a resumed run), else a new one."""
        p = self.cfg.privacy
        if LEDGER_KEY in context.state:
            ledger = PrivacyLedger.from_json(str(context.state.config_records[LEDGER_KEY]["ledger"]))
        elif (self.node.output_dir / LEDGER_FILE).is_file():
            raw = json.loads((self.node.output_dir / LEDGER_FILE).read_text())
            ledger = PrivacyLedger(
                site=self.node.name, delta=p.delta, budget_epsilon=self.budget,
                releases=[Release(**r) for r in raw["releases"]], refusals=list(raw.get("refusals", [])),
                node_noise_multiplier=float(raw.get("node-noise-multiplier") or 0.0),
            )
            logger.info("%s: privacy ledger restored from %s (epsilon %.3f)", self.node.name, self.node.output_dir, ledger.epsilon)
        else:
            ledger = PrivacyLedger(site=self.node.name, delta=p.delta, budget_epsilon=self.budget)
        ledger.budget_epsilon = self.budget
        ledger.target_epsilon = p.target_epsilon
        ledger.max_grad_norm = p.max_grad_norm
        ledger.degree_bound = self.degree_bound
        return ledger

    def save_ledger(self, context: Context, ledger: PrivacyLedger) -> None:
        """Keep the ledger in the node's state and write it (atomically) to the site's results."""
        context.state[LEDGER_KEY] = ConfigRecord({"ledger": ledger.to_json()})
        ledger.write(self.node.output_dir)

    def batch_name(self, section: SiteSection) -> str:
        """The batch a section belongs to for a batch-aware decoder."""
        return section.site if self.cfg.model.batch == "site" else section.key

    def reference_sections(self, setup: SiteSetup) -> list[SiteSection]:
        """This site's sections whose features define the federation's space (all of
        them unless some hold a small panel mapped onto it)."""
        return [s for s in self.sections if s.key not in setup.panel_of]

    def has_mapped_sections(self, setup: SiteSetup) -> bool:
        return any(s.key in setup.panel_of for s in self.sections)

    def ready(self, setup: SiteSetup) -> bool:
        """Whether every section can be turned into model inputs yet (a mapped section
        needs its panel map first)."""
        have = {pid for pid, _, _ in setup.maps}
        return all(setup.panel_of[s.key] in have for s in self.sections if s.key in setup.panel_of)

    def prepare(self, setup: SiteSetup) -> int:
        """Build (and cache) what later rounds reuse; returns the site's number of cells."""
        if self.ready(setup):
            return self.graph_data(setup).n_cells
        if self.reference_sections(setup):
            self.feature_graph_data(setup)
        return self.n_cells

    def graph_data(self, setup: SiteSetup) -> GraphData:
        """The model's inputs: standardized features, projected on the federation's PCA
        basis when there is one; a section with a small panel is mapped from its own
        features (:mod:`fedspatial.shared.algorithms.panels`)."""
        if self.has_mapped_sections(setup):
            return self._mapped_graph_data(setup)
        if setup.pca is None:
            return self.feature_graph_data(setup)
        if setup.model_key not in self._model_graph:
            base = self.feature_graph_data(setup)
            x = torch.from_numpy(setup.pca.transform(base.x.numpy()))
            self._model_graph = {setup.model_key: GraphData(x, base.neighbors, base.sections, base.batch)}
        return self._model_graph[setup.model_key]

    def _mapped_graph_data(self, setup: SiteSetup) -> GraphData:
        if not self.ready(setup):
            raise RuntimeError(f"{self.node.name}: a section's panel map has not arrived yet (the server sends query.panel)")
        if setup.model_key not in self._model_graph:
            maps = {pid: (space, m) for pid, space, m in setup.maps}
            scale = self.cfg.features.scale
            # the reference sections' inputs exist already (PCA and panel sums used them)
            reference: dict[str, np.ndarray] = {}
            if self.reference_sections(setup):
                x = self.reference_inputs(setup)
                reference = {key: x[a:b] for key, a, b in self.feature_graph_data(setup).sections}

            def inputs(section: SiteSection) -> np.ndarray:
                if section.key in setup.panel_of:
                    space, panel_map = maps[setup.panel_of[section.key]]
                    return panel_map.transform(section_features(section, space, scale=scale))
                return reference[section.key]

            self._model_graph = {setup.model_key: self._prepare(self.sections, setup, inputs=inputs)}
        return self._model_graph[setup.model_key]

    def reference_inputs(self, setup: SiteSetup) -> np.ndarray:
        """Model inputs of the reference sections only (what a panel map is fitted to)."""
        x = self.feature_graph_data(setup).x.numpy()
        return x if setup.pca is None else setup.pca.transform(x)

    def panel_reply(self, setup: SiteSetup, space: FeatureSpace) -> dict[str, np.ndarray]:
        """Regression sums between a panel's features and the model inputs over this
        site's reference cells (:func:`~fedspatial.shared.algorithms.panels.panel_moments`)."""
        scale = self.cfg.features.scale
        panel = np.concatenate([section_features(s, space, scale=scale) for s in self.reference_sections(setup)])
        return panel_moments(panel, self.reference_inputs(setup))

    # -- federated PCA (sums and D x r products of the standardized features) ------------
    def pca_reply(self, setup: SiteSetup, stage: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self.feature_graph_data(setup).x.numpy()
        if stage == "sums":
            sums, count = site_column_sums(x)
            return {"sums": sums, "count": np.array([count]), "sumsq": np.array([float(np.square(x, dtype=np.float64).sum())])}
        if stage == "power":
            return {"product": site_power_product(x, arrays["mean"], arrays["basis"])}
        if stage == "rayleigh":
            return {"rayleigh": site_rayleigh(x, arrays["mean"], arrays["basis"])}
        raise ValueError(f"unknown PCA stage {stage!r}")

    def feature_graph_data(self, setup: SiteSetup) -> GraphData:
        """Standardized selected features and neighbourhoods of the reference sections
        (every section unless some are mapped from a small panel; cached)."""
        key = setup.key
        if key not in self._graph:
            sections = self.reference_sections(setup)
            if not sections:
                raise RuntimeError(f"{self.node.name}: every section of this site is mapped from a small panel")
            self._graph = {key: self._prepare(sections, setup)}
        return self._graph[key]

    def _prepare(self, sections: list[SiteSection], setup: SiteSetup, inputs: Any = None) -> GraphData:
        batch_of = None
        if setup.batches:
            codes = {b: i for i, b in enumerate(setup.batches)}
            batch_of = {s.key: codes[self.batch_name(s)] for s in sections}
        g = self.cfg.neighbors
        return prepare_graph_data(
            sections,
            setup.space,
            spatial_key=self.cfg.data.spatial_key,
            graph=g.graph,
            n_neighbors=g.n_neighbors,
            radius=g.radius,
            scale=self.cfg.features.scale,
            batch_of=batch_of,
            inputs=inputs,
        )

    def dp_graph_data(self, setup: SiteSetup) -> GraphData:
        """The training graph for DP-SGD: every cell in at most ``degree_bound`` lists."""
        key = setup.model_key
        if key not in self._dp_graph:
            data = self.graph_data(setup)
            bounded = torch.from_numpy(bound_in_degree(data.neighbors.numpy(), self.degree_bound))
            self._dp_graph = {key: GraphData(data.x, bounded, data.sections, data.batch)}
        return self._dp_graph[key]

    def train(
        self,
        model: torch.nn.Module,
        setup: SiteSetup,
        *,
        seed: int,
        context: Context | None = None,
        server_round: int = 0,
    ) -> TrainResult:
        """One round of local training; DP-SGD (charged to the site's ledger, refused with
        :class:`~fedspatial.shared.privacy.dp.PrivacyBudgetExceeded` past the budget) when
        ``privacy.local-dp`` is on."""
        if self.cfg.privacy.local_dp:
            if context is None:
                raise ValueError("local DP needs the node context (the privacy ledger lives there)")
            return self.dp_train(model, setup, context=context, server_round=server_round)
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

    def dp_train(
        self, model: torch.nn.Module, setup: SiteSetup, *, context: Context, server_round: int
    ) -> TrainResult:
        p, t = self.cfg.privacy, self.cfg.training
        data = self.dp_graph_data(setup)
        ledger = self.ledger(context)
        bound = NodeBound(self.degree_bound)
        plan = plan_round(
            data.n_cells, batch_size=t.batch_size, epochs=t.local_epochs, max_grad_norm=p.max_grad_norm,
            bound=bound, node_noise_multiplier=ledger.node_noise_multiplier or p.noise_multiplier,
        )
        if plan.node_noise_multiplier <= 0:  # calibrate once, for the whole run
            sigma = calibrate_noise(
                target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=plan.node_sample_rate,
                steps=plan.steps * t.num_rounds, prior=ledger.history,
            )
            plan = plan_round(
                data.n_cells, batch_size=t.batch_size, epochs=t.local_epochs, max_grad_norm=p.max_grad_norm,
                bound=bound, node_noise_multiplier=sigma,
            )
            logger.info("%s: node-level noise multiplier %.3f for epsilon %g over %d rounds", self.node.name, sigma, p.target_epsilon, t.num_rounds)
        ledger.node_noise_multiplier = plan.node_noise_multiplier
        try:
            ledger.check("dp-sgd", server_round, plan.node_noise_multiplier, plan.node_sample_rate, plan.steps)
        finally:
            self.save_ledger(context, ledger)
        result = dp_train_epochs(
            model, data, plan, lr=t.lr, weight_decay=t.weight_decay, grad_sample_mode=p.grad_sample_mode
        )
        ledger.record(
            Release(
                "dp-sgd", server_round, plan.node_noise_multiplier, plan.node_sample_rate, plan.steps,
                details={"sample-rate": plan.sample_rate, "noise-multiplier": plan.noise_multiplier, "max-grad-norm": p.max_grad_norm},
            )
        )
        self.save_ledger(context, ledger)
        logger.info("%s: round %d DP-SGD, epsilon %.3f of %g", self.node.name, server_round, ledger.epsilon, ledger.budget_epsilon)
        return result

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

    def mixture_stats(self, arrays: dict[str, np.ndarray], covariance_type: str, context: Context) -> MixtureStats:
        """E-step sums for the server's mixture, or (given ``centroids``) the hard k-means
        assignment that starts EM."""
        z = self._embedding(context)
        if "centroids" in arrays:
            labels, _ = clustering.assign_clusters(z, arrays["centroids"])
            return site_mixture_stats(
                z, labels=labels, n_components=len(arrays["centroids"]), covariance_type=covariance_type
            )
        return site_mixture_stats(z, MixtureParams.from_arrays(arrays, covariance_type))

    def finalize(
        self,
        centroids: np.ndarray,
        cfg: ConfigRecord,
        setup: SiteSetup,
        context: Context,
        mixture_arrays: dict[str, np.ndarray] | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Domains, confidence, outputs written at the site; returns (report JSON, arrays)."""
        from fedspatial.client.harmony_state import uncorrected_embedding  # local: circular import

        z = self._embedding(context)
        before = uncorrected_embedding(context)  # set when federated Harmony corrected z
        data = self.graph_data(setup)
        mixture = str(cfg.get("mixture", "none"))
        if mixture != "none":  # centroids are then the mixture's means, sent with its other parameters
            params = MixtureParams.from_arrays(dict(mixture_arrays or {}), mixture)
            posterior = params.predict_proba(z)
            labels = posterior.argmax(axis=1)
        else:
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
            if before is not None:
                annotated.obsm["X_fedspatial_uncorrected"] = before[start:stop]
            annotated.obs["fedspatial_domain"] = _domain_categorical(dom, len(centroids))
            annotated.obs["fedspatial_confidence"] = conf.astype(np.float32)
            annotated.uns["fedspatial"] = {"run": run_name, "n_domains": len(centroids), "refine": refine}
            path = out_dir / f"{section.site}__{section.name}.h5ad"
            write_atomic(path, lambda tmp, a=annotated: a.write_h5ad(tmp))
            entry: dict[str, Any] = {
                "site": section.site, "n_cells": int(stop - start), "output": str(path), "peak_rss_mb": _peak_rss_mb(),
            }
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


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (what a site's IT staff must provision;
    the process that served the site, so with other sites in the same process an upper bound)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak / 2**20 if sys.platform == "darwin" else peak / 1024)  # bytes on macOS, KiB on Linux


def _domain_categorical(dom: np.ndarray, k: int) -> Any:
    import pandas as pd

    return pd.Categorical(dom.astype(str), categories=[str(i) for i in range(k)])
