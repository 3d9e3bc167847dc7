"""``fedspatial submit`` and ``fedspatial results``: send an experiment config as a Flower
run, follow its log, and save the run report the ServerApp sends back in its result line
(:mod:`fedspatial.shared.protocol.result_line`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedspatial.deployment.app_bundle import stage_app
from fedspatial.deployment.errors import DeployError
from fedspatial.deployment.network import check_superlink, format_address, parse_address
from fedspatial.deployment.processes import flower_binary, flower_env
from fedspatial.shared.protocol.result_line import (
    RUN_NAME_RULE,
    ResultLineError,
    check_bundle,
    is_valid_run_name,
    parse_result_line,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the run config


def project_root() -> Path | None:
    """The fedspatial Flower App folder (a checkout with pyproject.toml), if there is one."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "server").is_dir() else None


def app_run_config_keys(app_dir: Path) -> dict[str, Any]:
    """The run config keys the Flower App declares (``[tool.flwr.app.config]``)."""
    import tomllib

    data = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return dict(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def submit_run_config(cfg_flat: Mapping[str, Any], declared: Mapping[str, Any]) -> dict[str, Any]:
    """The run config overrides to send: every declared key, from the experiment config.

    Raises
    ------
    DeployError
        When the experiment config sets a key the App does not declare (Flower would
        reject the run), unless it equals the declared default.
    """
    unknown = sorted(k for k in cfg_flat if k not in declared)
    if unknown:
        from fedspatial.shared.config import ExperimentConfig

        defaults = ExperimentConfig().to_run_config()
        changed = [k for k in unknown if cfg_flat[k] != defaults.get(k)]
        if changed:
            raise DeployError(
                f"the config sets {', '.join(changed)}, which the Flower App's pyproject.toml "
                "[tool.flwr.app.config] does not declare: add them there (with their defaults)"
            )
    return {k: v for k, v in cfg_flat.items() if k in declared}


def toml_table(values: Mapping[str, Any]) -> str:
    """Flat ``key = value`` TOML (strings, bools, ints, floats: what a run config holds)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a JSON string is a valid TOML basic string
        lines.append(f'"{key}" = {text}')
    return "\n".join(lines) + "\n"


def write_flwr_connection(flwr_home: Path, name: str, superlink: str, ca_cert: Path) -> Path:
    """Write ``flwr_home/config.toml`` with one TLS connection ``name`` (made the default)."""
    host, port = parse_address(superlink)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{name}"\n\n'
        f"[superlink.{name}]\n"
        f'address = "{format_address(host, port)}"\n'
        f"root-certificates = {json.dumps(str(Path(ca_cert).expanduser().resolve()))}\n"
    )
    return path


# ----------------------------------------------------------------------------- the connection

LOCAL_ADDRESSES = (":local:", ":local-in-memory:")
"""Flower 1.42's connection addresses that start its own local simulation SuperLink."""


def flwr_config_path(env: Mapping[str, str] | None = None) -> Path:
    """Flower's connection file: ``$FLWR_HOME/config.toml``, else ``~/.flwr/config.toml``
    (``flwr.supercore.utils.get_flwr_home``)."""
    env = os.environ if env is None else env
    home = env.get("FLWR_HOME")
    return (Path(home) if home else Path.home() / ".flwr") / "config.toml"


def default_connection_problem(env: Mapping[str, str] | None = None) -> str | None:
    """Why ``flwr run`` with no connection named would not reach a federation, or None.

    Without a connection ``flwr run`` uses ``[superlink] default`` of its config file,
    which it creates when missing with ``default = "local"`` and ``address = ":local:"``:
    Flower's own local simulation, which installs a runtime, runs the App without any
    hospital's data and leaves a ``flower-superlink`` running. Reads the file, never
    writes it.
    """
    import tomllib

    path = flwr_config_path(env)
    if not path.is_file():
        return f"there is no Flower connection file ({path}), so `flwr run` would start Flower's own local simulation"
    try:
        superlink = tomllib.loads(path.read_text()).get("superlink", {})
    except (OSError, tomllib.TOMLDecodeError) as err:
        return f"{path} cannot be read ({err})"
    name = superlink.get("default") if isinstance(superlink, dict) else None
    if not name:
        return f"{path} names no default connection ([superlink] default)"
    conn = superlink.get(name)
    if not isinstance(conn, dict):
        return f"{path}: the default connection '{name}' is not defined"
    address = conn.get("address")
    if address is None or address in LOCAL_ADDRESSES:
        return (f"{path}: the default connection '{name}' is Flower's local simulation "
                f"(address {address or 'unset'}), not a federation")
    return None


def connection_help(config: Path | str) -> str:
    """The two ways to name the federation's SuperLink, as command lines."""
    return (
        f"  fedspatial submit {config} --superlink CENTER_HOST:9093 --ca-cert ca.crt\n"
        f"  fedspatial submit {config} --connection NAME   "
        f"(NAME: a [superlink.NAME] with the center's address in {flwr_config_path()})"
    )


# ----------------------------------------------------------------------------- the run


def run_submit(
    config: Path,
    *,
    overrides: Mapping[str, Any],
    connection: str | None,
    superlink: str | None,
    ca_cert: Path | None,
    app_dir: Path | None,
    out: Path | None = None,
) -> int:
    """``fedspatial submit``: validate the experiment config, submit it with ``flwr run
    --stream``, stream the run's log until the run ends and save the run report that the
    ServerApp sends back at the end (into ``out``, default ``<results-dir>/<run-name>``
    under the current folder, as ``fedspatial simulate`` would)."""
    from fedspatial.shared.config import load_config

    if connection is None and superlink is None:
        problem = default_connection_problem()
        if problem is not None:
            raise DeployError(
                f"no federation to submit to: {problem}. Name the coordinating center's SuperLink:\n"
                + connection_help(config)
            )
    cfg = load_config(config, overrides)
    app = (app_dir or project_root() or Path.cwd()).expanduser().resolve()
    if not (app / "pyproject.toml").is_file():
        raise DeployError(f"{app} is not the fedspatial Flower App (no pyproject.toml): pass --app PATH_TO_CHECKOUT")
    run_config = submit_run_config(cfg.to_run_config(), app_run_config_keys(app))
    local = (out or Path(cfg.results_dir) / cfg.run_name).expanduser()
    env = dict(os.environ)
    bundle: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="fedspatial-submit-") as tmp:
        if superlink is not None:
            if ca_cert is None:
                raise DeployError("--superlink needs --ca-cert (the federation's ca.crt)")
            check_superlink(superlink, ca_cert)
            env["FLWR_HOME"] = str(write_flwr_connection(Path(tmp) / "flwr", "fedspatial", superlink, ca_cert).parent)
            connection = "fedspatial"
        run_config_file = Path(tmp) / "run-config.toml"
        run_config_file.write_text(toml_table(run_config))
        # The bundle's files only: Flower would list all of .venv first (app_bundle).
        staged = stage_app(app, Path(tmp) / "app")
        cmd = [flower_binary("flwr"), "run", str(staged)]
        if connection:
            cmd.append(connection)
        cmd += ["--run-config", str(run_config_file), "--stream"]
        logger.info("submitting run '%s' (%d rounds) from %s", cfg.run_name, cfg.training.num_rounds, config)
        where = connection or "<connection>"
        try:
            code, bundle = _follow_run(cmd, flower_env(env))
        except KeyboardInterrupt:
            logger.warning(
                "stopped following run '%s'; the run goes on at the center: `flwr ls %s` lists "
                "runs, `fedspatial results RUN_ID --connection %s` follows one again and saves its "
                "report, `flwr stop RUN_ID %s` stops it",
                cfg.run_name, where, where, where,
            )
            return 130
    target = Path(cfg.results_dir) / cfg.run_name
    if code != 0:
        logger.error(
            "`flwr run` exited with code %d: see the log above. The run's checkpoint is at the "
            "center in %s/checkpoint/; resubmit with `--set resume=true` to continue it", code, target,
        )
        return code
    if bundle is None:
        # A script that submits runs must see this as a failure, not a finished run.
        logger.error(
            "the run ended but its report did not come back (the ServerApp stopped before the end, "
            "or the center runs another fedspatial version); results at the coordinating center: %s/", target,
        )
        return 1
    saved = save_results(bundle, local)
    logger.info(
        "run finished. Report saved to %s (%s); at the coordinating center: %s/ (also model/, "
        "checkpoint/); annotated sections stay at each hospital (its output-path)",
        local, ", ".join(p.name for p in saved), bundle.get("center-folder", target),
    )
    return 0


