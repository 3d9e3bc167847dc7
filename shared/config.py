"""Experiment configuration: YAML files in ``configs/`` and Flower run config.

One schema, two spellings. A YAML file groups keys in sections (``data``, ``features``,
...); Flower's run config is the same keys flattened (``n-top-features = 300``). Every
key is kebab-case. Loading rejects unknown keys, wrong types and impossible values
with the key's name and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from fedspatial.shared.model_config import ModelConfig, NovaeConfig, novae_checks
from fedspatial.shared.privacy.checks import privacy_checks
from fedspatial.shared.protocol.result_line import RUN_NAME_RULE, is_valid_run_name
from fedspatial.shared.storage.hints import did_you_mean
from fedspatial.shared.training.strategy_config import StrategyName, strategy_checks


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible."""


MODES = ("federated", "local", "centralized")


@dataclass
class DataConfig:
    manifest: str = ""
    """Federation manifest (federation.json); empty: the built-in synthetic federation."""
    synthetic_dir: str = "data/synthetic"
    """Where the built-in synthetic federation is written when `federation` is empty."""
    synthetic_scale: float = 1.0
    """Multiplies the synthetic section sizes (benchmarks use > 1)."""
    spatial_key: str = "spatial"
    label_key: str = "domain"
    feature_key: str = ""
    """`var` column to match features across sites (e.g. gene_ids); empty: var_names."""
    expect_counts: bool = True
    """X holds raw counts (sequencing, imaging transcript counts): `fedspatial simulate`
    refuses non-integer X unless told `--allow non-counts`. false: intensities (CODEX,
    IMC, MSI) are expected and non-integer X is fine."""


@dataclass
class FeaturesConfig:
    n_top_features: int = 300
    target_sum: float = 1e4
    scale: Literal["global", "section"] = "section"
    """Standardize with the pooled statistics, or each section on its own (removes
    per-feature batch effects between sections)."""
    n_pcs: int = 0
    """Train on this many principal components of the standardized features, computed
    by federated PCA (sites send only D x r products); 0: train on the features."""
    small_panel_fraction: float = 0.5
    """A section holding fewer than this fraction of the median section's features (a
    small targeted panel) is mapped onto the others' model inputs by a federated
    regression instead of shrinking everybody's features to the ones it has
    (shared/algorithms/panels.py); 0: plain intersection over all sections."""


@dataclass
class GraphConfig:
    graph: Literal["knn", "radius"] = "knn"
    n_neighbors: int = 6
    radius: float = 0.0
    """Radius in coordinate units for graph: radius (0: unused)."""


@dataclass
class TrainingConfig:
    num_rounds: int = 30
    local_epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    """FedProx term ``mu/2 ||w - w_global||^2`` in every site's local loss (any strategy)."""
    strategy: StrategyName = "fedavg"
    """How the server combines the sites' models: fedavg, fedprox, fedadam, fedyogi, or robust
    to poisoned sites: median, trimmed-mean, krum, multi-krum, bulyan (each explained, and
    what it combines with, in shared/training/strategy_config.py)."""
    fraction_train: float = 1.0
    """Partial participation: the fraction of the sites drawn (seeded) to train each round."""
    server_lr: float = 0.01
    """fedadam/fedyogi: server learning rate (eta)."""
    server_beta_1: float = 0.9
    """fedadam/fedyogi: first-moment decay."""
    server_beta_2: float = 0.99
    """fedadam/fedyogi: second-moment decay."""
    server_tau: float = 1e-3
    """fedadam/fedyogi: adaptivity, added to the root of the second moment."""
    trim_fraction: float = 0.2
    """trimmed-mean: fraction of the sites cut at each end of every coordinate."""
    byzantine_sites: int = 1
    """krum, multi-krum, bulyan: poisoned sites to tolerate per round (f)."""
    krum_select: int = 0
    """multi-krum: models averaged; 0: sites per round - byzantine-sites."""
    min_nodes: int = 0
    """Sites that must be connected and answer each round; 0: all sites of the simulated
    federation (at least 1 in a deployment). fraction-train must draw at least this many."""
    message_timeout: float = 600.0
    """Seconds a site has to answer one message (a training round, a clustering step);
    a site that has not answered by then is dropped as if it had failed (min-nodes rules).
    Measured rounds take seconds (benchmarks/results/); raise it for very large sites."""


