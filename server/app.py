"""fedspatial ServerApp: a thin adapter from Flower's Grid to the run orchestration."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch  # noqa: F401  # loaded before any ArrayRecord <-> torch conversion
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedspatial.server.federation import run_federation
from fedspatial.shared.config import ExperimentConfig

logger = logging.getLogger(__name__)


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``.

    ``flwr run`` uses :data:`app` (no overrides: the run config comes from
    ``pyproject.toml`` and ``--run-config``); ``fedspatial simulate`` passes the
    experiment's config, since Flower's in-process simulation carries no run config.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = {**dict(context.run_config), **dict(overrides or {})}
        cfg = ExperimentConfig.from_run_config(run_config)
        run_federation(grid, cfg, cfg.to_run_config())

    return server_app


app = make_server_app()
