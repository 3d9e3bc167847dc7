"""What a phase is, and what each of its halves may use.

A federated algorithm is one :class:`Phase`: a server half (:meth:`Phase.run`: what to
ask the sites and how to combine their replies into the :class:`Run`) and a site half
(:meth:`Phase.answer`: how a site answers one of the phase's queries from its
private data). Both halves are Flower-free: the server half talks to the
sites through a :class:`Federation`, the site half sees its site through
:class:`Site`; ``fedspatial.server`` and ``fedspatial.client`` implement those two over
Flower. The phases of a run are listed, in order, in :mod:`fedspatial.shared.phases`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.protocol.payload import ConfigValue, Payload

if TYPE_CHECKING:
    from fedspatial.shared.algorithms.panels import PanelPlan
    from fedspatial.shared.data.sections import SiteSection
    from fedspatial.shared.features.selection import FeatureSpace
    from fedspatial.shared.phases.setup import SiteSetup
    from fedspatial.shared.privacy.dp import PrivacyLedger
    from fedspatial.shared.training.loop import GraphData

Weights = dict[str, np.ndarray]
"""A model's state as named numpy arrays (what travels; torch only at the ends)."""


class SiteState(Protocol):
    """Per-run memory of a site between messages (Flower keeps it in ``context.state``;
    nothing else survives from one message to the next in a deployment)."""

    def get(self, key: str) -> Payload | None: ...

    def put(self, key: str, value: Payload) -> None: ...

    def delete(self, key: str) -> None: ...


class MemoryState:
    """A :class:`SiteState` in a dict (tests, in-process use)."""

    def __init__(self) -> None:
        self.values: dict[str, Payload] = {}

    def get(self, key: str) -> Payload | None:
        return self.values.get(key)

    def put(self, key: str, value: Payload) -> None:
        self.values[key] = value

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


class Site(Protocol):
    """What a phase's site half may use of the site it runs at (``client.site.SiteRuntime``)."""

    cfg: ExperimentConfig
    state: SiteState

    @property
    def name(self) -> str: ...

    @property
    def output_dir(self) -> Path: ...

    @property
    def sections(self) -> Sequence[SiteSection]: ...

    @property
    def n_cells(self) -> int: ...

    @property
    def feature_key(self) -> str | None: ...

    def setup(self) -> SiteSetup:
        """What the federation fixed for this run (feature space, PCA basis, panel maps)."""
        ...

    def prepare(self, setup: SiteSetup) -> int:
        """Build and cache what later messages reuse; returns the number of cells."""
        ...

    def feature_graph_data(self, setup: SiteSetup) -> GraphData: ...

    def graph_data(self, setup: SiteSetup) -> GraphData: ...

    def dp_graph_data(self, setup: SiteSetup) -> GraphData: ...

    def reference_sections(self, setup: SiteSetup) -> list[SiteSection]: ...

    def reference_inputs(self, setup: SiteSetup) -> np.ndarray: ...

    def ledger(self) -> PrivacyLedger: ...

    def save_ledger(self, ledger: PrivacyLedger) -> None: ...

    def round_seed(self, seed: int, server_round: int) -> int:
        """A seed reproducible per site and round, different across sites and rounds."""
        ...


@dataclass
class TrainOutcome:
    """What federated training leaves for the phases after it."""

    weights: Weights
    history: list[dict[str, Any]]
    seconds: float
    stopped: dict[str, Any] | None = None
    """Set when the privacy budget stopped training early (after which round, who refused)."""
    refusals: dict[int, dict[int, str]] = field(default_factory=dict)