@dataclass
class ClusteringConfig:
    n_domains: int = 5
    kmeans_max_iter: int = 100
    kmeans_tol: float = 0.0
    n_init: int = 1
    """Clustering starts run side by side in the same messages (scikit-learn's
    ``n_init``): k-means++ seedings of the sites' proposals. Without a mixture the
    k-means with the lowest inertia is kept; with one, the first start's k-means and the
    other seedings each start EM and the highest log-likelihood is kept. The starts
    share messages: as many rounds as the slowest one."""
    refine: bool = True
    """Majority vote over spatial neighbours after clustering (at each site)."""
    mixture: Literal["none", "tied", "full"] = "none"
    """After k-means, fit a federated Gaussian mixture started from its assignment:
    "tied" (one shared covariance, mclust EEE as STAGATE/GraphST use), "full", or
    "none" (k-means domains)."""
    mixture_max_iter: int = 100
    harmony: Literal["none", "section", "site"] = "none"
    """Federated Harmony on the embeddings before clustering, with sections (or sites)
    as batches; the server sees cluster-level sums only."""
    harmony_theta: float = 2.0
    """Diversity penalty (harmonypy's theta)."""
    harmony_sigma: float = 0.1
    """Soft-clustering width (harmonypy's sigma)."""
    harmony_clusters: int = 0
    """Harmony's clusters; 0: harmonypy's min(round(N / 30), 100)."""
    harmony_max_iter: int = 10


