"""Graph-attention autoencoder for spatial domains (STAGATE/GraphST family).

Encoder: one attention layer over the spatial neighbourhood in a projected space (the
projection comes first, so messages are cheap), ELU, then a linear map to the
embedding. Decoder: an MLP that reconstructs the centre cell's standardized features.
Section/site identity can enter the decoder only (never the embedding), so that batch
effects are explained there and the embedding keeps tissue structure.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fedspatial.shared.models.neighbourhood_attention import NeighbourhoodAttention
from fedspatial.shared.models.reconstruction import ReconstructionMixin


class GATAutoencoder(ReconstructionMixin, nn.Module):
    """Attention autoencoder over fixed-size spatial neighbourhoods.

    Parameters
    ----------
    in_dim
        Number of input features (harmonized, selected features).
    hidden_dim
        Width of the attention layer and of the decoder (default: 128).
    latent_dim
        Embedding size (default: 32).
    n_batches
        Number of batch (section) categories fed to the decoder; 0 disables it (default: 0).
    dropout
        Input dropout during training (default: 0.0).
    """

    kind = "gat_autoencoder"

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        latent_dim: int = 32,
        n_batches: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if min(in_dim, hidden_dim, latent_dim) < 1:
            raise ValueError("in_dim, hidden_dim and latent_dim must be positive")
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.latent_dim = latent_dim
        self.n_batches = n_batches
        self.dropout = dropout
        self.attention = NeighbourhoodAttention(in_dim, hidden_dim)
        self.to_latent = nn.Linear(hidden_dim, latent_dim)
        self.decoder_in = nn.Linear(latent_dim, hidden_dim)
        # Batch enters the decoder as a learned offset: an Embedding would be equivalent,
        # but a Linear on one-hot codes keeps every parameter Opacus-compatible.
        self.batch_in = nn.Linear(n_batches, hidden_dim, bias=False) if n_batches > 0 else None
        self.decoder_out = nn.Linear(hidden_dim, in_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attention.reset_parameters()
        for lin in (self.to_latent, self.decoder_in, self.decoder_out):
            lin.reset_parameters()
        if self.batch_in is not None:
            nn.init.zeros_(self.batch_in.weight)

    def _encode_hidden(self, h: Tensor) -> Tensor:
        return self.to_latent(F.elu(h))

    def encode_ego(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            x = F.dropout(x, self.dropout)
        return self._encode_hidden(self.attention.forward_ego(x, mask))

    def embed_graph(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self._encode_hidden(self.attention(x, edge_index))

