"""The phases of a federated run, in the order the server drives them.

Each phase is one federated algorithm with a Flower-free server half and site half
(:class:`~fedspatial.shared.phases.base.Phase`). The ServerApp walks :data:`PHASES`;
the ClientApp answers each query with the phase that owns it (:func:`phase_for`). Adding an algorithm is one new module here plus
one line in :data:`PHASES`.
"""

from __future__ import annotations

from fedspatial.shared.phases.base import Phase
from fedspatial.shared.phases.calibration import CalibrationPhase
from fedspatial.shared.phases.describe import Describe
from fedspatial.shared.phases.dp_kmeans import DPKMeansPhase
from fedspatial.shared.phases.embedding import Embedding
from fedspatial.shared.phases.feature_space import FeatureSpacePhase
from fedspatial.shared.phases.finalize import Finalize
from fedspatial.shared.phases.harmony import HarmonyPhase
from fedspatial.shared.phases.kmeans import KMeansPhase
from fedspatial.shared.phases.markers import MarkersPhase
from fedspatial.shared.phases.mixture import MixturePhase
from fedspatial.shared.phases.panels import PanelPhase
from fedspatial.shared.phases.pca import PCAPhase
from fedspatial.shared.phases.training import Training

PHASES: tuple[Phase, ...] = (
    Describe(),
    FeatureSpacePhase(),
    PCAPhase(),
    PanelPhase(),
    Training(),
    Embedding(),
    HarmonyPhase(),
    KMeansPhase(),
    DPKMeansPhase(),
    MixturePhase(),
    Finalize(),
    CalibrationPhase(),
    MarkersPhase(),
)
"""Every phase, in run order; a phase whose :meth:`~Phase.enabled` is false is skipped."""


def phase_for(query: str, phases: tuple[Phase, ...] = PHASES) -> Phase:
    """The phase whose site half answers ``query``."""
    owners = [phase for phase in phases if query in phase.queries]
    if len(owners) != 1:
        raise LookupError(f"query {query!r} is answered by {len(owners)} phases, expected exactly one")
    return owners[0]


def all_queries(phases: tuple[Phase, ...] = PHASES) -> list[str]:
    """Every query the phases answer, in run order."""
    return [query for phase in phases for query in phase.queries]


__all__ = ["PHASES", "Phase", "all_queries", "phase_for"]
