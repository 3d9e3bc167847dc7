"""Graph attention over a cell's spatial neighbourhood, usable two ways.

``forward(x, edge_index)`` runs torch-geometric message passing (GAT-style, one head,
self-loops) over whole sections at inference; torch-geometric is imported on its first
call (see :mod:`._pyg`), so training and a ClientApp process that does not embed
never load it. ``forward_ego(x, mask)`` computes the same output for the centre of each
fixed-size ego neighbourhood ``[B, 1 + k, F]``.
Training uses the ego form because every sample then owns its inputs: memory is bounded
by the batch size and Opacus can compute per-sample gradients (all parameters live in
``nn.Linear`` modules, which its grad samplers support).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NeighbourhoodAttention(nn.Module):
    r"""Single-head graph attention: :math:`h_i = \sum_{j \in N(i) \cup \{i\}} \alpha_{ij} W x_j + b`.

    with :math:`\alpha_{ij} = \mathrm{softmax}_j(\mathrm{LeakyReLU}(a_s^\top W x_j + a_d^\top W x_i))`.

    Parameters
    ----------
    in_channels
        Input feature size.
    out_channels
        Output feature size.
    negative_slope
        LeakyReLU slope of the attention scores (default: 0.2, as in GAT).
    """

    def __init__(self, in_channels: int, out_channels: int, *, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.negative_slope = negative_slope
        self.lin = nn.Linear(in_channels, out_channels, bias=True)
        self.att_src = nn.Linear(out_channels, 1, bias=False)
        self.att_dst = nn.Linear(out_channels, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)
        nn.init.xavier_uniform_(self.att_src.weight)
        nn.init.xavier_uniform_(self.att_dst.weight)

    # -- whole graph (torch-geometric) -------------------------------------------------
    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Apply the layer to every node of a graph; ``edge_index`` is source -> target."""
        from fedspatial.shared.models._pyg import attention_propagation

        h = self.lin(x)
        score_src = self.att_src(h).squeeze(-1)
        score_dst = self.att_dst(h).squeeze(-1)
        return attention_propagation(self.negative_slope)(h, score_src, score_dst, edge_index)  # type: ignore[no-any-return]

    # -- fixed-size ego neighbourhoods -------------------------------------------------
    def forward_ego(self, x: Tensor, mask: Tensor) -> Tensor:
        """Output for the centre of each neighbourhood.

        Parameters
        ----------
        x
            ``[B, 1 + k, in_channels]``; position 0 is the centre cell, then its neighbours.
        mask
            ``[B, 1 + k]`` bool, False where a neighbour slot is padding.
        """
        h = self.lin(x)  # [B, n, out]; the bias sums to one copy because weights sum to 1
        scores = self.att_src(h).squeeze(-1) + self.att_dst(h[:, :1]).squeeze(-1)
        scores = F.leaky_relu(scores, self.negative_slope)
        scores = scores.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(scores, dim=1)
        return torch.einsum("bn,bnc->bc", alpha, h)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads=1)"