def run_results(run_id: int, *, connection: str | None, out: Path | None) -> int:
    """``fedspatial results RUN_ID``: follow a run's log to its end (``flwr log --stream``;
    at once for a finished run) and save the run report it carries."""
    cmd = [flower_binary("flwr"), "log", str(run_id)]
    if connection:
        cmd.append(connection)
    cmd.append("--stream")
    try:
        code, bundle = _follow_run(cmd, flower_env())
    except KeyboardInterrupt:
        return 130
    if code != 0:
        logger.error("`flwr log` exited with code %d: see the log above (run id, connection?)", code)
        return code
    if bundle is None:
        raise DeployError(
            f"run {run_id}'s log holds no run report: the run failed or was stopped before its end "
            "(see the log above), or it was run by another fedspatial version"
        )
    local = out.expanduser() if out is not None else default_results_folder(bundle["run-name"])
    saved = save_results(bundle, local)
    logger.info("report of run '%s' saved to %s (%s); at the coordinating center: %s/", bundle["run-name"],
                local, ", ".join(p.name for p in saved), bundle.get("center-folder"))
    return 0


def _follow_run(cmd: Sequence[str], env: Mapping[str, str]) -> tuple[int, dict[str, Any] | None]:
    """Run ``flwr run --stream``, pass its output through, and pick up the result line."""
    bundle: dict[str, Any] | None = None
    proc = subprocess.Popen(list(cmd), env=dict(env), stdout=subprocess.PIPE, text=True, errors="replace")
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            try:
                found = parse_result_line(line)
            except ResultLineError as err:
                logger.warning("%s; the report stays at the coordinating center", err)
                continue
            if found is None:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                bundle = found
                sys.stdout.write(f"[run report received: {', '.join(found['files'])}]\n")
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=15)
        raise
    return proc.wait(), bundle


