"""A poisoned site, for robustness tests and benchmarks (never used by a real run).

:func:`poisoned_client_app` wraps a ClientApp (fedspatial's: ``fedspatial.client.app.app``):
every message is answered by that app, and one chosen site then replaces its train
reply's model ``w`` by ``g + factor * (w - g)``, ``g`` being the global model it received.
``factor = -10`` is the classic sign-flipped and scaled update; ``factor = 10`` a scaled
one. Pass the result to :func:`fedspatial.simulation.simulate` (``client_app=``). It lives
in the package, not in the tests, because the simulation's workers import it by name;
it takes the honest app as an argument because strategies never import the client side.
"""

from __future__ import annotations

import json
import logging

from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from fedspatial.records import from_recorddict, is_packed, pack_content, unpack_content
from fedspatial.shared.data.manifest import read_manifest
from fedspatial.shared.phases import all_queries
from fedspatial.shared.protocol.names import RUN_CONFIG, Query

logger = logging.getLogger(__name__)


def site_name(msg: Message, context: Context) -> str:
    """The site a SuperNode serves: its node config's ``site-name`` (deployment), else its
    entry in the simulation's manifest (``partition-id``)."""
    if "site-name" in context.node_config:
        return str(context.node_config["site-name"])
    config = msg.content.config_records.get("config")
    run_config = json.loads(str(config[RUN_CONFIG])) if config is not None and RUN_CONFIG in config else dict(context.run_config)
    nodes = read_manifest(str(run_config["manifest"]))["nodes"]
    return str(nodes[int(context.node_config["partition-id"])]["name"])


def poisoned_client_app(honest: ClientApp, site: str, factor: float = -10.0) -> ClientApp:
    """``honest``, except that ``site`` sends ``g + factor * (w - g)`` for its trained ``w``."""
    wrapped = ClientApp()

    def passthrough(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    def train(msg: Message, context: Context) -> Message:
        received = from_recorddict(msg.content).arrays  # (packed or not: see fedspatial.records)
        name = site_name(msg, context)
        reply = honest(msg, context)
        if reply.has_error() or name != site:
            return reply
        logger.warning("POISONED SITE %s: train reply w -> g + %g (w - g)", site, factor)
        packed = is_packed(reply.content)
        unpack_content(reply.content)
        arrays = reply.content.array_records["arrays"]
        for k in list(arrays.keys()):
            g, w = received[k], arrays[k].numpy()
            arrays[k] = Array((g + factor * (w - g)).astype(w.dtype))
        if packed:
            pack_content(reply.content)
        return reply

    for query in all_queries():
        if query == Query.TRAIN:
            wrapped.train()(train)
        elif query == Query.EVALUATE:
            wrapped.evaluate()(passthrough)
        else:
            wrapped.query(str(query))(passthrough)
    return wrapped
