"""The encoder interface every fedspatial model implements, and the model factory.

A model maps a cell's spatial neighbourhood to an embedding (``encode_ego``), can embed
whole sections at once (``embed_graph``) and is trained self-supervised through
``loss``. A transformer over a cell's niche implements the same three methods; the
per-cell autoencoder implements them too and ignores the neighbourhood.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class SpatialEncoderModel(Protocol):
    """What the training loops, the clients and the server rely on."""

    latent_dim: int

    def encode_ego(self, x: Tensor, mask: Tensor) -> Tensor:
        """Embed the centre of each neighbourhood ``[B, 1 + k, F]`` -> ``[B, latent_dim]``."""
        ...

    def embed_graph(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Embed every node of one section graph ``[N, F]`` -> ``[N, latent_dim]``."""
        ...

    def loss(self, x: Tensor, mask: Tensor, batch: Tensor | None = None) -> Tensor:
        """Self-supervised loss per sample ``[B]`` for a batch of neighbourhoods."""
        ...

    def model_config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild the same architecture."""
        ...


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from :meth:`SpatialEncoderModel.model_config`."""
    from fedspatial.shared.models.cell_autoencoder import CellAutoencoder
    from fedspatial.shared.models.gat_autoencoder import GATAutoencoder
    from fedspatial.shared.models.novae_encoder import NovaeEncoder

    kinds: dict[str, type[nn.Module]] = {
        "gat_autoencoder": GATAutoencoder, "cell_autoencoder": CellAutoencoder, "novae": NovaeEncoder,
    }
    cfg = dict(config)
    kind = cfg.pop("kind", "gat_autoencoder")
    if kind not in kinds:
        raise ValueError(f"unknown model kind {kind!r}; available: {sorted(kinds)}")
    return kinds[kind](**cfg)
