"""Novae niche encoder (foundation-model family), built from novae's own modules.

Novae (Blampey et al., Nat Methods 2025; pip ``novae``) embeds a cell's spatial niche:
each cell becomes a token ``x @ normalize(W E_genes)`` over a gene-embedding table (any
panel maps into one vocabulary), a GATv2 stack runs over the niche subgraph, attention
pooling gives the niche's representation, and a SwAV head trains it self-supervised
(a niche and a nearby "view" must fall on the same prototypes). This class holds
novae's ``CellEmbedder``, ``GraphEncoder``, ``GraphAugmentation`` and ``SwavHead`` under
novae's own attribute names, so that its weights load into ``novae.Novae`` unchanged
(:mod:`fedspatial.shared.storage.novae_folder` writes a folder ``Novae.from_pretrained``
opens); fedspatial's loop trains it (:mod:`fedspatial.shared.training.novae_loop`).

novae is the optional extra ``fedspatial[fm]``: importing this module does not import
it; building a model does, and says how to install it when it is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from fedspatial.shared.graph.niches import NicheBatch

LOCAL_STATE = ("swav_head.queue",)
"""State that stays at the site: novae's per-slide prototype queue (never averaged)."""

FULL = {"embedding_size": 100, "hidden_size": 128, "num_layers": 10, "output_size": 64, "heads": 8, "num_prototypes": 512}
"""novae's own default architecture (``novae.Novae()``): ~16 niche pairs/s on 2 CPU cores."""

SMALL = {"embedding_size": 100, "hidden_size": 64, "num_layers": 3, "output_size": 64, "heads": 4, "num_prototypes": 256}
"""The federated default: 3 GATv2 layers of width 64 (see README "Foundation-model encoder")."""

PRESETS = {"small": SMALL, "full": FULL}


def import_novae() -> Any:
    """The ``novae`` package, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("novae")
    except ImportError as err:
        raise ImportError(
            "model.encoder 'novae' needs the optional package novae: pip install 'fedspatial[fm]' "
            "(or `make install-fm`)"
        ) from err


def vocabulary(features: list[str]) -> list[str]:
    """Novae's gene names for ``features``: lowercased, in the given order; raises when two
    features become the same name (novae matches genes case-insensitively)."""
    genes = [f.lower() for f in features]
    if len(set(genes)) != len(genes):
        seen: dict[str, str] = {}
        clash = next((f, seen[g]) for f, g in zip(features, genes, strict=True) if seen.setdefault(g, f) != f)
        raise ValueError(f"features {clash[0]!r} and {clash[1]!r} are the same gene to novae (it lowercases names)")
    return genes


class NovaeEncoder(nn.Module):
    """Novae's niche encoder and SwAV head over a fixed gene vocabulary.

    Parameters
    ----------
    genes
        The vocabulary: one name per model input feature, in input order (lowercased).
    embedding_size, hidden_size, num_layers, output_size, heads, num_prototypes
        novae's architecture arguments (defaults: :data:`SMALL`; novae's are :data:`FULL`).
    temperature
        SwAV cross-entropy temperature (novae: 0.1).
    panel_subset_size, background_noise_lambda, sensitivity_noise_std
        novae's augmentation: the fraction of genes kept, the exponential background and
        the multiplicative noise (novae: 0.8, 8.0, 0.05).
    """

    kind = "novae"
    gene_index: Tensor
    """``[1, G]`` buffer: the vocabulary row of each input feature (all of them, in order)."""

    def __init__(
        self,
        genes: list[str],
        *,
        embedding_size: int = SMALL["embedding_size"],
        hidden_size: int = SMALL["hidden_size"],
        num_layers: int = SMALL["num_layers"],
        output_size: int = SMALL["output_size"],
        heads: int = SMALL["heads"],
        num_prototypes: int = SMALL["num_prototypes"],
        temperature: float = 0.1,
        panel_subset_size: float = 0.8,
        background_noise_lambda: float = 8.0,
        sensitivity_noise_std: float = 0.05,
    ) -> None:
        super().__init__()
        novae = import_novae()
        if hidden_size % heads:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of heads {heads}")
        self.genes = vocabulary(genes)
        self.args: dict[str, Any] = {
            "embedding_size": embedding_size, "hidden_size": hidden_size, "num_layers": num_layers,
            "output_size": output_size, "heads": heads, "num_prototypes": num_prototypes,
            "temperature": temperature, "panel_subset_size": panel_subset_size,
            "background_noise_lambda": background_noise_lambda, "sensitivity_noise_std": sensitivity_noise_std,
        }
        self.latent_dim = output_size
        module = novae.module
        self.cell_embedder = module.CellEmbedder(self.genes, embedding_size)
        self.encoder = module.GraphEncoder(embedding_size, hidden_size, num_layers, output_size, heads, 50)
        self.augmentation = module.GraphAugmentation(
            panel_subset_size, background_noise_lambda, sensitivity_noise_std, 0.0, use_repr=False
        )
        self.swav_head = module.SwavHead(novae.utils.Mode(), output_size, num_prototypes, temperature)
        self.register_buffer("gene_index", torch.arange(len(self.genes)).unsqueeze(0), persistent=False)

    def model_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "genes": list(self.genes), **self.args}

    def pyg_batch(self, niches: NicheBatch) -> Any:
        """The niches as the torch-geometric ``Batch`` novae's modules read."""
        from torch_geometric.data import Batch

        genes = self.gene_index.expand(niches.num_graphs, -1)
        return Batch(
            x=niches.x.clone(), edge_index=niches.edge_index, edge_attr=niches.edge_attr,
            batch=niches.batch, ptr=niches.ptr, genes_indices=genes,
        )

    def encode(self, niches: NicheBatch) -> Tensor:
        """Representations ``[B, output_size]`` of ``B`` niches (augmented while training,
        as ``novae.Novae.forward`` does)."""
        data = self.pyg_batch(niches)
        if self.training:
            data = self.augmentation(data)
        return self.encoder(self.cell_embedder(data))  # type: ignore[no-any-return]

    def swav_loss(self, main: NicheBatch, view: NicheBatch, slide_id: str | None = None) -> Tensor:
        """novae's SwAV loss of niches and their views (``slide_id`` picks the slide's
        prototypes once the site's queue is initialized)."""
        loss, _ = self.swav_head(self.encode(main), self.encode(view), slide_id)
        return loss  # type: ignore[no-any-return]

    def shared_state(self) -> dict[str, Tensor]:
        """The state that travels and is averaged: everything but :data:`LOCAL_STATE`."""
        return {k: v for k, v in self.state_dict().items() if k not in LOCAL_STATE}

    def load_shared_state(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`shared_state` (the site's own queue, if any, is kept)."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in LOCAL_STATE]
        if missing or unexpected:
            raise KeyError(f"novae weights do not match the model: missing {missing}, unexpected {unexpected}")
