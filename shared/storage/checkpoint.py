"""Model checkpoints: safetensors weights plus the JSON config that rebuilds the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedspatial.shared.models import build_model
from fedspatial.shared.storage.atomic import write_atomic, write_json_atomic

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def save_checkpoint(
    folder: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]
) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (model arguments + run metadata)."""
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    write_json_atomic(folder / CONFIG, config)
    return folder


def load_checkpoint(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint`; returns ``(model, config)``."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder} holds no checkpoint ({WEIGHTS} and {CONFIG} expected)")
    config = json.loads((folder / CONFIG).read_text())
    model = build_model(config["model"])
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model, config
