"""The Novae niche encoder (``model.encoder: novae``): niches, equality with novae's own
model on the same weights, the folder novae opens and the training loop. A federated run,
with every message it sends inspected, is in tests/test_messages.py.

Tests that need the optional package novae (``fedspatial[fm]``) are skipped without it.
"""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch
from scipy import sparse

from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.graph.niches import (
    build_niches,
    hops_exactly,
    hops_within,
    symmetric_adjacency,
)
from fedspatial.shared.graph.section_graph import knn_neighbors

needs_novae = pytest.mark.skipif(importlib.util.find_spec("novae") is None, reason="needs novae (pip install 'fedspatial[fm]')")
TINY = {"embedding_size": 8, "hidden_size": 8, "num_layers": 2, "output_size": 6, "heads": 2, "num_prototypes": 10}


def _path_graph(n: int) -> sparse.csr_matrix:
    """0 - 1 - 2 - ... - (n-1), unit weights."""
    nbr = np.full((n, 2), -1)
    nbr[1:, 0] = np.arange(n - 1)
    nbr[:-1, 1] = np.arange(1, n)
    coords = np.stack([np.arange(n, dtype=float), np.zeros(n)], axis=1)
    return symmetric_adjacency(nbr, coords, [("s", 0, n)])


def test_hops_on_a_path_graph_by_hand():
    adj = _path_graph(5)
    within = hops_within(adj, 2).toarray()
    assert within[0].tolist() == [True, True, True, False, False]
    assert within[2].tolist() == [True, True, True, True, True]
    exact = hops_exactly(adj, 2).toarray()
    assert exact[0].tolist() == [False, False, True, False, False]
    assert exact[2].tolist() == [True, False, False, False, True]
    assert hops_exactly(adj, 1).toarray()[1].tolist() == [True, False, True, False, False]


def test_edge_lengths_are_in_units_of_the_sections_median_edge():
    nbr = np.array([[1], [0], [3], [2]])
    coords = np.array([[0.0, 0.0], [3.0, 4.0], [100.0, 0.0], [100.0, 2.0]])  # section 2 is 2.5x denser
    adj = symmetric_adjacency(nbr, coords, [("a", 0, 2), ("b", 2, 4)])
    assert adj[0, 1] == adj[1, 0] == pytest.approx(1.0) and adj[2, 3] == pytest.approx(1.0)
    assert adj[1, 2] == 0  # never across sections


def test_a_batch_of_niches_is_each_niche_subgraph_and_nothing_between_them():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 10, size=(80, 2))
    x = torch.from_numpy(rng.normal(size=(80, 5)).astype(np.float32))
    niches = build_niches(x, knn_neighbors(coords, 4), coords, [("s", 0, 80)])
    centres = np.array([3, 17, 3, 60])
    batch = niches.gather(centres)
    assert batch.num_graphs == 4 and batch.ptr[-1] == len(batch.x)
    for b, centre in enumerate(centres):
        nodes = niches.local[centre].indices
        lo, hi = int(batch.ptr[b]), int(batch.ptr[b + 1])
        assert torch.equal(batch.x[lo:hi], x[nodes])
        sub = niches.adjacency[nodes][:, nodes].toarray()
        mine = np.zeros_like(sub)
        inside = (batch.edge_index[0] >= lo) & (batch.edge_index[0] < hi)
        e = batch.edge_index[:, inside].numpy() - lo
        mine[e[0], e[1]] = batch.edge_attr[inside, 0].numpy()
        np.testing.assert_allclose(mine, sub, rtol=1e-6)
    same = batch.batch[batch.edge_index[0]] == batch.batch[batch.edge_index[1]]
    assert bool(same.all())


@needs_novae
def test_niches_and_views_equal_novaes_own_adjacencies():
    from novae.data.dataset import _to_adjacency_local, _to_adjacency_view

    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 10, size=(120, 2))
    adj = symmetric_adjacency(knn_neighbors(coords, 5), coords, [("s", 0, 120)])
    for hops in (1, 2, 3):
        theirs_local = _to_adjacency_local(adj, hops) != 0
        assert (hops_within(adj, hops) != theirs_local).nnz == 0
        theirs_view = _to_adjacency_view(adj, hops) != 0
        assert (hops_exactly(adj, hops) != theirs_view).nnz == 0


