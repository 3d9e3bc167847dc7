"""The torch-geometric half of :class:`NeighbourhoodAttention` (whole-graph inference).

Kept apart so that importing the models (and training them: the ego path needs plain
torch only) does not import torch-geometric, which costs a deployed ClientApp process
seconds per message. Imported on the first whole-graph forward pass.
"""

from __future__ import annotations

from functools import cache

import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import add_self_loops, remove_self_loops, softmax


class AttentionPropagation(MessagePassing):
    """GAT-style message passing with precomputed projections and attention scores.

    Holds no parameters: :class:`NeighbourhoodAttention` computes ``h = W x`` and the
    scores with its own ``nn.Linear`` modules and hands them in.
    """

    def __init__(self, negative_slope: float) -> None:
        super().__init__(aggr="add", node_dim=0)
        self.negative_slope = negative_slope

    def forward(self, h: Tensor, score_src: Tensor, score_dst: Tensor, edge_index: Tensor) -> Tensor:  # type: ignore[override]
        """``sum_j alpha_ij h_j`` over the in-neighbours of each node and itself."""
        edge_index, _ = remove_self_loops(edge_index)
        edge_index, _ = add_self_loops(edge_index, num_nodes=h.size(0))
        return self.propagate(edge_index, h=h, score_src=score_src, score_dst=score_dst)  # type: ignore[no-any-return]

    def message(  # type: ignore[override]
        self,
        h_j: Tensor,
        score_src_j: Tensor,
        score_dst_i: Tensor,
        index: Tensor,
        ptr: Tensor | None,
        size_i: int | None,
    ) -> Tensor:
        alpha = F.leaky_relu(score_src_j + score_dst_i, self.negative_slope)
        alpha = softmax(alpha, index, ptr, size_i)
        return alpha.unsqueeze(-1) * h_j


@cache
def attention_propagation(negative_slope: float) -> AttentionPropagation:
    """One shared (parameter-free) propagation module per slope."""
    return AttentionPropagation(negative_slope)
