"""fedspatial ClientApp: a thin adapter between Flower messages and local training.

Each handler reads its inputs from the message, calls plain functions from
``fedspatial.shared`` on the site's private data and replies with model arrays,
aggregates or metrics only; no per-cell data ever leaves the site.

Message types: ``query.describe``, ``query.feature_stats``, ``query.setup``, ``train``, ``evaluate``,
``query.pca``, ``query.panel``, ``query.embed``, ``query.harmony``, ``query.cluster_stats``, ``query.mixture``,
``query.finalize``.
"""

from __future__ import annotations

import json
import logging
import time

import torch  # noqa: F401  # imported first: ArrayRecord.to_torch_state_dict needs torch loaded
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedspatial.client import site_runtime as rt
from fedspatial.client.payload import (
    arrays_record,
    chain_arrays,
    config_number,
    config_strings,
    feature_space_from_config,
    record_arrays,
    split_chains,
)
from fedspatial.shared.privacy.dp import PRIVACY_BUDGET_ERROR, PrivacyBudgetExceeded

logger = logging.getLogger(__name__)


def central_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this site's model update for client-side central DP (Flower's
    ``fixedclipping_mod`` / ``adaptiveclipping_mod``) when the run asks for it; every
    other message passes through."""
    if msg.metadata.message_type != "train" or "config" not in msg.content:
        return call_next(msg, context)
    config = msg.content["config"]
    run_config = json.loads(str(config["run-config"])) if "run-config" in config else {}
    mode = str(run_config.get("central-dp", "none"))
    if mode == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if mode == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ rounds (legacy workflow API); the train
    step in between is this app's own handler, reached through :func:`_legacy_train`."""
    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, lambda m, c: _legacy_train(m, c, call_next))
    return call_next(msg, context)