def _niches(n: int = 150, genes: int = 12, seed: int = 0, sections=None):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 20, size=(n, 2))
    x = torch.from_numpy(rng.normal(size=(n, genes)).astype(np.float32))
    sections = sections or [("s", 0, n)]
    nbr = np.concatenate([knn_neighbors(coords[a:b], 5) + a for _, a, b in sections])
    return build_niches(x, nbr, coords, sections), sections


@needs_novae
@pytest.mark.parametrize("training", [False, True])
def test_forward_equals_novaes_on_the_same_weights(training):
    import novae

    from fedspatial.shared.models.novae_encoder import NovaeEncoder

    genes = [f"Gene{i}" for i in range(12)]
    torch.manual_seed(0)
    ours = NovaeEncoder(genes, **TINY)
    theirs = novae.Novae(adata=None, var_names=genes, **TINY)
    theirs.load_state_dict(ours.state_dict())
    niches, _ = _niches()
    batch = niches.gather(np.arange(0, 150, 7))
    ours.train(training)
    theirs.train(training)
    torch.manual_seed(5)  # augmentation (training) draws from torch's generator: same draws for both
    z_ours = ours.encode(batch)
    torch.manual_seed(5)
    z_theirs = theirs({"main": ours.pyg_batch(batch)})["main"]
    assert z_ours.shape == (len(range(0, 150, 7)), TINY["output_size"])
    assert torch.equal(z_ours, z_theirs)


@needs_novae
def test_the_model_folder_opens_with_novae_and_with_fedspatial(tmp_path):
    import novae

    from fedspatial.shared.models.novae_encoder import NovaeEncoder
    from fedspatial.shared.storage.checkpoint import load_checkpoint, save_checkpoint
    from fedspatial.shared.storage.novae_folder import write_novae_config

    torch.manual_seed(0)
    model = NovaeEncoder([f"g{i}" for i in range(12)], **TINY)
    save_checkpoint(tmp_path, model.state_dict(), {"model": model.model_config()})
    write_novae_config(tmp_path, model.model_config())
    loaded = novae.Novae.from_pretrained(str(tmp_path))
    ours, _ = load_checkpoint(tmp_path)
    niches, _ = _niches()
    batch = niches.gather(np.arange(40))
    model.eval(), ours.eval(), loaded.eval()
    with torch.no_grad():
        expected = model.encode(batch)
        assert torch.equal(ours.encode(batch), expected)
        assert torch.equal(loaded({"main": model.pyg_batch(batch)})["main"], expected)
    assert loaded.cell_embedder.gene_names == model.genes


@needs_novae
def test_a_round_is_reproducible_and_freezes_the_prototypes_during_warm_up():
    from fedspatial.shared.models.novae_encoder import NovaeEncoder
    from fedspatial.shared.training.novae_loop import train_novae

    niches, sections = _niches()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = NovaeEncoder([f"g{i}" for i in range(12)], **TINY)
        prototypes = model.swav_head._prototypes.detach().clone()
        result = train_novae(model, niches, sections, steps=3, batch_size=16, lr=1e-2, seed=7, train_prototypes=False)
        assert (result.steps, result.num_examples) == (3, 48) and np.isfinite(result.loss)
        assert torch.allclose(model.swav_head._prototypes, prototypes / prototypes.norm(dim=1, keepdim=True))
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    torch.manual_seed(0)
    model = NovaeEncoder([f"g{i}" for i in range(12)], **TINY)
    train_novae(model, niches, sections, steps=3, batch_size=16, lr=1e-2, seed=7)
    assert not torch.equal(model.state_dict()["encoder.gnn.convs.0.att"], states[0]["encoder.gnn.convs.0.att"])


