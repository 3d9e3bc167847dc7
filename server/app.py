"""fedspatial ServerApp: a thin adapter from Flower's Grid to the run orchestration.

In a deployment the ServerApp runs at the coordinating center, and Flower 1.42 returns
no files to whoever submitted the run; it does stream what the ServerApp process writes
to its output (``flwr run --stream``, ``flwr log``). So at the end of a run the ServerApp
logs a summary and then one marked line holding the run's report files
(:func:`fedspatial.shared.protocol.result_line.result_line`), which ``fedspatial submit``
saves locally.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch  # noqa: F401  # loaded before any ArrayRecord <-> torch conversion
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedspatial.logstream import log_to_stderr
from fedspatial.server.federation import run_federation
from fedspatial.shared.config import ExperimentConfig
from fedspatial.shared.protocol.result_line import RESULT_FILES, ResultLineError, result_line

logger = logging.getLogger(__name__)


def log_to_run_stream() -> None:
    """Show fedspatial's INFO lines in the run's log, once each.

    Nothing configures logging for fedspatial in Flower's ServerApp process, so its INFO
    records would be dropped; Flower streams what the process writes to stderr. Where
    logging is set up for INFO already (``fedspatial simulate``), this changes nothing
    (:func:`fedspatial.logstream.log_to_stderr`).
    """
    log_to_stderr(defer_to_root=True)


def quick_reply_pulls() -> None:
    """A deployed ServerApp pulls the parts of a site's reply without Flower's 1 s pauses
    (:func:`fedspatial.pacing.quick_object_pulls`); simulation has no such
    pauses (its grid hands messages over in memory)."""
    import flwr
    import flwr.superlink.grid.http_grid as http_grid

    from fedspatial.pacing import quick_object_pulls

    quick_object_pulls(http_grid, version=flwr.__version__)


def run_summary(cfg: ExperimentConfig, report: Mapping[str, Any], folder: Path) -> str:
    """The few lines a submitter wants to see at the end of a run."""
    rounds = report.get("rounds", [])
    last = rounds[-1] if rounds else {}
    joint = report.get("joint", {})
    lines = [
        f"run '{cfg.run_name}' finished: {len(rounds)} round(s), {len(report.get('sites', {}))} site(s), "
        f"{float(report.get('wall-seconds', float('nan'))):.0f} s",
        f"  joint ARI {joint.get('ari', float('nan')):.3f}, NMI {joint.get('nmi', float('nan')):.3f}; "
        f"mean section ARI {report.get('mean_section_ari', float('nan')):.3f}",
    ]
    if last:
        lines.append(f"  last round: train loss {last.get('train-loss', float('nan')):.4f}, "
                     f"eval loss {last.get('eval-loss', float('nan')):.4f}")
    for site, info in sorted(report.get("sites", {}).items()):
        lines.append(f"  {site}: {info.get('n_cells', 0)} cells, ARI {info.get('ari', float('nan')):.3f}")
    for site, why in report.get("dropped-sites", {}).items():
        lines.append(f"  dropped: {site} ({why})")
    lines.append(f"  results at the coordinating center: {folder.resolve()}/; annotated sections at each site")
    return "\n".join(lines)


def announce_results(cfg: ExperimentConfig, report: Mapping[str, Any]) -> None:
    """Log the summary, then write the marked result line to stdout (the run's log)."""
    folder = Path(cfg.results_dir) / cfg.run_name
    logger.info("%s", run_summary(cfg, report, folder))
    files = {name: (folder / name).read_text() for name in RESULT_FILES if (folder / name).is_file()}
    try:
        line = result_line(cfg.run_name, str(folder.resolve()), files)
    except ResultLineError as err:
        logger.warning("%s", err)
        return
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_server_app(overrides: Mapping[str, Any] | None = None, *, stream_results: bool | None = None) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``.

    ``flwr run`` uses :data:`app` (no overrides: the run config comes from
    ``pyproject.toml`` and ``--run-config``); ``fedspatial simulate`` passes the
    experiment's config, since Flower's in-process simulation carries no run config.
    ``stream_results`` (default: when there are no overrides) ends the run with the
    summary and the result line for ``fedspatial submit``.
    """
    server_app = ServerApp()
    announce = overrides is None if stream_results is None else stream_results

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        log_to_run_stream()
        quick_reply_pulls()
        run_config = {**dict(context.run_config), **dict(overrides or {})}
        cfg = ExperimentConfig.from_run_config(run_config)
        report = run_federation(grid, cfg, cfg.to_run_config())
        if announce:
            announce_results(cfg, report)

    return server_app


app = make_server_app()