def _legacy_train(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Legacy ``FitIns`` -> this app's train message -> legacy ``FitRes``."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = list(rt.build_model(json.loads(str(config["model-config"]))).state_dict())
    values = parameters_to_ndarrays(fitins.parameters)
    msg.content = RecordDict(
        {"arrays": ArrayRecord({n: Array(v) for n, v in zip(names, values, strict=True)}), "config": ConfigRecord(config)}  # type: ignore[arg-type]
    )
    reply = call_next(msg, context)
    if reply.has_error():  # SecAgg+ cannot carry an error reply: fail the round with its reason
        raise PrivacyBudgetExceeded(reply.error.reason) if reply.error.code == PRIVACY_BUDGET_ERROR else RuntimeError(reply.error.reason)
    metrics = reply.content["metrics"]
    run_config = json.loads(str(config.get("run-config", "{}")))
    weight = 1 if run_config.get("central-dp", "none") != "none" else int(metrics["num-examples"])  # type: ignore[arg-type]
    fitres = FitRes(
        Status(Code.OK, "ok"),
        ndarrays_to_parameters(reply.content["arrays"].to_numpy_ndarrays()),  # type: ignore[union-attr]
        weight,
        {k: v for k, v in metrics.items() if isinstance(v, int | float)},  # type: ignore[union-attr]
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


app = ClientApp(mods=[secagg_mod, central_dp_mod])


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
    sections = config_strings(cfg, "sections") if "sections" in cfg else None
    stats = site.feature_stats(
        config_strings(cfg, "features"), target_sum=config_number(cfg, "target-sum"), context=context, sections=sections
    )
    return _reply(msg, arrays=arrays_record(stats.to_arrays()), metrics={"num-examples": stats.n_cells})


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Keep the federation's feature space at the site for the rest of the run."""
    site = rt.site_for(msg, context)
    rt.store_setup(context, msg.content["config"])
    n_cells = site.prepare(rt.setup_of(context))  # prepare now: later rounds reuse it
    return _reply(msg, metrics={"num-examples": n_cells})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs of the spatial autoencoder from the global weights."""
    site = rt.site_for(msg, context)
    cfg = msg.content["config"]
    model = rt.model_from_message(msg)
    start = time.perf_counter()
    server_round = int(config_number(cfg, "server-round", 0))
    try:
        result = site.train(
            model, rt.setup_of(context), seed=rt.round_seed(context, cfg), context=context, server_round=server_round
        )
    except PrivacyBudgetExceeded as err:
        # A refusal, not a crash: the server logs the reason and stops or goes on without us.
        logger.warning("%s", err)
        return Message(Error(code=PRIVACY_BUDGET_ERROR, reason=str(err)), reply_to=msg)
    metrics: dict = {
        "num-examples": result.num_examples,
        "unit-weight": 1.0,  # uniform weights for central DP (sensitivity C / n_sites)
        "train-steps": result.steps,
        "train-seconds": time.perf_counter() - start,
    }
    if site.cfg.privacy.local_dp:
        # The DP-SGD loss is an unprivatized statistic: report the privacy spent instead.
        ledger = site.ledger(context)
        metrics.update({"dp-epsilon": ledger.epsilon, "dp-delta": ledger.delta, "dp-budget": ledger.budget_epsilon})
    else:
        metrics["train-loss"] = result.loss
    return _reply(msg, arrays=ArrayRecord(model.state_dict()), metrics=metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Reconstruction loss of the global model on this site's cells."""
    site = rt.site_for(msg, context)
    model = rt.model_from_message(msg)
    loss = site.evaluate(model, rt.setup_of(context))
    return _reply(msg, metrics={"num-examples": site.n_cells, "unit-weight": 1.0, "eval-loss": loss})


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
    """Per-cluster sums, counts and inertia for the server's centroids (of every
    k-means start the server runs side by side, ``name@start`` keys)."""
    site = rt.site_for(msg, context)
    replies = {
        i: site.cluster_stats(arrays["centroids"], arrays.get("previous"), context).to_arrays()
        for i, arrays in split_chains(record_arrays(msg.content["arrays"])).items()
    }
    return _reply(msg, arrays=arrays_record(chain_arrays(replies)), metrics={"num-examples": site.n_cells})


@app.query("pca")
def pca(msg: Message, context: Context) -> Message:
    """Federated PCA of the standardized features: feature sums, ``D x r`` power
    products or the ``r x r`` Rayleigh matrix (``config["stage"]``); ``store`` keeps the
    final basis for training."""
    site = rt.site_for(msg, context)
    stage = str(msg.content["config"]["stage"])
    arrays = record_arrays(msg.content["arrays"]) if "arrays" in msg.content else {}
    if stage == "store":
        from fedspatial.shared.algorithms.pca import PCABasis

        rt.store_pca(context, PCABasis.from_arrays(arrays))
        n_cells = site.prepare(rt.setup_of(context))  # project now: later rounds reuse it
        return _reply(msg, metrics={"num-examples": n_cells})
    reply = site.pca_reply(rt.setup_of(context), stage, arrays)
    return _reply(msg, arrays=arrays_record(reply), metrics={"num-examples": site.n_cells})


@app.query("panel")
def panel(msg: Message, context: Context) -> Message:
    """A small feature panel mapped onto the federation's model inputs: regression sums
    over this site's reference cells (``stage = moments``), or the fitted map for this
    site's sections with that panel (``stage = store``)."""
    from fedspatial.shared.algorithms.panels import PanelMap

    site = rt.site_for(msg, context)
    cfg = msg.content["config"]
    space = feature_space_from_config(cfg)
    if str(cfg["stage"]) == "store":
        rt.store_panel_map(context, str(cfg["panel-id"]), space, PanelMap.from_arrays(record_arrays(msg.content["arrays"])))
        n_cells = site.prepare(rt.setup_of(context))
        return _reply(msg, metrics={"num-examples": n_cells})
    moments = site.panel_reply(rt.setup_of(context), space)
    return _reply(msg, arrays=arrays_record(moments), metrics={"num-examples": int(moments["count"][0])})


@app.query("mixture")
def mixture(msg: Message, context: Context) -> Message:
    """E-step sums (per component: responsibility, weighted sum, second moments) for the
    server's Gaussian mixture."""
    site = rt.site_for(msg, context)
    covariance_type = str(msg.content["config"]["covariance-type"])
    replies = {
        i: site.mixture_stats(arrays, covariance_type, context).to_arrays()
        for i, arrays in split_chains(record_arrays(msg.content["arrays"])).items()
    }
    return _reply(msg, arrays=arrays_record(chain_arrays(replies)), metrics={"num-examples": site.n_cells})


@app.query("harmony")
def harmony(msg: Message, context: Context) -> Message:
    """Federated Harmony on the embedding kept at the site: cluster-level sums only
    (``config["harmony-kind"]`` names the step; see client/harmony_state.py)."""
    from fedspatial.client.harmony_state import harmony_reply

    site = rt.site_for(msg, context)
    cfg = msg.content["config"]
    arrays = record_arrays(msg.content["arrays"]) if "arrays" in msg.content else {}
    reply = harmony_reply(site, context, str(cfg["harmony-kind"]), arrays, cfg)
    return _reply(msg, arrays=arrays_record(reply), metrics={"num-examples": site.n_cells})


@app.query("finalize")
def finalize(msg: Message, context: Context) -> Message:
    """Assign domains, write the annotated sections and plots at the site, and return
    scores and label x domain counts."""
    site = rt.site_for(msg, context)
    arrays = record_arrays(msg.content["arrays"])
    report, tables = site.finalize(
        arrays["centroids"], msg.content["config"], rt.setup_of(context), context, mixture_arrays=arrays
    )
    return _reply(
        msg,
        arrays=arrays_record(tables),
        config={"report": report},
        metrics={"num-examples": site.n_cells},
    )
