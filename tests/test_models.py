import numpy as np
import pytest
import torch

from fedspatial.shared.graph.neighbors import knn_neighbors
from fedspatial.shared.models import GATAutoencoder, NeighbourhoodAttention, build_model
from fedspatial.shared.training.loop import GraphData, embed, evaluate_loss, train_epochs


def _grid_data(n_side=5, n_features=7, k=4, seed=0):
    rng = np.random.default_rng(seed)
    coords = np.array([(i, j) for i in range(n_side) for j in range(n_side)], dtype=float)
    nbr = knn_neighbors(coords, k)
    x = torch.from_numpy(rng.normal(size=(len(coords), n_features)).astype(np.float32))
    return GraphData(x=x, neighbors=torch.from_numpy(nbr), sections=[("s", 0, len(coords))])


def test_attention_on_hand_checkable_neighbourhood():
    # Zero attention vectors -> uniform weights over self + neighbours: output is the mean of W x.
    layer = NeighbourhoodAttention(2, 2)
    with torch.no_grad():
        layer.lin.weight.copy_(torch.eye(2))
        layer.lin.bias.zero_()
        layer.att_src.weight.zero_()
        layer.att_dst.weight.zero_()
    x = torch.tensor([[[0.0, 0.0], [2.0, 4.0], [4.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, True, False]])  # last slot is padding
    out = layer.forward_ego(x, mask)
    assert torch.allclose(out, torch.tensor([[2.0, 2.0]]))
    # Same neighbourhood as a graph: node 0 receives from 1 and 2.
    edge_index = torch.tensor([[1, 2], [0, 0]])
    out_graph = layer(x[0, :3], edge_index)
    assert torch.allclose(out_graph[0], out[0])


def test_ego_path_equals_pyg_path():
    torch.manual_seed(0)
    data = _grid_data()
    model = GATAutoencoder(7, hidden_dim=8, latent_dim=3).eval()
    idx = torch.arange(data.n_cells)
    x, mask = data.ego(idx)
    z_ego = model.encode_ego(x, mask)
    z_graph = model.embed_graph(data.x, data.edge_index(0, data.n_cells))
    assert torch.allclose(z_ego, z_graph, atol=1e-5)
    assert np.allclose(embed(model, data), z_graph.detach().numpy(), atol=1e-6)


def test_padding_is_ignored():
    torch.manual_seed(0)
    model = GATAutoencoder(3, hidden_dim=4, latent_dim=2).eval()
    x = torch.randn(1, 3, 3)
    mask = torch.tensor([[True, True, False]])
    z1 = model.encode_ego(x, mask)
    x2 = x.clone()
    x2[0, 2] = 1e6  # garbage in a padded slot changes nothing
    assert torch.allclose(z1, model.encode_ego(x2, mask))


def test_training_reduces_loss_and_is_reproducible():
    data = _grid_data(n_side=8, n_features=6)
    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        model = GATAutoencoder(6, hidden_dim=16, latent_dim=4)
        before = evaluate_loss(model, data)
        result = train_epochs(model, data, epochs=20, batch_size=16, lr=1e-2, seed=3)
        after = evaluate_loss(model, data)
        assert after < 0.8 * before
        assert result.num_examples == data.n_cells and result.steps == 20 * 4
        losses.append(after)
    assert losses[0] == losses[1]


def test_model_config_round_trip_and_repr():
    model = GATAutoencoder(10, hidden_dim=12, latent_dim=5, n_batches=3)
    clone = build_model(model.model_config())
    assert repr(clone) == repr(model) == "GATAutoencoder(in_dim=10, hidden_dim=12, latent_dim=5, n_batches=3)"
    assert "NeighbourhoodAttention(10, 12" in repr(model.attention)
    with pytest.raises(ValueError):
        build_model({"kind": "nope"})


def test_reset_parameters_restores_initial_distribution():
    torch.manual_seed(0)
    model = GATAutoencoder(4)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    model.reset_parameters()
    assert not torch.all(model.attention.lin.weight == 3.0)
    assert torch.all(model.attention.lin.bias == 0.0)


def test_training_path_does_not_import_torch_geometric():
    """Every deployed message starts a ClientApp process: torch-geometric (seconds to import)
    is loaded only by whole-graph embedding, matplotlib only by plotting."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "import fedspatial.client.app\n"
        "from fedspatial.shared.models import GATAutoencoder\n"
        "m = GATAutoencoder(4, hidden_dim=4, latent_dim=2)\n"
        "m.loss(torch.randn(3, 2, 4), torch.ones(3, 2, dtype=torch.bool)).mean().backward()\n"
        "print('torch_geometric' in sys.modules, 'matplotlib' in sys.modules)\n"
        "m.embed_graph(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]))\n"
        "print('torch_geometric' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["False", "False", "True"]
