"""fedspatial ClientApp: a thin adapter between Flower messages and the phases.

Every message type (one per :class:`~fedspatial.shared.protocol.names.Query`) goes to
the site half of the phase that owns it (:func:`fedspatial.shared.phases.phase_for`),
on this site's private data (:mod:`fedspatial.client.site`); replies hold model arrays,
aggregates or metrics only: no per-cell data ever leaves the site, and no path of the
site's folders (:func:`~fedspatial.shared.protocol.site_paths.strip_site_paths`).
Before a phase computes anything, the request is checked against the site's own policy
(:mod:`fedspatial.shared.privacy.policy`): one that breaks it gets an error reply
(code :data:`~fedspatial.shared.privacy.policy.SITE_POLICY_ERROR`) naming the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import torch  # noqa: F401  # imported first: ArrayRecord.to_torch_state_dict needs torch loaded
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedspatial.client.site import SiteRuntime, run_config_of, site_for
from fedspatial.records import (
    RIDER_ERROR,
    RIDERS,
    from_recorddict,
    is_packed,
    nest,
    rider_prefix,
    to_recorddict,
    unnest,
)
from fedspatial.shared.models import build_model
from fedspatial.shared.phases import all_queries, phase_for
from fedspatial.shared.privacy.dp import PRIVACY_BUDGET_ERROR, PrivacyBudgetExceeded
from fedspatial.shared.privacy.policy import (
    NO_POLICY_WARNING,
    SITE_POLICY_ERROR,
    SitePolicyError,
    refusal,
    unnoised,
    withhold_small_tables,
)
from fedspatial.shared.protocol.names import Query, message_type
from fedspatial.shared.protocol.payload import Payload
from fedspatial.shared.protocol.site_paths import strip_site_paths

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
    names = list(build_model(json.loads(str(config["model-config"]))).state_dict())
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


def _refuse(msg: Message, reason: str) -> Message:
    """An error reply (nothing computed, nothing sent) and a clear line in the hospital's log."""
    logger.warning("SITE POLICY REFUSAL: %s", reason)
    return Message(Error(code=SITE_POLICY_ERROR, reason=reason), reply_to=msg)


_told_no_policy = False


def _warn_no_policy() -> None:
    global _told_no_policy
    if not _told_no_policy:
        _told_no_policy = True
        logger.warning("%s", NO_POLICY_WARNING)


def _policy_refusal(site: SiteRuntime, query: str, request: Payload) -> str | None:
    """Why the site's own policy refuses ``query`` as asked, or None (no policy: any)."""
    policy = site.node.policy
    why = None if policy is None else refusal(policy, query, site.cfg, request)
    if why is None and site.cfg.privacy.local_dp and unnoised(query, site.cfg):
        # local DP means every release is in the ledger: whatever the server asks, with or without a policy
        return (f"site {site.name} refuses {message_type(query)}: under privacy.local-dp its reply would be a "
                "statistic of the cells outside the privacy ledger")
    return None if why is None else f"site {site.name} refuses {message_type(query)} by its site policy: {why}"


def _released(site: SiteRuntime, query: str, reply: Payload) -> Payload:
    """What of ``reply`` may leave the site: tables with a cell below the policy's
    min-cell-count withheld (logged), the hospital's own paths stripped."""
    policy = site.node.policy
    if policy is not None:
        reply, withheld = withhold_small_tables(policy, reply)
        if withheld:
            logger.warning("SITE POLICY: %s withheld %s from its %s reply (a cell below min-cell-count=%d)",
                           site.name, ", ".join(withheld), message_type(query), policy.min_cell_count)
    return strip_site_paths(reply, site.private_roots)


def _answer_riders(request: RecordDict, reply: RecordDict, site: SiteRuntime) -> None:
    """Answer the later requests a message carries (server.federation ``carry``), in
    order, after its own query and with the same checks: the site policy first, the
    small-table rule after, paths stripped. One the site does not answer is marked as
    such; the server then asks it again on its own (and gets the refusal there)."""
    riders = request.config_records.get(RIDERS)
    for i, query in enumerate(list(riders[RIDERS]) if riders is not None else []):  # type: ignore[arg-type]
        prefix = rider_prefix(i)
        try:
            rider = from_recorddict(unnest(request, prefix))
            why = _policy_refusal(site, str(query), rider)
            if why is not None:
                raise PermissionError(why)
            answer = _released(site, str(query), phase_for(str(query)).answer(site, str(query), rider))
        except Exception as err:  # asked again on its own, where it fails loudly
            logger.warning("%s: %s (carried request; the server asks it again)", message_type(str(query)), err)
            reply[prefix + RIDER_ERROR] = ConfigRecord({"reason": str(err)})
            continue
        nest(reply, prefix, to_recorddict(answer))


def _handler(query: str) -> Callable[[Message, Context], Message]:
    phase = phase_for(query)

    def handle(msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get("config")
        try:
            site = site_for(run_config_of(config, context), context)
        except SitePolicyError as err:  # the policy file went missing or bad: refuse everything
            who = context.node_config.get("site-name", context.node_config.get("partition-id", "?"))
            return _refuse(msg, f"site {who} refuses {message_type(query)}: {err}")
        request = from_recorddict(msg.content)
        if site.node.policy is None:
            _warn_no_policy()
        # The site's own limits, whatever the server asks; checked before anything is computed.
        why = _policy_refusal(site, query, request)
        if why is not None:
            return _refuse(msg, why)
        try:
            reply = phase.answer(site, query, request)
        except PrivacyBudgetExceeded as err:
            # A refusal, not a crash: the server logs the reason and stops or goes on without us.
            logger.warning("%s", err)
            return Message(Error(code=PRIVACY_BUDGET_ERROR, reason=str(err)), reply_to=msg)
        # Whatever a phase reports, the hospital's own paths stay here (relative ones go).
        # A model update travels packed only when the server packed the model it sent: Flower's
        # client-side DP and SecAgg+ mods read the arrays one by one (fedspatial.records).
        pack = query not in (Query.TRAIN, Query.EVALUATE) or is_packed(msg.content)
        content = to_recorddict(_released(site, query, reply), pack=pack)
        _answer_riders(msg.content, content, site)
        return Message(content=content, reply_to=msg)

    handle.__name__ = handle.__qualname__ = f"answer_{query}"
    handle.__doc__ = f"``{message_type(query)}``: answered by the {phase.name} phase."
    return handle


for _query in all_queries():
    if _query == Query.TRAIN:
        app.train()(_handler(_query))
    elif _query == Query.EVALUATE:
        app.evaluate()(_handler(_query))
    else:
        app.query(str(_query))(_handler(_query))
