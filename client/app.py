"""fedspatial ClientApp: a thin adapter between Flower messages and local training.

Each handler reads its inputs from the message, calls plain functions from
``fedspatial.shared`` on the site's private data and replies with model arrays,
aggregates or metrics only; no per-cell data ever leaves the site.

Message types: ``query.describe``, ``query.feature_stats``, ``query.setup``, ``train``, ``evaluate``,
``query.embed``, ``query.cluster_stats``, ``query.finalize``.
"""

from __future__ import annotations

import logging
import time

import torch  # noqa: F401  # imported first: ArrayRecord.to_torch_state_dict needs torch loaded
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedspatial.client import site_runtime as rt
from fedspatial.client.payload import arrays_record, config_number, config_strings, record_arrays

logger = logging.getLogger(__name__)
app = ClientApp()


def _reply(msg: Message, *, arrays: ArrayRecord | None = None, config: dict | None = None,
           metrics: dict | None = None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays
    if config is not None:
        content["config"] = ConfigRecord(config)
    content["metrics"] = MetricRecord(metrics or {})
    return Message(content=content, reply_to=msg)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Section names, cell count, feature names and label names of this site."""
    site = rt.site_for(msg, context)
    info = site.describe()
    return _reply(msg, config=info.config, metrics={"num-examples": info.n_cells})


@app.query("feature_stats")
def feature_stats(msg: Message, context: Context) -> Message:
    """Per-feature sums over the shared features (harmonization input)."""
    site = rt.site_for(msg, context)
    cfg = msg.content["config"]
    stats = site.feature_stats(config_strings(cfg, "features"), target_sum=config_number(cfg, "target-sum"))
    return _reply(msg, arrays=arrays_record(stats.to_arrays()), metrics={"num-examples": stats.n_cells})


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Keep the federation's feature space at the site for the rest of the run."""
    site = rt.site_for(msg, context)
    rt.store_setup(context, msg.content["config"])
    data = site.graph_data(rt.setup_of(context))  # prepare now: later rounds reuse it
    return _reply(msg, metrics={"num-examples": data.n_cells})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs of the spatial autoencoder from the global weights."""
    site = rt.site_for(msg, context)
    cfg = msg.content["config"]
    model = rt.model_from_message(msg)
    start = time.perf_counter()
    result = site.train(model, rt.setup_of(context), seed=rt.round_seed(context, cfg))
    metrics = {
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-steps": result.steps,
        "train-seconds": time.perf_counter() - start,
    }
    return _reply(msg, arrays=ArrayRecord(model.state_dict()), metrics=metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Reconstruction loss of the global model on this site's cells."""
    site = rt.site_for(msg, context)
    model = rt.model_from_message(msg)
    loss = site.evaluate(model, rt.setup_of(context))
    return _reply(msg, metrics={"num-examples": site.n_cells, "eval-loss": loss})


@app.query("embed")
def embed(msg: Message, context: Context) -> Message:
    """Embed every cell with the final model (kept at the site) and propose k-means
    centroids for initialization (cluster-level sums only)."""
    site = rt.site_for(msg, context)
    model = rt.model_from_message(msg)
    cfg = msg.content["config"]
    proposal = site.embed_and_propose(model, rt.setup_of(context), int(config_number(cfg, "n-domains")), context)
    return _reply(msg, arrays=arrays_record(proposal), metrics={"num-examples": site.n_cells})


@app.query("cluster_stats")
def cluster_stats(msg: Message, context: Context) -> Message:
    """Per-cluster sums, counts and inertia for the server's centroids."""
    site = rt.site_for(msg, context)
    arrays = record_arrays(msg.content["arrays"])
    stats = site.cluster_stats(arrays["centroids"], arrays.get("previous"), context)
    return _reply(msg, arrays=arrays_record(stats.to_arrays()), metrics={"num-examples": site.n_cells})


@app.query("finalize")
def finalize(msg: Message, context: Context) -> Message:
    """Assign domains, write the annotated sections and plots at the site, and return
    scores and label x domain counts."""
    site = rt.site_for(msg, context)
    arrays = record_arrays(msg.content["arrays"])
    report, tables = site.finalize(arrays["centroids"], msg.content["config"], rt.setup_of(context), context)
    return _reply(
        msg,
        arrays=arrays_record(tables),
        config={"report": report},
        metrics={"num-examples": site.n_cells},
    )
