"""Ask sites for something and get their replies, or a clear error.

A run keeps going when a site drops out (its SuperNode crashed, lost its connection,
its ClientApp failed, or it did not answer within ``message-timeout`` seconds) as long as
``min-nodes`` sites remain: :class:`SiteGroup` is the
run's view of the federation, and it stops the run with a message naming the lost
sites once too few remain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedspatial.records import pack_content, unpack_content

logger = logging.getLogger(__name__)

DEFAULT_MESSAGE_TIMEOUT = 600.0
"""Seconds a site has to answer one message (run config ``message-timeout``)."""


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


class SiteGroup(Grid):
    """The sites taking part in one run, seen as a :class:`~flwr.serverapp.Grid`.

    Hand it to Flower's strategies and to :func:`ask` instead of the Grid itself:

    - it offers only the run's participants, so a SuperNode that joins (or rejoins with
      an empty state) mid-run is never asked for a step whose setup it missed;
    - a site whose reply is an error is dropped from the run. Flower answers with an
      error for a SuperNode whose heartbeat stopped (crash, lost network), so a lost
      site costs at most that detection delay;
    - while fewer than ``min_nodes`` participants are online it raises :class:`SiteError`
      after ``patience`` seconds, where Flower's node sampling would wait forever;
    - a site that has not answered a message within ``message_timeout`` seconds is
      dropped as if it had failed (a hung site would otherwise hold the run for as long as
      the caller's timeout: an hour for Flower's strategies).

    Parameters
    ----------
    grid : Grid
        The run's Grid.
    nodes : iterable of int
        The participating node ids.
    min_nodes : int
        The run stops once fewer sites remain.
    patience : float (default: 120.0)
        Seconds to wait for participants that are offline before giving up.
    poll_interval : float (default: 0.25)
        Longest pause between checks for replies (Flower's own loop sleeps 3 s): a check
        is one local request to the SuperLink, and a run waits on every reply.
    hint : str or callable returning str (default: "")
        Appended to the error when too few sites remain (what was saved, how to go on);
        a callable is asked when the error is raised, so it can say what exists by then.
    message_timeout : float (default: 600.0)
        Longest wait for a reply, whatever timeout a caller asks for.
    pack : bool (default: True)
        Send a message's arrays packed into one, and unpack the replies' (fewer objects
        per message: :mod:`fedspatial.records`); False when Flower's client-side DP or
        SecAgg+ mods must read a training message's arrays one by one.
    """

    def __init__(
        self,
        grid: Grid,
        nodes: Iterable[int],
        *,
        min_nodes: int,
        patience: float = 120.0,
        poll_interval: float = 0.25,
        hint: str | Callable[[], str] = "",
        message_timeout: float = DEFAULT_MESSAGE_TIMEOUT,
        pack: bool = True,
    ) -> None:
        self._grid = grid
        self.nodes: list[int] = sorted(nodes)
        self.min_nodes = min_nodes
        self.patience = patience
        self.poll_interval = poll_interval
        self.hint = hint
        self.message_timeout = message_timeout
        self.pack = pack
        self.names: dict[int, str] = {}
        self.dropped: dict[str, str] = {}
        self._short_since: float | None = None
        self._node_of_message: dict[str, int] = {}
        self._registered: dict[int, str] | None = None

    # -- delegated to the Grid ---------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:
        if name == "_grid":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._grid, name)

    # -- the run's view -----------------------------------------------------------------------
    def name(self, node: int) -> str:
        """The site's bound name; before names are bound (or for a node that never says),
        the name its key was registered with, so a log never names a hospital by node id
        where the center knows better."""
        if node in self.names:
            return self.names[node]
        if self._registered is None:
            self._registered = self.registered_names()
        registered = self._registered.get(node)
        return f"{registered} (registered key; node {node})" if registered else f"node {node}"

    def registered_names(self) -> dict[int, str]:
        """The names the center gave the nodes' keys (`flwr supernode register ... --name`);
        empty where Flower knows none (simulation, keys registered without a name)."""
        try:
            infos = list(self._grid.get_nodes())
        except (AttributeError, NotImplementedError):
            return {}
        return {int(i.node_id): str(i.name) for i in infos if getattr(i, "name", "")}

    def bind_names(self, claims: Mapping[int, str]) -> list[int]:
        """Name each node after the site it says it serves, if it may; returns the nodes admitted.

        The site name is self-declared (node config ``site-name``), so it is checked
        against the name the node's key was registered with, where there is one; a name
        claimed by several nodes goes to the one registered under it, or to none. Nodes
        refused are dropped (min-nodes rules apply).
        """
        registered = self.registered_names()
        fix = "the center registers each hospital's key with its site name: `flwr supernode register KEY.pub CONNECTION --name SITE`"
        by_name: dict[str, list[int]] = {}
        for node, name in sorted(claims.items()):
            bound = registered.get(node)
            if bound is not None and bound != name:
                self.drop(node, f"says it is site {name!r} but its key is registered as {bound!r}; {fix}", "describe")
            else:
                by_name.setdefault(name, []).append(node)
        admitted = []
        for name, nodes in by_name.items():
            if len(nodes) > 1:
                owners = [n for n in nodes if registered.get(n) == name]
                for node in nodes:
                    if owners != [node]:
                        self.drop(node, f"{len(nodes)} nodes say they are site {name!r}; {fix}", "describe")
                nodes = owners if len(owners) == 1 else []
            for node in nodes:
                self.names[node] = name
                admitted.append(node)
        if registered:
            logger.info("site names checked against the registered keys: %s",
                        ", ".join(f"{self.names[n]} {'(bound)' if n in registered else '(key registered without --name)'}"
                                  for n in sorted(admitted, key=self.names.__getitem__)))
        self.require("describe")
        return admitted

    def get_node_ids(self) -> list[int]:
        """Participants that are online; raises :class:`SiteError` when fewer than
        ``min_nodes`` have been online for longer than ``patience``."""
        online = set(self._grid.get_node_ids())
        active = [n for n in self.nodes if n in online]
        if len(active) >= self.min_nodes:
            self._short_since = None
            return active
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
            waiting = ", ".join(self.name(n) for n in self.nodes if n not in online)
            logger.warning("waiting up to %.0f s for offline site(s): %s", self.patience, waiting)
        elif now - self._short_since > self.patience:
            offline = {self.name(n): "offline (no heartbeat)" for n in self.nodes if n not in online}
            raise SiteError(self._too_few(f"only {len(active)} site(s) online", {**self.dropped, **offline}))
        return active

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``, collect replies until all arrived or ``timeout`` (at most
        ``message_timeout``); drop every site that answered with an error or not at all.

        Replies come back in site-name order, not arrival order: Flower's strategies
        aggregate them in list order, and a float sum in arrival order would make a run's
        model depend on which hospital answered first."""
        timeout = self.message_timeout if timeout is None else min(timeout, self.message_timeout)
        messages = list(messages)
        if self.pack:
            for m in messages:
                pack_content(m.content)
        ids = list(self._grid.push_messages(messages))
        pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True) if mid}
        self._node_of_message.update(pending)
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        delay = 0.05  # quick replies (simulation) are seen at once; then back off
        while pending:
            for reply in self._grid.pull_messages(list(pending)):
                if reply.has_content():
                    unpack_content(reply.content)
                replies.append(reply)
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None and reply.has_error():
                    self.drop(node, reply.error.reason or "error", reply.metadata.message_type)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 1.5, self.poll_interval)
        for node in pending.values():
            self.drop(node, f"no reply within {timeout:g} s (message-timeout)", messages[0].metadata.message_type)
        for mid, m in zip(ids, messages, strict=True):
            if not mid:  # Flower could not push it (it logs why)
                self.drop(m.metadata.dst_node_id, "the message could not be sent", m.metadata.message_type)
        return sorted(replies, key=lambda r: (self.name(self.node_of(r)), self.node_of(r)))

    def node_of(self, reply: Message) -> int:
        """The site a reply answers for (Flower's own error replies come from the SuperLink)."""
        return self._node_of_message.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def drop(self, node: int, reason: str, step: str = "") -> None:
        """Take ``node`` out of the run (logged; listed in the run report)."""
        if node not in self.nodes:
            return
        self.nodes.remove(node)
        self.dropped[self.name(node)] = f"{step}: {reason}" if step else reason
        left = len(self.nodes)
        logger.warning(
            "site %s dropped out of the run%s: %s; %s with %d site(s) (min-nodes %d)",
            self.name(node), f" at {step}" if step else "", reason,
            "continuing" if left >= self.min_nodes else "cannot go on", left, self.min_nodes,
        )

    def require(self, step: str) -> None:
        """Raise :class:`SiteError` when fewer than ``min_nodes`` sites remain."""
        if len(self.nodes) < self.min_nodes:
            raise SiteError(self._too_few(f"{step}: only {len(self.nodes)} site(s) left", self.dropped))

    def _too_few(self, what: str, lost: Mapping[str, str]) -> str:
        listed = "".join(f"\n  - {site}: {why}" for site, why in lost.items())
        return (
            f"{what}, fewer than min-nodes={self.min_nodes}; the run stops.{listed}\n"
            "Restart the lost site(s) (`fedspatial client ...`) or lower min-nodes. "
            + (self.hint() if callable(self.hint) else self.hint)
        ).strip()


