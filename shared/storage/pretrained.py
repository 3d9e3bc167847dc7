"""A trained model to start from (``model.init-from``): its weights, and the feature space
its inputs live in.

The folder is a fedspatial model folder (``<run>/<mode>/model``, written by
:func:`~fedspatial.shared.storage.checkpoint.save_checkpoint`): the weights, the model's
arguments and the feature space of the run that trained it. Everything is checked here,
on the server, before training: a missing folder, a folder without a feature space or an
encoder of the wrong kind (before a simulation starts at all), genes a site does not hold
(once the sites have described their sections) each stop the run with a message that
says what to change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.features.selection import FeatureSpace
from fedspatial.shared.models import CellAutoencoder, GATAutoencoder
from fedspatial.shared.privacy.feature_release import release_bounds
from fedspatial.shared.protocol.feature_space import feature_space_from_config
from fedspatial.shared.storage.checkpoint import CONFIG, WEIGHTS, load_checkpoint

__all__ = ["KINDS", "Pretrained", "pretrained_space", "read_pretrained"]

logger = logging.getLogger(__name__)

KINDS = {"cell": CellAutoencoder.kind, "gat": GATAutoencoder.kind}
"""``model.encoder`` (resolved) -> the ``kind`` a loaded model must have."""


@dataclass(frozen=True)
class Pretrained:
    """A loaded model folder.

    Attributes
    ----------
    path
        The folder (``model.init-from``).
    weights
        ``name -> float32 array``, the model's state dict.
    model_config
        The arguments that rebuild the model (``kind``, ``in_dim``, ...).
    space
        The feature space its inputs were built in (genes, standardization, clip bounds).
    """

    path: Path
    weights: dict[str, np.ndarray]
    model_config: dict[str, Any]
    space: FeatureSpace


def read_pretrained(cfg: ExperimentConfig, *, encoder: str) -> Pretrained:
    """Load ``cfg.model.init-from`` and check it fits the run: ``encoder`` is the run's
    resolved ``model.encoder`` ("cell" or "gat"), and the batches; :class:`ConfigError`
    naming the fix otherwise."""
    path = Path(cfg.model.init_from).expanduser()
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise ConfigError(
            f"model.init-from: {path} holds no fedspatial model ({WEIGHTS} and {CONFIG} expected): "
            "point it at a run's model folder, e.g. results/<run-name>/federated/model"
        )
    try:
        model, config = load_checkpoint(path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"model.init-from: {path} could not be loaded ({err}); is it a fedspatial model folder?") from None
    if "feature-space" not in config:
        raise ConfigError(f"model.init-from: {path}/{CONFIG} has no feature space: use the model folder of a finished run")
    model_config = dict(config["model"])
    if model_config.get("kind") != KINDS[encoder]:
        raise ConfigError(
            f"model.init-from: {path} holds a {model_config.get('kind')}, but this run's encoder is {encoder!r} "
            f"({KINDS[encoder]}; model.encoder: {cfg.model.encoder}"
            + (": 'cell' under privacy.local-dp, else 'gat'" if cfg.model.encoder == "auto" else "")
            + "): start from a model of that kind, or set model.encoder to match"
        )
    if int(model_config.get("n_batches", 0)) and cfg.model.batch == "none":
        raise ConfigError(
            f"model.init-from: {path} has a batch-aware decoder ({model_config['n_batches']} batches of its own "
            "run), which cannot apply to this run's sections: start from a model trained with model.batch: none"
        )
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    space = feature_space_from_config(config["feature-space"])
    return Pretrained(path, weights, model_config, space)


def pretrained_space(
    pre: Pretrained, cfg: ExperimentConfig, section_features: Mapping[str, Iterable[str]]
) -> FeatureSpace:
    """The run's feature space: the loaded model's, with this run's clip bounds under
    local DP (the sites clip their releases and inputs to ``privacy.feature-clip``).

    Every section must hold every gene the space was built on (its library sizes are taken
    over them); :class:`ConfigError` lists what is missing otherwise.
    """
    space = pre.space
    needed = set(space.shared)
    for section, features in sorted(section_features.items()):
        missing = needed - set(map(str, features))
        if missing:
            examples = ", ".join(sorted(missing)[:5])
            raise ConfigError(
                f"model.init-from: section {section} lacks {len(missing)} of the {len(needed)} genes the loaded "
                f"model's feature space was built on (e.g. {examples}): start from a model trained on genes every "
                "site holds"
            )
    if cfg.privacy.local_dp:
        bounds = release_bounds(cfg.privacy.feature_clip, space.target_sum)
        if space.clip_norm is not None and space.clip_norm != bounds.clip_norm:
            logger.warning(
                "model.init-from: the loaded model's inputs were clipped to %g, this run clips to privacy.feature-clip %g",
                space.clip_norm, bounds.clip_norm,
            )
        space = dataclasses.replace(space, clip_norm=bounds.clip_norm, clip_square=bounds.clip_square)
    return space
