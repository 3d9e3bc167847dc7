"""Phase ``embedding``: every site embeds all its cells with the final global model and
keeps the embedding at home; it returns only a local k-means proposal (centroids,
counts) and the embedding's per-dimension moments, which start the domain clustering
(under local DP nothing: DP k-means starts without them). With the per-cell encoder the
site then smooths the embedding over each cell's spatial neighbours (the niche enters
after training; :mod:`fedspatial.shared.algorithms.smoothing`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

import fedspatial.shared.phases.novae_training as novae_training
from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.models.novae_encoder import NovaeEncoder
from fedspatial.shared.phases.base import Federation, Phase, Run, Site, SiteState
from fedspatial.shared.phases.training import model_from, resolved_encoder, training_data
from fedspatial.shared.protocol.names import (
    EVALUATE_RECEIVED,
    NUM_EXAMPLES,
    RECEIVED_EVAL_LOSS,
    Query,
)
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.training.loop import embed, evaluate_loss

EMBEDDING_KEY = "fedspatial-embedding"
UNCORRECTED = "z-uncorrected"
"""Array of the embedding record holding the embedding before Harmony corrected it."""
PER_CELL = "z-cell"
"""Array of the embedding record holding the per-cell encoder's embedding of each cell
alone, scaled to unit length (the spatially smoothed one is ``z``): what DP k-means sums,
because one cell changes only its own row of it."""


def store_embedding(
    state: SiteState, z: np.ndarray, uncorrected: np.ndarray | None = None, *, per_cell: np.ndarray | None = None
) -> None:
    arrays = {"z": z}
    if uncorrected is not None:
        arrays[UNCORRECTED] = uncorrected
    if per_cell is not None:
        arrays[PER_CELL] = per_cell
    state.put(EMBEDDING_KEY, Payload(arrays=arrays))


def per_cell_embedding_of(state: SiteState) -> np.ndarray:
    """The per-cell encoder's unit-length embedding of each cell alone (see :data:`PER_CELL`)."""
    stored = state.get(EMBEDDING_KEY)
    if stored is None or PER_CELL not in stored.arrays:
        raise RuntimeError("no per-cell embedding at this site: DP k-means needs model.encoder 'cell'")
    return stored.array(PER_CELL)


def embedding_of(state: SiteState) -> np.ndarray:
    """The site's embedding (corrected, once Harmony ran)."""
    stored = state.get(EMBEDDING_KEY)
    if stored is None:
        raise RuntimeError("no embedding at this site: the server must send query.embed first")
    return stored.array("z")


def uncorrected_embedding(state: SiteState) -> np.ndarray | None:
    """The embedding before Harmony (None when Harmony has not replaced it)."""
    stored = state.get(EMBEDDING_KEY)
    return None if stored is None else stored.arrays.get(UNCORRECTED)


def propose_domains(z: np.ndarray, n_domains: int, seed: int) -> dict[str, np.ndarray]:
    """A site's k-means proposal of its embedding, with the moments that scale it."""
    centroids, counts = clustering.local_kmeans(z, n_domains, seed=seed)
    moments = clustering.feature_moments(z).to_arrays()
    return {"centroids": centroids, "counts": counts.astype(np.float64), **{f"moments-{k}": v for k, v in moments.items()}}


class Embedding(Phase):
    name = "embedding"
    queries = (Query.EMBED,)

    def run(self, fed: Federation, run: Run) -> None:
        assert run.training is not None
        request = Payload(arrays=run.training.weights, config={
            **run.message_config(), "n-domains": run.cfg.clustering.n_domains,
            EVALUATE_RECEIVED: int(not run.cfg.privacy.local_dp),
        })
        replies = fed.ask(Query.EMBED, request)
        # under local DP the sites propose nothing: DP k-means starts from public centres
        run.proposals = {site: reply.arrays for site, reply in replies.items() if reply.arrays}
        record_final_eval_loss(run, replies)

    def answer(self, site: Site, query: str, request: Payload) -> Payload:
        setup = site.setup()
        model = model_from(request)
        evaluate = bool(request.number(EVALUATE_RECEIVED, 0)) and not site.cfg.privacy.local_dp  # an unprivatized statistic
        metrics: dict[str, int | float] = {NUM_EXAMPLES: site.n_cells}
        if isinstance(model, NovaeEncoder):
            z, loss = novae_training.embed_answer(site, model, evaluate=evaluate)
            if loss is not None:
                metrics[RECEIVED_EVAL_LOSS] = loss
        else:
            data = training_data(site, setup)
            if evaluate:
                metrics[RECEIVED_EVAL_LOSS] = evaluate_loss(model, data)
            z = embed(model, data)
        if resolved_encoder(site.cfg) == "cell":  # the niche enters here, at the site, after training
            from fedspatial.shared.algorithms.smoothing import (
                smooth_embedding,  # TEMP lazy until it lands
            )
            per_cell = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
            z = smooth_embedding(per_cell, site.graph_data(setup).neighbors.numpy())
            store_embedding(site.state, z, per_cell=per_cell)
        else:
            store_embedding(site.state, z)
        if site.cfg.privacy.local_dp:  # a local k-means proposal is not private: nothing leaves
            return Payload(metrics=metrics)
        proposal = propose_domains(z, int(request.number("n-domains")), site.cfg.seed)
        return Payload(arrays=proposal, metrics=metrics)


def record_final_eval_loss(run: Run, replies: Mapping[str, Payload]) -> None:
    """The last round's ``eval-loss`` from the sites' losses of the final model (weighted
    as the training rounds weight the sites: by cells, or equally under central DP)."""
    assert run.training is not None
    history = run.training.history
    losses = [(r.metrics[RECEIVED_EVAL_LOSS], r.metrics.get(NUM_EXAMPLES, 0)) for r in replies.values()
              if RECEIVED_EVAL_LOSS in r.metrics]
    if not history or not losses or history[-1].get("eval-loss") is not None:
        return
    weights = [1.0 if run.cfg.privacy.central_dp != "none" else float(n) for _, n in losses]
    if sum(weights) > 0:
        history[-1]["eval-loss"] = float(sum(loss * w for (loss, _), w in zip(losses, weights, strict=True)) / sum(weights))
