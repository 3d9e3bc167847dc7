"""The center's SuperLink with each of Flower's APIs on its own listener.

Flower 1.42's ``flower-superlink`` serves its three HTTP APIs from one FastAPI app on one
``--host``/``--port`` (its ``--fleet-api-address`` and ``--control-api-address`` are
deprecated and no longer split them). Open-source Flower has no user authentication on
the Control API, so whoever reaches that one port can submit runs (code that then runs at
the center and at every hospital), register SuperNode keys and take ServerApp tasks.

This process builds Flower's own SuperLink (its argument parsing, state, lifespan and
FastAPI app, unchanged) and serves that app through three listeners, each of which
passes only its API's paths and answers 404 to everything else:

==============  ====================  ==================================================
API             path prefix           bound to
==============  ====================  ==================================================
Fleet           ``/v1/fleet/``        ``--fleet HOST:PORT`` (public: the hospitals)
Control         ``/v1/control/``      ``--control HOST:PORT`` (default 127.0.0.1: operators,
                                      through an SSH tunnel)
ServerAppIo     ``/v1/runtime/``      Flower's ``--host``/``--port``, always 127.0.0.1 (the
                                      center's own ServerApp processes)
==============  ====================  ==================================================

Run by ``fedspatial server`` (:func:`fedspatial.deployment.nodes.superlink_command`) as
``python -m fedspatial.deployment.superlink --fleet H:P --control H:P -- FLOWER_ARGS``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PATHS = ("/v1/fleet/",)
CONTROL_PATHS = ("/v1/control/",)
RUNTIME_PATHS = ("/v1/runtime/",)


class OnlyPaths:
    """An ASGI app that passes requests under ``prefixes`` to ``app`` and answers 404 to
    any other (Flower's docs pages and the other APIs included)."""

    def __init__(self, app: ASGIApp, prefixes: Sequence[str]) -> None:
        self.app = app
        self.prefixes = tuple(prefixes)

    def allows(self, path: str) -> bool:
        # Routing matches the raw path, so a prefix test on it is exact; '..' is refused anyway.
        return path.startswith(self.prefixes) and "/.." not in path and "//" not in path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.allows(str(scope.get("path", ""))):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"not served on this port\n"})
            return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Listener:
    name: str
    host: str
    port: int
    prefixes: tuple[str, ...]


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m fedspatial.deployment.superlink")
    parser.add_argument("--fleet", required=True, metavar="HOST:PORT", help="the Fleet API (hospitals)")
    parser.add_argument("--control", required=True, metavar="HOST:PORT", help="the Control API (operators)")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-superlink's arguments")
    args = parser.parse_args(list(argv))
    flower = list(args.flower_args)
    if flower[:1] == ["--"]:
        flower = flower[1:]
    return args, flower


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield  # several servers share one loop: main() handles the signals for all of them


async def _serve(app: ASGIApp, listeners: Sequence[Listener], ssl: dict[str, Any], log_config: Any) -> None:
    import uvicorn

    servers = []
    for i, lst in enumerate(listeners):
        config = uvicorn.Config(
            app=OnlyPaths(app, lst.prefixes), host=lst.host, port=lst.port, workers=1, reload=False,
            access_log=True, log_config=log_config,
            lifespan="on" if i == 0 else "off",  # Flower's lifespan (state, SuperExec) runs once
            **ssl,
        )
        server = uvicorn.Server(config)
        server.capture_signals = _no_signal_capture  # type: ignore[method-assign]
        servers.append(server)

    def stop(*_: Any) -> None:
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    # The first listener starts Flower's lifespan; the others start once it is up.
    first = asyncio.create_task(servers[0].serve())
    while not servers[0].started and not first.done():
        await asyncio.sleep(0.05)
    rest = [asyncio.create_task(s.serve()) for s in servers[1:]]
    done, _ = await asyncio.wait([first, *rest], return_when=asyncio.FIRST_COMPLETED)
    stop()  # one listener ended (stopped, or could not bind): end them all
    await asyncio.gather(first, *rest, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def main(argv: Sequence[str] | None = None) -> int:
    args, flower_args = parse_args(sys.argv[1:] if argv is None else argv)
    fleet, control = _split(args.fleet), _split(args.control)
    # Flower parses its own arguments from sys.argv (its --host/--port: the ServerAppIo listener).
    sys.argv = ["flower-superlink", *flower_args]
    # Were Flower to start `flower-superexec` (isolation subprocess), by name: this environment's first.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    config = _parse_superlink_lifespan_config()
    app = create_app(config, SuperLinkLifespan)
    listeners = [
        Listener("ServerAppIo (the center's ServerApps)", config.host, config.port, RUNTIME_PATHS),
        Listener("Control (operators: flwr, fedspatial submit)", *control, CONTROL_PATHS),
        Listener("Fleet (hospitals)", *fleet, FLEET_PATHS),
    ]
    for lst in listeners:
        logger.info("SuperLink %s API on %s:%d", lst.name, lst.host, lst.port)
    ssl = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    try:
        asyncio.run(_serve(app, listeners, ssl, get_uvicorn_log_config(console_handler.level)))
    except SystemExit as stop:  # uvicorn exits 1 when it cannot bind its port
        return int(stop.code or 0)
    return 0


if __name__ == "__main__":
    # Our lines only: a root handler would also print every library's (alembic, Flower's DEBUG).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedspatial").addHandler(handler)
    logging.getLogger("fedspatial").setLevel(logging.INFO)
    sys.exit(main())
