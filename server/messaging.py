"""Ask sites for something and get their replies, or a clear error."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)


class SiteError(RuntimeError):
    """A site could not do what the server asked; the message says which and why."""


def wait_for_nodes(grid: Grid, n: int, *, timeout: float = 120.0) -> list[int]:
    """Node ids once at least ``n`` SuperNodes are connected (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise SiteError(
                f"only {len(nodes)} of the {n} required sites connected within {timeout:.0f} s: "
                "check that each hospital's SuperNode is running and can reach the SuperLink"
            )
        time.sleep(1.0)


def ask(
    grid: Grid,
    nodes: Iterable[int],
    action: str,
    *,
    config: Mapping[str, object] | None = None,
    arrays: ArrayRecord | Mapping[int, ArrayRecord] | None = None,
    names: Mapping[int, str] | None = None,
    timeout: float = 3600.0,
    allow_failures: bool = False,
) -> dict[int, RecordDict]:
    """Send ``query.<action>`` to each node; return ``{node_id: reply content}``.

    ``arrays`` may be one record for everybody or one per node. A site that fails raises
    :class:`SiteError` naming the site and its reason, unless ``allow_failures``.
    """
    messages = []
    for node in nodes:
        content = RecordDict({"config": ConfigRecord(dict(config or {}))})  # type: ignore[arg-type]
        # ArrayRecord is itself a Mapping (of arrays), so test for it first.
        record = arrays if isinstance(arrays, ArrayRecord) or arrays is None else arrays.get(node)
        if record is not None:
            content["arrays"] = record
        messages.append(Message(content=content, dst_node_id=node, message_type=f"query.{action}"))
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    out: dict[int, RecordDict] = {}
    failures = []
    for reply in replies:
        node = reply.metadata.src_node_id
        who = (names or {}).get(node, f"node {node}")
        if reply.has_error():
            failures.append(f"{who}: {reply.error.reason}")
        else:
            out[node] = reply.content
    missing = [n for n in (m.metadata.dst_node_id for m in messages) if n not in out]
    if len(failures) < len(missing):
        failures.append(f"{len(missing) - len(failures)} site(s) did not answer within {timeout:.0f} s")
    if failures and not allow_failures:
        raise SiteError(f"query.{action} failed:\n  - " + "\n  - ".join(failures))
    for f in failures:
        logger.warning("query.%s: %s", action, f)
    return out
