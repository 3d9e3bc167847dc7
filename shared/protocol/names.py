"""Names both sides agree on: the messages a site answers and the steps inside them.

A message's Flower type is ``query.<name>`` (:func:`message_type`) for every query
except Flower's own ``train`` and ``evaluate``. Steps inside one query travel in the message config
under :data:`STAGE`.
"""

from __future__ import annotations

from enum import StrEnum


class Query(StrEnum):
    """The messages the built-in phases answer; each belongs to exactly one phase. A new
    phase may name its own queries (plain strings) in its module."""

    DESCRIBE = "describe"
    FEATURE_STATS = "feature_stats"
    SETUP = "setup"
    PCA = "pca"
    PANEL = "panel"
    TRAIN = "train"
    EVALUATE = "evaluate"
    EMBED = "embed"
    HARMONY = "harmony"
    CLUSTER_STATS = "cluster_stats"
    DP_CLUSTER_STATS = "dp_cluster_stats"
    MIXTURE = "mixture"
    FINALIZE = "finalize"
    CALIBRATION = "calibration"
    MARKERS = "markers"



def message_type(query: str) -> str:
    """The Flower message type that carries ``query`` (a :class:`Query` or a new
    phase's own query name): ``query.<name>``, or Flower's own ``train``/``evaluate``."""
    return str(query) if query in (Query.TRAIN, Query.EVALUATE) else f"query.{query}"


class PCAStage(StrEnum):
    """Steps of ``query.pca`` (subspace iteration, :mod:`fedspatial.shared.algorithms.pca`)."""

    SUMS = "sums"
    POWER = "power"
    RAYLEIGH = "rayleigh"
    STORE = "store"


class PanelStage(StrEnum):
    """Steps of ``query.panel`` (small-panel mapping, :mod:`fedspatial.shared.algorithms.panels`)."""

    MOMENTS = "moments"
    STORE = "store"


class HarmonyStep(StrEnum):
    """Steps of ``query.harmony`` around the Harmony requests themselves (whose kinds
    come from :mod:`fedspatial.shared.algorithms.harmony`)."""

    LOAD = "load"
    INIT_PROPOSE = "init-propose"
    INIT_STATS = "init-stats"
    STORE = "store"


class CalibrationStage(StrEnum):
    """Steps of ``query.calibration`` (label-free temperature, :mod:`fedspatial.shared.evaluation.calibration`)."""

    LOSS = "loss"
    STORE = "store"


class MarkerStage(StrEnum):
    """Steps of ``query.markers`` (federated marker genes, :mod:`fedspatial.shared.algorithms.markers`)."""

    SUMS = "sums"
    STORE = "store"


STAGE = "stage"
"""Config key naming the step of a multi-step query."""
RUN_CONFIG = "run-config"
"""Config key of the run's settings (JSON) that every message carries."""
NUM_EXAMPLES = "num-examples"
"""Metric key of a reply's cell count (Flower's weighting key)."""
EVALUATE_RECEIVED = "evaluate-received"
"""``train`` config: first measure the model received on the site's cells (its ``eval-loss``),
then train; the server then sends no ``evaluate`` messages (one message per round, not two)."""
RECEIVED_EVAL_LOSS = "received-eval-loss"
"""``train`` metric: that loss, the previous round's global model evaluated at the site."""
