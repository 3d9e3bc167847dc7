"""Per-cell autoencoder: an MLP over each cell's own features (decoupled GNN, GAP/SIGN).

The encoder never reads a neighbour, so one training sample depends on one cell and
DP-SGD needs no group factor (sensitivity ``C``, not ``(1 + 2D) C``); the spatial
niche enters after training, by smoothing the embeddings at the site. Encoder:
``Linear -> ELU -> Linear`` to the embedding; decoder: ``Linear (+ batch offset) ->
ELU -> Linear`` back to the standardized features, as in :class:`GATAutoencoder`
(section/site identity enters the decoder only). Every parameter lives in an
``nn.Linear`` on ``[B, F]`` inputs: Opacus's ghost clipping handles it in closed form.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fedspatial.shared.models.reconstruction import ReconstructionMixin


class CellAutoencoder(ReconstructionMixin, nn.Module):
    """MLP autoencoder of a cell's feature vector; the neighbourhood is ignored.

    Parameters
    ----------
    in_dim
        Number of input features (harmonized, selected features).
    hidden_dim
        Width of the encoder's and the decoder's hidden layer (default: 128).
    latent_dim
        Embedding size (default: 32).
    n_batches
        Number of batch (section) categories fed to the decoder; 0 disables it (default: 0).
    dropout
        Input dropout during training (default: 0.0).
    """

    kind = "cell_autoencoder"

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
        self.encoder_in = nn.Linear(in_dim, hidden_dim)
        self.to_latent = nn.Linear(hidden_dim, latent_dim)
        self.decoder_in = nn.Linear(latent_dim, hidden_dim)
        # One-hot codes through a bias-free Linear: a learned offset per batch that, unlike
        # an Embedding, ghost clipping supports in closed form (as in GATAutoencoder).
        self.batch_in = nn.Linear(n_batches, hidden_dim, bias=False) if n_batches > 0 else None
        self.decoder_out = nn.Linear(hidden_dim, in_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The first layer starts as GATAutoencoder's projection does (Xavier, zero bias),
        # so that the two encoders are compared from the same kind of start.
        nn.init.xavier_uniform_(self.encoder_in.weight)
        nn.init.zeros_(self.encoder_in.bias)
        for lin in (self.to_latent, self.decoder_in, self.decoder_out):
            lin.reset_parameters()
        if self.batch_in is not None:
            nn.init.zeros_(self.batch_in.weight)

    def encode(self, x: Tensor) -> Tensor:
        """Embed cells ``[B, F]`` -> ``[B, latent_dim]`` (input dropout while training)."""
        if self.training and self.dropout > 0:
            x = F.dropout(x, self.dropout)
        return self.to_latent(F.elu(self.encoder_in(x)))

    def encode_ego(self, x: Tensor, mask: Tensor) -> Tensor:
        """Embed the centre ``x[:, 0]`` of neighbourhoods ``[B, 1 + k, F]`` -> ``[B, latent_dim]``.

        ``mask`` is unused: the neighbours (``k`` may be 0) never enter the embedding.
        """
        return self.encode(x[:, 0])

    def embed_graph(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Embed every node ``[N, F]`` -> ``[N, latent_dim]``; ``edge_index`` is ignored."""
        return self.encode(x)
