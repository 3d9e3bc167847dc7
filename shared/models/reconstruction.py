"""The decoder half and the loss that both autoencoders share.

:class:`GATAutoencoder` and :class:`CellAutoencoder` differ only in how they embed a cell
(its niche or the cell alone); both decode ``Linear (+ batch offset) -> ELU -> Linear`` and
score the centre cell's mean squared reconstruction error.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReconstructionMixin"]


class ReconstructionMixin:
    """Decode, forward, loss, ``model_config`` and ``repr`` of an autoencoder that sets
    the attributes below in its ``__init__`` and defines ``encode_ego``."""

    kind: str
    in_dim: int
    hidden_dim: int
    latent_dim: int
    n_batches: int
    dropout: float
    decoder_in: nn.Linear
    batch_in: nn.Linear | None
    decoder_out: nn.Linear

    def encode_ego(self, x: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, z: Tensor, batch: Tensor | None = None) -> Tensor:
        """Reconstruct features ``[B, latent_dim]`` -> ``[B, in_dim]``; ``batch`` ``[B]`` int64 codes."""
        h = self.decoder_in(z)
        if self.batch_in is not None and batch is not None:
            h = h + self.batch_in(F.one_hot(batch, self.n_batches).to(h.dtype))
        return self.decoder_out(F.elu(h))

    def forward(self, x: Tensor, mask: Tensor, batch: Tensor | None = None) -> Tensor:
        """Reconstruct the centre cell of each neighbourhood ``[B, 1 + k, F]`` -> ``[B, F]``."""
        return self.decode(self.encode_ego(x, mask), batch)

    def loss(self, x: Tensor, mask: Tensor, batch: Tensor | None = None) -> Tensor:
        """Mean squared reconstruction error of each centre cell ``[B]``."""
        recon = self.forward(x, mask, batch)
        return ((recon - x[:, 0]) ** 2).mean(dim=1)

    def model_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_dim": self.in_dim,
            "hidden_dim": self.hidden_dim,
            "latent_dim": self.latent_dim,
            "n_batches": self.n_batches,
            "dropout": self.dropout,
        }

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, "
            f"latent_dim={self.latent_dim}, n_batches={self.n_batches})"
        )
