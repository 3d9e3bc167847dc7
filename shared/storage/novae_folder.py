"""A Novae model folder: the run's model folder, readable by ``novae.Novae.from_pretrained``.

``novae.Novae.save_pretrained`` writes ``model.safetensors`` (the state dict) and
``config.json`` (the constructor's arguments). The Novae encoder's state dict has novae's
own keys (:class:`~fedspatial.shared.models.novae_encoder.NovaeEncoder`), so the
checkpoint fedspatial writes is already that ``model.safetensors``: adding the
``config.json`` novae would write makes the same folder open with both tools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedspatial.shared.models.novae_encoder import NovaeEncoder, import_novae
from fedspatial.shared.storage.atomic import write_json_atomic

NOVAE_CONFIG = "config.json"

_NOVAE_ARGS = ("embedding_size", "hidden_size", "num_layers", "output_size", "heads", "num_prototypes",
               "temperature", "panel_subset_size", "background_noise_lambda", "sensitivity_noise_std")


def novae_arguments(model_config: dict[str, Any]) -> dict[str, Any]:
    """``novae.Novae`` constructor arguments of a Novae encoder's ``model_config()``."""
    if model_config.get("kind") != NovaeEncoder.kind:
        raise ValueError(f"not a novae model config (kind {model_config.get('kind')!r})")
    return {"var_names": list(model_config["genes"]), **{k: model_config[k] for k in _NOVAE_ARGS}}


def novae_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` ``Novae.save_pretrained`` writes for this architecture."""
    novae = import_novae()
    reference = novae.Novae(adata=None, **novae_arguments(model_config))
    config = dict(reference.hparams)
    return config


def write_novae_config(folder: str | Path, model_config: dict[str, Any]) -> Path:
    """Add novae's ``config.json`` to a fedspatial model folder (atomically)."""
    return write_json_atomic(Path(folder) / NOVAE_CONFIG, novae_config(model_config))