@dataclass
class PrivacyConfig:
    local_dp: bool = False
    """Node-level DP-SGD at every site (Opacus): the privacy unit is one cell."""
    target_epsilon: float = 8.0
    """Epsilon the whole run may spend at a site; the noise is calibrated to reach it
    after num-rounds (used when noise-multiplier is 0)."""
    noise_multiplier: float = 0.0
    """Node-level noise multiplier (noise std / node sensitivity); 0: from target-epsilon."""
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    """Per-sample (one ego neighbourhood) gradient clipping norm."""
    budget_epsilon: float = 0.0
    """Per-site budget: a site refuses a round that would exceed it (0: target-epsilon).
    A site's node config `privacy-budget` may set a stricter one."""
    max_degree: int = 0
    """D charged by DP-SGD with the graph encoder (model.encoder: gat): how many other cells'
    training samples one cell can change. 0: the proven bound 6 x neighbors.n-neighbors
    (shared/graph/degree_bound.py); a smaller value is refused, a larger one only adds noise."""
    on_exhausted: Literal["stop", "continue"] = "stop"
    """When a site's budget is spent: stop training (keep the last round's model), or
    continue without that site (needs min-nodes below the number of sites)."""
    grad_sample_mode: Literal["hooks", "ghost", "functorch"] = "ghost"
    """Opacus per-sample gradient engine."""
    feature_stats_noise: float = 0.0
    """Noise multiplier of the Gaussian mechanism on the harmonization aggregates
    (0: exact aggregates, no privacy cost). Under local-dp the statistics are always
    released privately (shared/privacy/budget.py sets the noise)."""
    feature_clip: float = 20.0
    """Under local-dp (or feature-stats-noise > 0): L2 bound R of one cell's log-normalized
    expression vector over the shared features; a longer one is scaled down to it (one factor
    per cell; the model inputs are clipped the same way). Sets the sensitivity of the feature
    statistics (shared/privacy/feature_release.py)."""
    kmeans_iterations: int = 6
    """Under local-dp: DP Lloyd iterations of the federated k-means (each one a noised
    release of per-cluster sums and counts)."""
    central_dp: Literal["none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = "none"
    """Client-level central DP with Flower's DP strategy wrappers."""
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0
    """Clipping norm of a site's model update (initial norm when adaptive)."""
    secagg: bool = False
    """Secure aggregation (Flower SecAgg+, legacy workflow API)."""


@dataclass
class MarkersConfig:
    marker_genes: bool = True
    """After finalize, rank the genes of every domain against the rest from per-domain
    sums the sites send (equal to pooled ``scanpy.tl.rank_genes_groups``); refused under
    privacy.local-dp (the sums are not covered by the privacy ledger)."""
    marker_method: Literal["t-test", "t-test_overestim_var"] = "t-test"
    """scanpy's t-test flavour (a rank test such as Wilcoxon cannot be computed from sums)."""
    marker_plot_genes: int = 5
    """Top genes per domain in the dot plot (markers.csv lists every gene)."""


@dataclass
class SimulationConfig:
    modes: list[str] = field(default_factory=lambda: list(MODES))
    num_cpus: int = 2
    """CPU cores the simulation may use in total."""
    cpus_per_client: int = 1
    """CPU cores (torch threads) of each simulated SuperNode, the single node of the
    centralized and local modes included."""
    simulated_mode: Literal["", "federated", "local", "centralized"] = ""
    """Set by ``fedspatial simulate`` for each mode's Flower run (which runs under the
    run-name of the mode, or of the site for local); empty in a deployment (federated)."""
    simulated_run: str = ""
    """Set by ``fedspatial simulate``: the run-name the user gave (recorded by the sites)."""
    simulated_nodes: int = 0
    """Set by ``fedspatial simulate``: this Flower run's SuperNodes; it waits for all (0: deployed)."""


@dataclass
class ExperimentConfig:
    run_name: str = "demo"
    results_dir: str = "results"
    seed: int = 0
    resume: bool = False
    """Continue the run in <results-dir>/<run-name> from its last checkpoint."""
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    neighbors: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    novae: NovaeConfig = field(default_factory=NovaeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    markers: MarkersConfig = field(default_factory=MarkersConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        validate(self)

    # -- conversions ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {_kebab(k): _to_plain(v) for k, v in dataclasses.asdict(self).items()}

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat kebab-case keys for Flower (`[tool.flwr.app.config]`); lists become CSV."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    flat[_kebab(sub.name)] = getattr(value, sub.name)
            else:
                flat[_kebab(f.name)] = value
        return {k: ",".join(v) if isinstance(v, list) else v for k, v in flat.items()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
        return _build(cls, raw, source)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_run_config`; keys missing from ``run_config`` keep defaults."""
        sections = {_kebab(f.name): f for f in dataclasses.fields(cls) if _is_section(f)}
        owner = {
            _kebab(sub.name): name
            for name, f in sections.items()
            for sub in dataclasses.fields(_section_type(f))
        }
        nested: dict[str, Any] = {}
        for key, value in run_config.items():
            if key in owner:
                section_cls = _section_type(sections[owner[key]])
                sub_type = {_kebab(s.name): s.type for s in dataclasses.fields(section_cls)}[key]
                if _origin_is_list(sub_type) and isinstance(value, str):
                    value = [v for v in value.split(",") if v]
                nested.setdefault(owner[key], {})[key] = value
            else:
                nested[key] = value
        return _build(cls, nested, "run config")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate a YAML experiment config; ``overrides`` use dotted keys
    (``{"training.num-rounds": 2}``)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist{did_you_mean(path)}. Fix: give an existing YAML config "
            "(the shipped ones are in configs/, e.g. configs/demo.yaml)"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}. Fix the file at that line (configs/demo.yaml shows every key)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return ExperimentConfig.from_dict(raw, source=str(path))


def _value(cfg: ExperimentConfig, key: str) -> Any:
    """The value of a dotted kebab-case key, e.g. ``"training.num-rounds"``."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name.replace("-", "_"))


def _at_least(cfg: ExperimentConfig, key: str, minimum: int, note: str = "") -> tuple[bool, str]:
    """``(value >= minimum, "<key>: must be >= <minimum>")``, the note in brackets after."""
    message = f"{key}: must be >= {minimum}" + (f" ({note})" if note else "")
    return _value(cfg, key) >= minimum, message


def _positive(cfg: ExperimentConfig, key: str) -> tuple[bool, str]:
    """``(value > 0, "<key>: must be > 0")``."""
    return _value(cfg, key) > 0, f"{key}: must be > 0"


def validate(cfg: ExperimentConfig) -> None:
    """Reject impossible values, naming the key and what is allowed."""
    checks: list[tuple[bool, str]] = [
        (is_valid_run_name(cfg.run_name), f"run-name: must be a folder name: {RUN_NAME_RULE}"),
        _positive(cfg, "data.synthetic-scale"),
        _at_least(cfg, "features.n-top-features", 2),
        _positive(cfg, "features.target-sum"),
        _at_least(cfg, "neighbors.n-neighbors", 1),
        (cfg.neighbors.graph != "radius" or cfg.neighbors.radius > 0, "neighbors.radius: must be > 0 when graph is 'radius'"),
        _at_least(cfg, "model.hidden-dim", 1),
        _at_least(cfg, "model.latent-dim", 1),
        (0 <= cfg.model.dropout < 1, "model.dropout: must be in [0, 1)"),
        (
            cfg.model.fine_tune == "all" or bool(cfg.model.init_from),
            "model.fine-tune: 'last' trains only the last layer of a model loaded with model.init-from; "
            "set model.init-from to a trained model folder, or fine-tune: all",
        ),
        _at_least(cfg, "training.num-rounds", 1),
        _at_least(cfg, "training.local-epochs", 1),
        _at_least(cfg, "training.batch-size", 1),
        _positive(cfg, "training.lr"),
        _at_least(cfg, "training.weight-decay", 0),
        _at_least(cfg, "training.proximal-mu", 0),
        *strategy_checks(cfg),
        _at_least(cfg, "training.min-nodes", 0, "0 = all sites"),
        _positive(cfg, "training.message-timeout"),
        _at_least(cfg, "clustering.n-domains", 2),
        _at_least(cfg, "clustering.kmeans-max-iter", 1),
        _at_least(cfg, "clustering.kmeans-tol", 0),
        _at_least(cfg, "clustering.n-init", 1),
        _at_least(cfg, "clustering.mixture-max-iter", 1),
        _at_least(cfg, "clustering.harmony-theta", 0),
        _positive(cfg, "clustering.harmony-sigma"),
        _at_least(cfg, "clustering.harmony-clusters", 0, "0 = harmonypy's default"),
        _at_least(cfg, "clustering.harmony-max-iter", 1),
        _at_least(cfg, "features.n-pcs", 0, "0 = no PCA"),
        (
            0 <= cfg.features.small_panel_fraction <= 1,
            "features.small-panel-fraction: must be between 0 and 1 (0 = plain intersection)",
        ),
        (
            cfg.features.n_pcs <= cfg.features.n_top_features,
            f"features.n-pcs is {cfg.features.n_pcs}, more than features.n-top-features "
            f"({cfg.features.n_top_features}): PCA cannot give more components than features. Fix: "
            f"--set features.n-pcs={cfg.features.n_top_features} (or less; 0 turns PCA off), or raise "
            "features.n-top-features",
        ),
        *privacy_checks(cfg),
        *novae_checks(cfg),
        _at_least(cfg, "markers.marker-plot-genes", 1),
        _at_least(cfg, "simulation.num-cpus", 1),
        _at_least(cfg, "simulation.cpus-per-client", 1),
        (
            bool(cfg.simulation.modes) and set(cfg.simulation.modes) <= set(MODES),
            f"simulation.modes: must be a non-empty list drawn from {list(MODES)}",
        ),
    ]
    problems = [msg for ok, msg in checks if not ok]
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------- helpers
def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {_kebab(k): _to_plain(v) for k, v in value.items()}
    return value


def _is_section(f: dataclasses.Field[Any]) -> bool:
    return (isinstance(f.type, type) and dataclasses.is_dataclass(f.type)) or (
        isinstance(f.type, str) and f.type.endswith("Config")
    )


def _section_type(f: dataclasses.Field[Any]) -> type:
    hints = typing.get_type_hints(ExperimentConfig)
    return hints[f.name]  # type: ignore[no-any-return]


def _origin_is_list(tp: Any) -> bool:
    tp = _resolve(tp)
    return get_origin(tp) is list


def _resolve(tp: Any) -> Any:
    if isinstance(tp, str):
        return eval(tp, {**globals(), **vars(typing)})  # annotations of this module only
    return tp


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_kebab(f.name): f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{where}: unknown key '{key}'.{hint} Allowed keys here: {', '.join(sorted(fields))}"
            )
        f = fields[key]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value or {}, f"{where}: {key}")  # type: ignore[arg-type]
        else:
            kwargs[f.name] = _coerce(value, tp, f"{where}: {key}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if origin in (types.UnionType, typing.Union):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value
