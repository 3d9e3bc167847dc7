"""The ``model:`` and ``novae:`` sections of the experiment config, and their checks
(the whole schema is assembled in shared/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from fedspatial.shared.config import ExperimentConfig

__all__ = ["ModelConfig", "NovaeConfig", "novae_checks", "novae_embedding_size"]


def novae_embedding_size(cfg: ExperimentConfig) -> int:
    """The Novae encoder's gene-embedding size: ``novae-embedding-size``, or the preset's."""
    from fedspatial.shared.models.novae_encoder import PRESETS

    return cfg.novae.novae_embedding_size or PRESETS[cfg.novae.novae_preset]["embedding_size"]


@dataclass
class ModelConfig:
    encoder: Literal["auto", "gat", "cell", "novae"] = "auto"
    """"gat": graph-attention autoencoder over each cell's niche; "cell": per-cell
    autoencoder (the niche enters after training, by smoothing the embedding at the site),
    which DP-SGD can train per cell; "novae": the Novae niche encoder trained
    self-supervised (the ``novae:`` keys; needs ``pip install 'fedspatial[fm]'``);
    "auto": "cell" under privacy.local-dp, else "gat"."""
    hidden_dim: int = 128
    latent_dim: int = 32
    """Width and embedding size of the autoencoders (novae's are set by novae.preset)."""
    dropout: float = 0.0
    batch: Literal["none", "section", "site"] = "none"
    """Batch-aware decoder: the section's (or site's) identity enters the decoder only,
    never the embedding. Its per-batch weights are trained by the batch's own site
    (summed updates, not averaged)."""
    init_from: str = ""
    """Start from a trained model folder (``<run>/<mode>/model``) on the server's disk: its
    encoder kind, sizes and feature space (genes, standardization; every site must hold
    those genes) replace these settings and feature selection (shared/storage/pretrained.py)."""
    fine_tune: Literal["all", "last"] = "all"
    """With ``init-from``: "last" trains only the encoder's last layer (``to_latent``), the
    rest stays as loaded: far less DP-SGD noise under privacy.local-dp; "all": every weight."""


@dataclass
class NovaeConfig:
    """Settings of ``model.encoder: novae`` (shared/models/novae_encoder.py)."""

    novae_preset: Literal["small", "full"] = "small"
    """Architecture: "small" (3 GATv2 layers of width 64, 4 heads, 256 prototypes: the
    federated default for CPUs) or "full" (novae's own: 10 layers, width 128, 8 heads, 512)."""
    novae_prototypes: int = 0
    """SwAV prototypes; 0: the preset's."""
    novae_embedding_size: int = 0
    """Gene-embedding (cell token) size; 0: the preset's (100, novae's). The gene embeddings
    start from this many federated principal axes of the inputs when there are more genes."""
    novae_local_steps: int = 0
    """SwAV steps per site and round, each on novae-batch-size niche pairs of one section;
    0: one novae epoch, as many steps as the site's trainable cells fill batches (then a
    round weighs the sites by their cells, and a centralized run trains as many pairs)."""
    novae_batch_size: int = 256
    """Niche pairs per step (novae's default)."""
    novae_hops_local: int = 2
    """Niche radius in graph hops (novae's n_hops_local)."""
    novae_hops_view: int = 2
    """Distance of the paired view in hops (novae's n_hops_view)."""
    novae_lr: float = 5e-4
    """Adam's peak learning rate (novae's), on novae's schedule with rounds for epochs:
    linear warm-up from 0.1 x over 2 rounds, cosine to 0.01 x at training.num-rounds."""
    novae_warmup_rounds: int = 1
    """Rounds at the start with the prototypes frozen (novae's warm-up epoch)."""
    novae_temperature: float = 0.1
    novae_panel_subset: float = 0.8
    """Fraction of the genes each augmented niche keeps (novae's panel_subset_size)."""


def novae_checks(cfg: ExperimentConfig) -> list[tuple[bool, str]]:
    """``(ok, message)`` for ``model.encoder: novae`` and the ``novae:`` keys."""
    n, on = cfg.novae, cfg.model.encoder == "novae"
    why = "model.encoder 'novae' "
    return [
        (n.novae_prototypes >= 0, "novae.novae-prototypes: must be >= 0 (0 = the preset's)"),
        (n.novae_embedding_size >= 0, "novae.novae-embedding-size: must be >= 0 (0 = the preset's)"),
        (n.novae_local_steps >= 0, "novae.novae-local-steps: must be >= 0 (0 = one epoch)"),
        (n.novae_batch_size >= 2, "novae.novae-batch-size: must be >= 2 (SwAV balances prototypes over a batch)"),
        (n.novae_hops_local >= 1 and n.novae_hops_view >= 1, "novae.novae-hops-local and novae-hops-view: must be >= 1"),
        (n.novae_warmup_rounds >= 0, "novae.novae-warmup-rounds: must be >= 0"),
        (n.novae_lr > 0, "novae.novae-lr: must be > 0"),
        (n.novae_temperature > 0, "novae.novae-temperature: must be > 0"),
        (0 < n.novae_panel_subset <= 1, "novae.novae-panel-subset: must be in (0, 1]"),
        (not (on and cfg.features.n_pcs), why + "reads genes, not principal components: set features.n-pcs to 0"),
        (not (on and cfg.model.batch != "none"), why + "has no decoder to take a batch: set model.batch to none"),
        (not (on and cfg.model.init_from), why + "does not start from model.init-from yet: leave it empty"),
        (
            not (on and cfg.privacy.local_dp),
            why + "is not trained under privacy.local-dp yet (its GATv2 layers have no per-sample DP-SGD): "
            "use model.encoder cell (or auto) with local-dp",
        ),
    ]
