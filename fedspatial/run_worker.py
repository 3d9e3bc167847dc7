"""One ClientApp process per run at a hospital: the warm executor's task runner.

Flower 1.42's ``flwr-clientapp`` answers one message and exits, so every message of a run
unpacked the run's bundle, loaded the ClientApp and rebuilt the site (its data, graph and
model inputs) before doing its work. A run worker is forked once per run (from the warm
executor's fork server, :mod:`fedspatial.clientapp_executor`) and answers that run's
messages one after the other: the bundle is unpacked and the ClientApp loaded for the
first message, and the site's caches (:mod:`fedspatial.client.site`) stay in memory
between messages, as they do in a simulation's ClientApp actors.

Each message is still one Flower task, run as ``flwr-clientapp`` runs it
(:func:`flwr.supernode.runtime.run_clientapp.run_clientapp`), with Flower's own
functions: the task's message and context are pulled from the SuperNode's Runtime API,
the reply and the updated context pushed back, the task's status reported, a heartbeat
sent meanwhile. What a message may keep for the next is therefore exactly what
simulation keeps (a process's memory); the node's ``context.state`` stays Flower's.
Different runs, and different bundles, never share a process.

This module imports nothing of fedspatial at import time, and :func:`serve_run` drops
the installed fedspatial from ``sys.modules`` before anything else: Flower then imports
the ClientApp from the run's bundle, as in its own ``flwr-clientapp``.
"""

from __future__ import annotations

import logging
import signal
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger("fedspatial.run_worker")  # the module is forgotten, the logger is not

PULL_FIRST_RETRY = 0.02
"""Seconds before asking the SuperNode again for a part of a message it is still receiving.

The SuperNode hands a message to its executor before all of the message's parts have
arrived from the SuperLink; ``flwr-clientapp`` waits 1 s, then 2 s, ... for a missing
part, which on a small message was most of the message's time."""
PULL_RETRY_CAP = 1.0


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's ``pull_task_input``, retrying a part that has not arrived yet after
    :data:`PULL_FIRST_RETRY` seconds instead of 1 s."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=PULL_FIRST_RETRY,
        backoff_cap=PULL_RETRY_CAP,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: not in the deflated message
    return message, context, run, fab


class RunWorker:
    """Runs the tasks of one run, keeping the loaded ClientApp between them."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.apps: dict[str, Any] = {}
        """The loaded ClientApp by bundle hash (one: a worker serves one run's bundle)."""
        self.stopping = False

    def _client(self, token: str) -> Any:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,  # the Runtime API listens on 127.0.0.1 only
            root_certificates=None,
            interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def _app(self, run: Any, fab: Any) -> Any:
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.supernode.runtime import run_clientapp as flower

        if fab.hash_str not in self.apps:
            # Through the module: the fork server may have wrapped it (the app allow-list).
            flower.install_from_fab(fab.content, skip_prompt=True)  # type: ignore[attr-defined]
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]

    def run_task(self, token: str) -> bool:
        """One message, as ``flwr-clientapp`` answers it; True when the ClientApp completed."""
        from flwr.app import Error, Message
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = self._client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            reply = self._app(run, fab)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # Flower's own handling: an error reply, status FAILED
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = str(type(ex)) + ":<'" + str(ex) + "'>"
            if isinstance(ex, LoadClientAppError):
                code, details = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
            logger.error("ClientApp raised an exception", exc_info=ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                except Exception as ex:
                    logger.error("Failed to push reply message", exc_info=ex)
                    status, details = SubStatus.FAILED, f"the reply could not be sent: {ex}"
            # SIGTERM in the middle of a task: reported as flwr-clientapp reports it.
            push_task_output(client, context, status, "Task stopped." if self.stopping else details)
            heartbeat.stop()
            client.close()
        return bool(status == SubStatus.COMPLETED)

    def stop(self, *_: Any) -> None:
        """SIGTERM: leave; a task in hand is reported as stopped on the way out (``finally``)."""
        self.stopping = True
        raise SystemExit(0)


def serve_run(conn: Connection, address: str, parent_pid: int) -> None:
    """A worker's life: receive task tokens on ``conn``, answer ``(token, completed)``;
    ends at ``None``, when the executor closes its end, or when it is gone."""
    from fedspatial.preload import forget_fedspatial

    forget_fedspatial()
    from flwr.supercore.app_utils import start_parent_process_monitor

    start_parent_process_monitor(parent_pid)  # SIGINT to us when the executor is gone
    worker = RunWorker(address)
    signal.signal(signal.SIGTERM, worker.stop)
    while True:
        try:
            token = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if token is None:
            return
        try:
            completed = worker.run_task(token)
        except KeyboardInterrupt:
            return
        conn.send((token, completed))
