"""One federated run, as the server drives it: walk the phases in order.

The phases (:data:`fedspatial.shared.phases.PHASES`) are Flower-free; this module gives
them a :class:`FlowerFederation`, the run's sites over Flower's Grid, and writes the run
report at the end. Phases in run order: describe, feature space, PCA (with
``features.n-pcs``), small-panel mapping (when a section holds a small panel),
training, embedding, Harmony (with ``clustering.harmony``), k-means, mixture (with
``clustering.mixture``), finalize.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedspatial.records import (
    RIDER_ERROR,
    RIDERS,
    from_recorddict,
    nest,
    rider_prefix,
    to_recorddict,
    unnest,
)
from fedspatial.server import progress
from fedspatial.server.messaging import SiteError, SiteGroup, ask, wait_for_nodes
from fedspatial.server.report import privacy_summary, write_run_report
from fedspatial.server.run_store import RunStore
from fedspatial.server.training import train_rounds
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.phases import PHASES
from fedspatial.shared.phases.base import Checkpoint, Run, TrainOutcome, Weights
from fedspatial.shared.protocol.names import RUN_CONFIG, message_type
from fedspatial.shared.protocol.payload import Payload

logger = logging.getLogger(__name__)


class FlowerFederation:
    """The run's sites over Flower (a :class:`~fedspatial.shared.phases.base.Federation`).

    Every message carries the run's settings (``run-config``): the server's config is
    the one source of truth, and simulation carries no other. Sites are known by node
    id until ``describe`` names them.
    """

    def __init__(self, group: SiteGroup, run_config: Mapping[str, Any], store: RunStore | None = None) -> None:
        self.group = group
        self.store = store
        self.common = {RUN_CONFIG: json.dumps(dict(run_config))}
        self._riders: list[tuple[str, Payload]] = []
        self._kept: dict[tuple[str, str], dict[str, Payload]] = {}

    def carry(self, requests: Sequence[tuple[str, Payload]]) -> None:
        """Send ``requests`` along with the next :meth:`ask` (answered at each site right
        after it); their replies are kept for the phase that asks them later
        (:meth:`~fedspatial.shared.phases.base.Phase.early_requests`)."""
        self._riders = list(requests)

    @property
    def sites(self) -> list[str]:
        return sorted(self.group.name(n) for n in self.group.nodes)

    def _node_of(self) -> dict[str, int]:
        return {self.group.name(n): n for n in self.group.nodes}

    def rename(self, names: Mapping[str, str]) -> list[str]:
        nodes = self._node_of()
        admitted = self.group.bind_names({nodes[key]: name for key, name in names.items()})
        return [key for key in names if nodes[key] in admitted]

    def ask(
        self,
        query: str,
        payload: Payload | Mapping[str, Payload] | None = None,
        *,
        sites: Sequence[str] | None = None,
        require_all: bool = False,
    ) -> dict[str, Payload]:
        nodes = self._node_of()
        asked = list(self.sites if sites is None else sites)
        unknown = [s for s in asked if s not in nodes]
        if unknown:
            raise SiteError(f"{message_type(query)}: site(s) {', '.join(unknown)} are not (or no longer) in the run")
        if payload is None or isinstance(payload, Payload):
            kept = self._kept.pop((str(query), _request_key(payload)), None)
            if kept is not None and sites is None and set(kept) == set(asked):
                logger.debug("%s: answered with an earlier message", message_type(query))
                return {s: kept[s] for s in sorted(kept)}
        riders, self._riders = self._riders, []

        def content(p: Payload | None) -> RecordDict:
            p = p or Payload()
            out = to_recorddict(Payload(p.arrays, {**self.common, **p.config}, p.metrics))
            if riders:
                out[RIDERS] = ConfigRecord({RIDERS: [str(q) for q, _ in riders]})
                for i, (_, rider) in enumerate(riders):
                    nest(out, rider_prefix(i), to_recorddict(rider))
            return out

        contents: RecordDict | dict[int, RecordDict]
        if payload is None or isinstance(payload, Payload):
            contents = content(payload)
        else:
            contents = {nodes[s]: content(payload[s]) for s in asked}
        replies = ask(self.group, [nodes[s] for s in asked], str(query), content=contents, names=self.group.names)
        for i, (rider_query, rider) in enumerate(riders):
            answered = {self.group.name(n): unnest(r, rider_prefix(i)) for n, r in replies.items()}
            # Kept only where answered: a refusal is marked, and a site that ignores carried
            # requests (not this version's ClientApp) returns nothing under the prefix.
            self._kept[(str(rider_query), _request_key(rider))] = {
                site: from_recorddict(c) for site, c in answered.items() if len(c) and RIDER_ERROR not in c.config_records
            }
        out = {self.group.name(n): from_recorddict(r) for n, r in replies.items()}
        missing = [s for s in asked if s not in out]
        if require_all and missing:
            raise SiteError(
                f"{message_type(query)} lost site(s) {', '.join(missing)}: this step needs every site that "
                "holds cells; rerun the run"
            )
        return {s: out[s] for s in sorted(out)}

    def train(self, run: Run, initial: Weights, *, done_rounds: int, history: list[dict[str, Any]]) -> TrainOutcome:
        if self.store is None:
            raise RuntimeError("training needs the run's store (checkpoints after every round)")
        return train_rounds(self.group, run, self.store, initial, done_rounds=done_rounds, history=history, common=self.common)


def _request_key(payload: Payload | None) -> str:
    """A request's identity: its config and the bytes of its arrays."""
    payload = payload or Payload()
    digest = hashlib.sha256(json.dumps(payload.config, sort_keys=True, default=str).encode())
    for name in sorted(payload.arrays):
        value = np.ascontiguousarray(payload.arrays[name])
        digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def run_federation(grid: Grid, cfg: ExperimentConfig, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run every phase on the connected sites; returns the run report (also written)."""
    t0 = time.perf_counter()
    store = RunStore(Path(cfg.results_dir) / cfg.run_name, resume=cfg.resume)
    store.open(run_config)
    saved = store.load_round()
    progress.phase_started("waiting for the sites")
    # A simulation's SuperNodes all exist from the start, but may show up a moment apart:
    # wait for every one, or the run would go on without the late ones.
    nodes = wait_for_nodes(grid, max(cfg.training.min_nodes or 1, cfg.simulation.simulated_nodes))
    # From here on a site that fails is dropped; the run stops once fewer than min-nodes
    # remain (0: every site that was there at the start; 1 when a site whose privacy
    # budget is spent may leave and the run continue without it).
    leave_ok = cfg.privacy.local_dp and cfg.privacy.on_exhausted == "continue"
    group = SiteGroup(
        grid, nodes, min_nodes=cfg.training.min_nodes or (1 if leave_ok else len(nodes)),
        hint=lambda: (
            f"Finished rounds are checkpointed in {store.checkpoint_dir}: resubmit the run "
            "with run config resume=true to continue from the last one."
            if (store.checkpoint_dir / "state.json").is_file() else "No round finished: nothing to resume; submit the run again."
        ),
        message_timeout=cfg.training.message_timeout,
        # Flower's client-side DP clipping and SecAgg+ mods read a model's arrays one by one.
        pack=cfg.privacy.central_dp not in ("client-fixed", "client-adaptive") and not cfg.privacy.secagg,
    )
    run = Run(cfg, run_config, store.folder, started=t0)
    if saved is not None:
        done, arrays, state = saved
        run.checkpoint = Checkpoint(done, {k: v.numpy() for k, v in arrays.items()}, state)
    c = cfg.clustering
    run.report.update({
        "n-pcs": cfg.features.n_pcs, "mapped-panels": {}, "mixture": c.mixture, "n-init": c.n_init,
        "mixture-iterations": 0, "mixture-log-likelihoods": [], "mixture-start-kept": None, "harmony": {},
    })
    fed = FlowerFederation(group, run_config, store)
    for i, phase in enumerate(PHASES):
        if phase.enabled(run):
            progress.phase_started(phase.name)
            # Later phases' requests that this phase's message can carry (one message fewer each).
            fed.carry([r for later in PHASES[i + 1:] if later.rides_with == phase.name and later.enabled(run)
                       for r in later.early_requests(run)])
            phase.run(fed, run)
    assert run.training is not None
    names = {str(node): name for node, name in group.names.items()}
    return write_run_report(
        store.folder,
        history=run.training.history,
        site_names=names,
        site_reports=run.site_reports,
        extra={
            **run.report,
            "wall-seconds": time.perf_counter() - t0,
            "dropped-sites": group.dropped,
            "privacy": privacy_summary(
                cfg, run.training.history, names, run.training.stopped, run.training.refusals, run.site_reports
            ),
        },
    )