@needs_novae
def test_the_slide_queue_stays_at_the_site():
    from fedspatial.shared.models.novae_encoder import NovaeEncoder
    from fedspatial.shared.training.novae_loop import SiteQueue, train_novae

    niches, sections = _niches(sections=[("a", 0, 70), ("b", 70, 150)])
    torch.manual_seed(0)
    model = NovaeEncoder([f"g{i}" for i in range(12)], **TINY)
    queue = SiteQueue(["a", "b"])
    train_novae(model, niches, sections, steps=4, batch_size=16, seed=0, queue=queue)
    assert queue.values is not None and queue.values.shape[:1] == (2,)
    assert "swav_head.queue" in model.state_dict() and "swav_head.queue" not in model.shared_state()
    fresh = NovaeEncoder([f"g{i}" for i in range(12)], **TINY)
    fresh.load_shared_state(model.shared_state())  # what the server sends back: no queue
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


@needs_novae
def test_genes_that_collide_when_lowercased_are_refused():
    from fedspatial.shared.models.novae_encoder import NovaeEncoder

    with pytest.raises(ValueError, match="'ACTB' and 'Actb' are the same gene"):
        NovaeEncoder(["Actb", "ACTB", "Gapdh"], **TINY)


def test_without_novae_the_error_says_how_to_install_it(monkeypatch):
    import importlib

    from fedspatial.shared.models import novae_encoder

    def missing(name, *args):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"fedspatial\[fm\]"):
        novae_encoder.NovaeEncoder(["a", "b"])


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"features": {"n-pcs": 10}}, "features.n-pcs to 0"),
        ({"model": {"encoder": "novae", "batch": "section"}, "features": {}}, "model.batch to none"),
        ({"privacy": {"local-dp": True}}, "not trained under privacy.local-dp"),
        ({"novae": {"novae-panel-subset": 0.0}}, "novae-panel-subset"),
    ],
)
def test_settings_novae_cannot_run_with_are_refused_before_the_run(sections, message):
    raw = {"run-name": "t", "model": {"encoder": "novae"}, **sections}
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict(raw)


def test_the_learning_rate_follows_novaes_schedule_with_rounds_for_epochs():
    from fedspatial.shared.training.novae_loop import novae_lr

    lrs = [novae_lr(1.0, r, 12) for r in range(1, 13)]
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.55) and lrs[2] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(lrs[2:])) and lrs[-1] > 0.01
    assert novae_lr(1.0, 40, 12) == pytest.approx(0.01)  # past the last round: the floor


@needs_novae
def test_the_gene_embeddings_start_from_the_given_pca_axes():
    from fedspatial.shared.phases.novae_training import novae_model

    cfg = ExperimentConfig.from_dict({"run-name": "t", "model": {"encoder": "novae"}})
    axes = np.random.default_rng(0).normal(size=(150, 100)).astype(np.float32)
    model = novae_model(cfg, [f"g{i}" for i in range(150)], axes)
    assert np.array_equal(model.cell_embedder.embedding.weight.detach().numpy(), axes)
    with pytest.raises(ValueError, match="shape"):
        novae_model(cfg, [f"g{i}" for i in range(150)], axes[:, :50])


@needs_novae
@pytest.mark.parametrize("query", ["train", "evaluate"])
def test_a_site_under_local_dp_refuses_novae_whatever_the_server_sends(query):
    """Config validation refuses novae with local DP; a site whose own settings have local DP
    on refuses a novae message too, before touching its cells."""
    import json as _json
    from types import SimpleNamespace

    from fedspatial.shared.models.novae_encoder import NovaeEncoder
    from fedspatial.shared.phases.training import Training
    from fedspatial.shared.protocol.names import Query
    from fedspatial.shared.protocol.payload import Payload

    cfg = ExperimentConfig.from_dict({"run-name": "t"})
    cfg.privacy.local_dp = True  # the site's own settings (its policy may require it)
    site = SimpleNamespace(cfg=cfg, name="hospital_a", setup=lambda: pytest.fail("the site read its data"))
    model = NovaeEncoder([f"g{i}" for i in range(12)], **TINY)
    request = Payload(
        arrays={k: v.numpy() for k, v in model.shared_state().items()},
        config={"model-config": _json.dumps(model.model_config()), "server-round": 1, "seed": 0},
    )
    with pytest.raises(PermissionError, match="local-dp"):
        Training().answer(site, Query.TRAIN if query == "train" else Query.EVALUATE, request)