class Federation(Protocol):
    """What a phase's server half may do with the sites (``server.federation`` implements
    it over Flower's Grid). Sites are named; replies always come in site-name order, so
    that sums do not depend on which site answered first."""

    @property
    def sites(self) -> list[str]:
        """The participating sites, sorted by name."""
        ...

    def ask(
        self,
        query: str,
        payload: Payload | Mapping[str, Payload] | None = None,
        *,
        sites: Sequence[str] | None = None,
        require_all: bool = False,
    ) -> dict[str, Payload]:
        """Send ``query`` (one payload for all, or one per site) to ``sites`` (default:
        all); returns the replies keyed by site, in site-name order. A site that fails is
        dropped (the run stops once too few remain); ``require_all`` makes losing any
        asked site an error (protocols whose sums need every site)."""
        ...

    def rename(self, names: Mapping[str, str]) -> list[str]:
        """Give the sites their own names (``describe``'s replies) in place of node ids;
        returns the keys of ``names`` admitted under their name. A site whose name is not
        the one its key was registered with, or that another site also claims, is
        dropped from the run."""
        ...

    def train(self, run: Run, initial: Weights, *, done_rounds: int, history: list[dict[str, Any]]) -> TrainOutcome:
        """Federated training rounds with the run's strategy (FedAvg, central DP, SecAgg+),
        checkpointed after every round."""
        ...


@dataclass
class Checkpoint:
    """The global state after the last finished round of an interrupted run."""

    round: int
    weights: Weights
    state: dict[str, Any]


@dataclass
class SiteDescription:
    """One site as ``describe`` reports it (no cells)."""

    n_cells: int
    sections: list[str]
    section_sites: list[str]
    section_sizes: list[int]
    section_features: dict[str, list[str]]
    labels: list[str]


@dataclass
class DomainModel:
    """The federation's domains: centroids and, with a mixture, its parameters."""

    centroids: np.ndarray
    variance: float
    arrays: dict[str, np.ndarray]
    """What ``finalize`` sends the sites (centroids, and mixture parameters)."""


@dataclass
class Run:
    """Everything one run's phases hand on to each other (server side)."""

    cfg: ExperimentConfig
    run_config: dict[str, Any]
    folder: Path
    started: float = 0.0
    """``time.perf_counter()`` when the run started."""
    checkpoint: Checkpoint | None = None
    sites: dict[str, SiteDescription] = field(default_factory=dict)
    plan: PanelPlan | None = None
    space: FeatureSpace | None = None
    batches: list[str] = field(default_factory=list)
    in_dim: int = 0
    gene_embedding: np.ndarray | None = None
    """``(in_dim, E)`` start of the Novae encoder's gene embeddings: the federated PCA axes
    of its inputs (novae's own ``pca_init``, computed from the sites' products)."""
    model_config: dict[str, Any] = field(default_factory=dict)
    training: TrainOutcome | None = None
    proposals: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """Each site's k-means proposal of its embedding (initializes domain clustering)."""
    domains: DomainModel | None = None
    kmeans_starts: list[np.ndarray] = field(default_factory=list)
    """Starting centroids of every clustering start (the mixture starts from them too)."""
    site_reports: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    """Entries each phase adds to the run report (``metrics.json``)."""

    def message_config(self) -> dict[str, ConfigValue]:
        """Entries every message of the model's phases carries."""
        return {"model-config": _json(self.model_config), "seed": self.cfg.seed, "run-name": self.cfg.run_name}


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


class Phase(ABC):
    """One federated algorithm: a server half and a site half.

    Subclasses set :attr:`name` and :attr:`queries` (the messages their site half
    answers: members of :class:`~fedspatial.shared.protocol.names.Query`, or names of
    their own), implement :meth:`run`, and :meth:`answer` when they have queries.
    """

    name: ClassVar[str]
    queries: ClassVar[tuple[str, ...]] = ()
    rides_with: ClassVar[str] = ""
    """An earlier phase whose one message may carry this phase's :meth:`early_requests`."""

    def enabled(self, run: Run) -> bool:
        """Whether this run needs the phase (e.g. PCA only with ``features.n-pcs``)."""
        return True

    def early_requests(self, run: Run) -> list[tuple[str, Payload]]:
        """Requests this phase will make that a site can answer as soon as the
        :attr:`rides_with` phase's message is answered: the federation sends them with that
        message and keeps the replies until this phase asks exactly the same (one message
        fewer per request, the same answers). Called before the ``rides_with`` phase runs."""
        return []

    @abstractmethod
    def run(self, fed: Federation, run: Run) -> None:
        """Server half: ask the sites, combine their replies, record the result in ``run``."""

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        """Site half: answer one of :attr:`queries` from the site's private data."""
        raise NotImplementedError(f"phase {self.name!r} answers no query {query!r}")
