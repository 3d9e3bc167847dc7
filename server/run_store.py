"""A run's folder on the server side: checkpoints after every round, final outputs.

Layout of ``<results-dir>/<run-name>/``::

    config.json           the run config that made this run
    checkpoint/           global state after the last finished round (model + state.json)
    model/                final global model: model.safetensors + model.json
    metrics.json          per round, per site, per section, joint scores
    loss.png              loss per round
    sites/<site>/         (simulation only) what each site wrote at home
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file

from fedspatial.server import progress
from fedspatial.shared.storage.atomic import write_json_atomic
from fedspatial.shared.storage.checkpoint import WEIGHTS, save_checkpoint

logger = logging.getLogger(__name__)


class RunExistsError(FileExistsError):
    """The run folder already holds a finished or started run."""


class RunStore:
    def __init__(self, folder: str | Path, *, resume: bool = False) -> None:
        self.folder = Path(folder)
        self.resume = resume
        self.num_rounds = 0  # from the run config (open): the N of "round i/N" progress events

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / "checkpoint"

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.json"

    def open(self, run_config: dict[str, Any]) -> None:
        """Create the folder, or refuse to touch an existing run unless resuming."""
        started = (self.checkpoint_dir / "state.json").exists() or self.metrics_path.exists()
        if started and not self.resume:
            raise RunExistsError(
                f"{self.folder} already holds a run: choose another run-name, delete the folder, "
                "or resume it (`fedspatial simulate --resume`, or run config resume=true)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / "config.json", run_config)
        self.num_rounds = int(run_config.get("num-rounds", 0) or 0)

    def save_round(self, server_round: int, arrays: ArrayRecord, state: dict[str, Any]) -> None:
        save_checkpoint(self.checkpoint_dir, arrays.to_torch_state_dict(), {"model": state["model"]})
        write_json_atomic(self.checkpoint_dir / "state.json", {**state, "round": server_round})
        # Every training path (FedAvg, central DP, SecAgg+) checkpoints here after each round:
        # the one place that knows a round is done, for the progress display too.
        progress.round_finished(server_round, self.num_rounds, str(self.checkpoint_dir))

    def load_round(self) -> tuple[int, ArrayRecord, dict[str, Any]] | None:
        """``(round, arrays, state)`` of the last checkpoint, or None."""
        path = self.checkpoint_dir / "state.json"
        if not self.resume or not path.exists():
            return None
        state = json.loads(path.read_text())
        tensors: dict[str, torch.Tensor] = load_file(str(self.checkpoint_dir / WEIGHTS))
        return int(state["round"]), ArrayRecord(tensors), state
