"""A site as the ClientApp serves it: its private data, the caches built from it, its
privacy ledger, and its per-run state (a :class:`~fedspatial.shared.phases.base.Site`).

Loading, harmonizing and graphing a site is cached per process (keyed by the data
paths and the run's settings), because Flower may route every message to a
fresh call. What must survive between messages of one run (the feature space, the
embedding, Harmony's state, the ledger) lives in the node's ``context.state``, which
Flower keeps at the site: :class:`ContextState`. Answering the federation's queries is
the phases' job (:mod:`fedspatial.shared.phases`).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedspatial.client.data_source import NodeData, resolve_node_data
from fedspatial.records import arrays_record, record_arrays
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.data.sections import (
    SiteSection,
    load_site_sections,
    prepare_graph_data,
    section_features,
)
from fedspatial.shared.graph.degree_bound import check_dp_coordinates, dp_degree_bound
from fedspatial.shared.phases.base import SiteState
from fedspatial.shared.phases.feature_space import section_centres
from fedspatial.shared.phases.setup import SiteSetup, setup_of
from fedspatial.shared.privacy.dp import LEDGER_FILE, PrivacyLedger, Release
from fedspatial.shared.protocol.names import RUN_CONFIG
from fedspatial.shared.protocol.payload import ConfigValue, Payload
from fedspatial.shared.training.loop import GraphData

logger = logging.getLogger(__name__)
LEDGER_KEY = "fedspatial-privacy-ledger"
_CACHE: OrderedDict[tuple[Any, ...], SiteRuntime] = OrderedDict()
# A process keeps the sites it served (least recently used dropped first) while they hold at
# most _CACHE_CELLS cells together: in simulation one Ray actor serves many sites, and a site
# rebuilt for every message (data, graph, inputs) made a 100-site run crawl; a deployed
# SuperNode serves one site. The newest site always stays, however large.
_CACHE_SIZE = 512
_CACHE_CELLS = 2_000_000


class ContextState:
    """A :class:`~fedspatial.shared.phases.base.SiteState` in Flower's ``context.state``:
    a payload under ``key`` is kept as the records ``<key>`` (arrays) and ``<key>.config``."""

    def __init__(self, state: RecordDict) -> None:
        self.records = state

    def get(self, key: str) -> Payload | None:
        arrays = self.records.array_records.get(key)
        config = self.records.config_records.get(f"{key}.config")
        if arrays is None and config is None:
            return None
        values: dict[str, ConfigValue] = dict(config) if config is not None else {}  # type: ignore[arg-type]
        return Payload(record_arrays(arrays) if arrays is not None else {}, values)

    def put(self, key: str, value: Payload) -> None:
        self.delete(key)
        if value.arrays:
            self.records[key] = arrays_record(value.arrays)
        config = {k: v for k, v in value.config.items() if not (isinstance(v, list) and not v)}
        if config:  # a ConfigRecord holds no empty list: readers take a missing list as empty
            self.records[f"{key}.config"] = ConfigRecord(config)  # type: ignore[arg-type]

    def delete(self, key: str) -> None:
        for name in (key, f"{key}.config"):
            if name in self.records:
                del self.records[name]


def site_for(run_config: dict[str, Any], context: Context) -> SiteRuntime:
    """The (cached) runtime of the site this SuperNode serves, bound to ``context``'s state.

    The run's settings come with every message (``config["run-config"]``, JSON) so that
    the server's config is the only source of truth; the data location comes from the
    node (node config, or the simulation manifest).
    """
    cfg = ExperimentConfig.from_run_config(run_config)
    node = resolve_node_data(dict(context.node_config), run_config, cfg.run_name)
    # Every setting may shape the data, graph or ledger: one runtime per node and run config.
    key = (node, json.dumps(run_config, sort_keys=True, default=str))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        runtime = _CACHE[key]
    else:
        runtime = SiteRuntime(node, cfg)
        _CACHE[key] = runtime
        _evict()
    runtime.state = ContextState(context.state)
    runtime.seed_name = str(context.node_config.get("site-name", context.node_config.get("partition-id", 0)))
    return runtime


def _evict() -> None:
    """Drop the least recently used sites beyond :data:`_CACHE_SIZE` entries or
    :data:`_CACHE_CELLS` loaded cells (the newest entry is never dropped)."""
    def loaded_cells() -> int:
        return sum(r.n_cells for r in _CACHE.values() if r.loaded)

    while len(_CACHE) > 1 and (len(_CACHE) > _CACHE_SIZE or loaded_cells() > _CACHE_CELLS):
        _CACHE.popitem(last=False)


def run_config_of(config: ConfigRecord | dict[str, Any] | None, context: Context) -> dict[str, Any]:
    """The run's settings a message carries, else the node's run config."""
    if config is not None and RUN_CONFIG in config:
        return dict(json.loads(str(config[RUN_CONFIG])))
    return dict(context.run_config)


class SiteRuntime:
    """One site's data, the caches built from it and its privacy ledger."""

    def __init__(self, node: NodeData, cfg: ExperimentConfig) -> None:
        self.node = node
        self.cfg = cfg
        self.state: SiteState = ContextState(RecordDict())
        self.seed_name = node.name
        self._graph: dict[tuple[Any, ...], GraphData] = {}
        self._model_graph: dict[tuple[Any, ...], GraphData] = {}

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def output_dir(self) -> Path:
        return self.node.output_dir

    @property
    def private_roots(self) -> list[Path]:
        """The site's folders, whose paths never leave it: output first, then each data
        folder (a data file's own folder)."""
        data = [Path(s.data_path).expanduser() for s in self.node.sources]
        return [self.output_dir, *(p if p.is_dir() else p.parent for p in data)]

    @cached_property
    def sections(self) -> list[SiteSection]:
        return load_site_sections(self.node.sources, spatial_key=self.cfg.data.spatial_key)

    @property
    def loaded(self) -> bool:
        """Whether the sections have been read (``sections`` is cached once read)."""
        return "sections" in self.__dict__

    @property
    def n_cells(self) -> int:
        return sum(s.adata.n_obs for s in self.sections)

    @property
    def feature_key(self) -> str | None:
        return self.cfg.data.feature_key or None

    def setup(self) -> SiteSetup:
        return setup_of(self.state)

    def round_seed(self, seed: int, server_round: int) -> int:
        return (seed * 1_000_003 + server_round * 7919 + zlib.crc32(self.seed_name.encode())) % 2**31

    # -- privacy ledger -------------------------------------------------------------------
    @property
    def degree_bound(self) -> int:
        """D: how many other cells' DP-SGD samples one cell can change. 0 when a sample is one
        cell (the per-cell encoder, or no local DP); with the graph encoder, the proven bound on
        the plain per-section graph (:func:`dp_degree_bound`: 6 x n-neighbors), or
        privacy.max-degree when that is larger (privacy_checks refuses a smaller one)."""
        m = self.cfg.model
        cell = m.encoder == "cell" or (m.encoder == "auto" and self.cfg.privacy.local_dp)
        if cell or not self.cfg.privacy.local_dp:
            return 0
        g = self.cfg.neighbors
        return max(self.cfg.privacy.max_degree, dp_degree_bound(g.n_neighbors, g.graph))

    @property
    def budget(self) -> float:
        """The strictest of the run's budget, the site's own (node config) and its site
        policy's ``max-epsilon``."""
        p = self.cfg.privacy
        run_budget = p.budget_epsilon or p.target_epsilon
        cap = self.node.policy.max_epsilon if self.node.policy is not None else None
        return min(run_budget, self.node.privacy_budget or run_budget, cap or run_budget)

    def ledger(self) -> PrivacyLedger:
        """The site's ledger: from the run's state, else from the ledger file of this run
        (a restarted SuperNode or a resumed run), else a new one."""
        p = self.cfg.privacy
        stored = self.state.get(LEDGER_KEY)
        if stored is not None:
            ledger = PrivacyLedger.from_json(stored.string("ledger"))
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

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        """Keep the ledger in the run's state and write it (atomically) to the site's results."""
        self.state.put(LEDGER_KEY, Payload(config={"ledger": ledger.to_json()}))
        ledger.write(self.node.output_dir)

    # -- model inputs ---------------------------------------------------------------------
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
        if self.degree_bound:  # local DP with the graph encoder: refuse bad sections before any release
            self.check_dp_sections()
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
            self._model_graph = {setup.model_key: GraphData(x, base.neighbors, base.sections, base.batch, base.coords)}
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
        centres = None
        if inputs is None and self.cfg.privacy.local_dp and self.cfg.features.scale == "section":
            # each section centred by its released mean, not its cells' (one cell must not move the others' inputs)
            centres = section_centres(self, setup, sections)
        g = self.cfg.neighbors
        return prepare_graph_data(
            sections, setup.space, spatial_key=self.cfg.data.spatial_key, graph=g.graph, n_neighbors=g.n_neighbors,
            radius=g.radius, scale=self.cfg.features.scale, batch_of=batch_of, inputs=inputs, centres=centres,
        )

    def check_dp_sections(self) -> None:
        """Refuse (ValueError naming the section) a section whose coordinates void the degree
        bound: coincident or near-coincident cells, checked on the columns the graph is built
        on (``obsm[spatial_key][:, :2]``, as prepare_graph_data)."""
        spatial_key = self.cfg.data.spatial_key
        for section in self.sections:
            coords = np.asarray(section.adata.obsm[spatial_key], dtype=np.float64)[:, :2]
            check_dp_coordinates(coords, section.key)

    def dp_graph_data(self, setup: SiteSetup) -> GraphData:
        """The training graph for DP-SGD with the graph encoder: the plain per-section graph,
        unpruned. Removing one cell changes its own sample and those of the at most
        ``degree_bound`` cells that list it (:mod:`fedspatial.shared.graph.degree_bound`)."""
        self.check_dp_sections()
        return self.graph_data(setup)