# ----------------------------------------------------------------------------- its report


def save_results(bundle: Mapping[str, Any], folder: Path) -> list[Path]:
    """Write the bundle's files into ``folder`` (atomically), and nowhere else.

    The bundle comes from a run's log, which whoever runs code at the center can write:
    only the known report files are accepted, and a file that is a symbolic link (or a
    ``folder`` that resolves somewhere else through one) is refused, not followed.

    Raises
    ------
    DeployError
        Naming the file or folder refused; nothing is saved then.
    """
    from fedspatial.shared.storage.atomic import write_text_atomic

    try:
        check_bundle(bundle)
    except ResultLineError as err:
        raise DeployError(str(err)) from None
    folder = Path(folder).expanduser()
    if folder.is_symlink():
        raise DeployError(f"{folder} is a symbolic link: give a real folder with --out; nothing saved")
    base = folder.resolve()
    targets = {}
    for name in bundle["files"]:
        target = base / name
        if target.is_symlink() or target.resolve().parent != base:
            raise DeployError(f"{target} is a symbolic link or leads out of {base}; remove it, nothing saved")
        targets[name] = target
    return [write_text_atomic(targets[name], text) for name, text in bundle["files"].items()]


def default_results_folder(run_name: object, parent: Path = Path("results")) -> Path:
    """``<parent>/<run_name>`` for a run name from a run's log, checked to be one folder name.

    Raises
    ------
    DeployError
        When the name could lead elsewhere (a path, '..', a hidden folder).
    """
    if not is_valid_run_name(run_name):
        raise DeployError(f"the run report names the run {run_name!r}, not a valid run name "
                          f"({RUN_NAME_RULE}); nothing saved (pass --out DIR to choose the folder)")
    return parent / str(run_name)
