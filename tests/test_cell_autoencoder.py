"""The per-cell autoencoder (issue 13) and the loops on per-cell data (zero-width neighbourhoods)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedspatial.shared.graph.neighbors import knn_neighbors
from fedspatial.shared.models import (
    CellAutoencoder,
    GATAutoencoder,
    SpatialEncoderModel,
    build_model,
)
from fedspatial.shared.privacy.dp import LinearGhostClipping, validate_model
from fedspatial.shared.training.loop import (
    GraphData,
    embed,
    evaluate_loss,
    per_cell_data,
    train_epochs,
)


def _grid_data(n_side=6, n_features=5, k=4, seed=0, n_batches=0):
    rng = np.random.default_rng(seed)
    coords = np.array([(i, j) for i in range(n_side) for j in range(n_side)], dtype=float)
    x = torch.from_numpy(rng.normal(size=(len(coords), n_features)).astype(np.float32))
    batch = torch.from_numpy(rng.integers(0, n_batches, len(coords))) if n_batches else None
    return GraphData(x, torch.from_numpy(knn_neighbors(coords, k)), [("s", 0, len(coords))], batch)


def _identity_model(bias_out=0.0):
    """2 features, identity encoder and decoder: ELU is the identity on positive inputs."""
    model = CellAutoencoder(2, hidden_dim=2, latent_dim=2, n_batches=2)
    with torch.no_grad():
        for lin in (model.encoder_in, model.to_latent, model.decoder_in, model.decoder_out):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        model.decoder_out.bias.fill_(bias_out)
    return model.eval()


def test_hand_checkable_reconstruction_and_loss():
    model = _identity_model(bias_out=1.0)
    x = torch.tensor([[[1.0, 2.0], [50.0, -7.0]], [[3.0, 0.5], [0.0, 0.0]]])  # [B=2, 1 + k=1, F=2]
    mask = torch.tensor([[True, True], [True, False]])
    assert torch.equal(model.encode_ego(x, mask), x[:, 0])  # the neighbour (slot 1) is never read
    assert torch.equal(model(x, mask), x[:, 0] + 1.0)
    assert torch.allclose(model.loss(x, mask), torch.tensor([1.0, 1.0]))  # mean over features of 1^2
    # Batch offsets enter the decoder only: the embedding is unchanged, the reconstruction moves.
    with torch.no_grad():
        model.batch_in.weight.copy_(torch.tensor([[0.0, 2.0], [0.0, 0.0]]))  # batch 1: +2 on hidden unit 0
    batch = torch.tensor([0, 1])
    assert torch.equal(model.encode_ego(x, mask), x[:, 0])
    assert torch.allclose(model.loss(x, mask, batch), torch.tensor([1.0, (3.0**2 + 1.0) / 2]))


def test_neighbours_and_edges_are_ignored():
    torch.manual_seed(0)
    model = CellAutoencoder(5, hidden_dim=8, latent_dim=3).eval()
    data = _grid_data()
    idx = torch.arange(data.n_cells)
    x, mask = data.ego(idx)
    z = model.encode_ego(x, mask)
    assert x.shape == (data.n_cells, 5, 5)
    assert torch.allclose(z, model.encode_ego(x[:, :1], mask[:, :1]))
    assert torch.allclose(z, model.embed_graph(data.x, data.edge_index(0, data.n_cells)))
    assert torch.allclose(model.loss(x, mask), model.loss(x[:, :1], mask[:, :1]))


def test_per_cell_data_has_zero_width_and_same_rows():
    data = _grid_data(n_batches=2)
    cells = per_cell_data(data)
    assert cells.neighbors.shape == (data.n_cells, 0) and cells.width == 0 and data.width == 4
    assert cells.x is data.x and cells.batch is data.batch and cells.sections == data.sections
    index = torch.tensor([5, 0, 7])
    x, mask = cells.ego(index)
    assert x.shape == (3, 1, 5) and torch.equal(x[:, 0], data.x[index]) and mask.all()
    assert cells.edge_index(0, cells.n_cells).shape == (2, 0)
    assert cells.ego(index[:0])[0].shape == (0, 1, 5)


def test_loops_on_per_cell_data_equal_loops_on_neighbourhoods():
    """Width 0 changes the work, not the result: training, loss and embedding of the cell
    model are the same on per-cell data as on the full ego neighbourhoods."""
    data = _grid_data(n_side=8, n_batches=2)
    out = []
    for d in (data, per_cell_data(data)):
        torch.manual_seed(1)
        model = CellAutoencoder(5, hidden_dim=16, latent_dim=3, n_batches=2)
        before = evaluate_loss(model, d)
        result = train_epochs(model, d, epochs=15, batch_size=16, lr=1e-2, seed=3)
        out.append((before, result, evaluate_loss(model, d), embed(model, d)))
    (b0, r0, a0, z0), (b1, r1, a1, z1) = out
    assert b0 == pytest.approx(b1) and r0.loss == pytest.approx(r1.loss, rel=1e-6) and a0 == pytest.approx(a1, rel=1e-6)
    assert np.allclose(z0, z1, atol=1e-6) and z1.shape == (data.n_cells, 3)
    assert a1 < 0.8 * b1 and r1.steps == 15 * 4


def test_config_round_trip_protocol_and_opacus_compatibility():
    model = CellAutoencoder(10, hidden_dim=12, latent_dim=5, n_batches=3, dropout=0.1)
    assert isinstance(model, SpatialEncoderModel)
    clone = build_model(model.model_config())
    assert type(clone) is CellAutoencoder and clone.model_config() == model.model_config()
    assert model.model_config()["kind"] == "cell_autoencoder"
    assert repr(clone) == "CellAutoencoder(in_dim=10, hidden_dim=12, latent_dim=5, n_batches=3)"
    assert type(build_model(GATAutoencoder(10).model_config())) is GATAutoencoder
    validate_model(model)  # no BatchNorm, no buffers
    assert LinearGhostClipping.supports(model)  # the single-pass DP-SGD engine applies
    with pytest.raises(ValueError):
        CellAutoencoder(0)


def test_reset_parameters_and_dropout_only_in_training():
    torch.manual_seed(0)
    model = CellAutoencoder(4, hidden_dim=6, latent_dim=2, n_batches=2, dropout=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    model.reset_parameters()
    assert not torch.all(model.encoder_in.weight == 3.0) and torch.all(model.encoder_in.bias == 0.0)
    assert torch.all(model.batch_in.weight == 0.0)  # no batch offset until trained
    x = torch.randn(8, 1, 4)
    mask = torch.ones(8, 1, dtype=torch.bool)
    model.eval()
    assert torch.equal(model.encode_ego(x, mask), model.encode_ego(x, mask))
    model.train()
    assert not torch.equal(model.encode_ego(x, mask), model.encode_ego(x, mask))