def ask(
    grid: Grid,
    nodes: Iterable[int],
    action: str,
    *,
    content: RecordDict | Mapping[int, RecordDict] | None = None,
    names: Mapping[int, str] | None = None,
    timeout: float | None = None,
    allow_failures: bool = False,
) -> dict[int, RecordDict]:
    """Send ``query.<action>`` to each node; return ``{node_id: reply content}``.

    ``timeout``: seconds to wait for the replies (default: a :class:`SiteGroup`'s
    ``message_timeout``, else :data:`DEFAULT_MESSAGE_TIMEOUT`).

    ``content`` may be one RecordDict for everybody or one per node. A site that fails
    raises :class:`SiteError` naming the site and its reason, unless ``allow_failures``.
    With a :class:`SiteGroup`, a failed site is dropped instead and :class:`SiteError` is
    raised only when fewer than its ``min_nodes`` remain.
    """
    messages = []
    for node in nodes:
        body = content.get(node) if isinstance(content, Mapping) and not isinstance(content, RecordDict) else content
        # one RecordDict per message; the records inside may be shared
        body = RecordDict(dict((body or RecordDict()).items()))
        messages.append(Message(content=body, dst_node_id=node, message_type=f"query.{action}"))
    if timeout is None:
        timeout = grid.message_timeout if isinstance(grid, SiteGroup) else DEFAULT_MESSAGE_TIMEOUT
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    if isinstance(grid, SiteGroup):
        grid.require(f"query.{action}")
        return {grid.node_of(r): r.content for r in replies if not r.has_error()}
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
