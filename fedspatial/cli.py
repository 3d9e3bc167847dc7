"""The ``fedspatial`` command line.

``fedspatial simulate CONFIG``    run a local federation (federated / local / centralized)
``fedspatial inspect PATH ...``   validate sites' data (one site, several, or a manifest) before a run
``fedspatial manifest PATH ...``  write a federation manifest (one site per folder/file) to edit
``fedspatial make-demo-data DIR`` write the built-in synthetic federation

Deployment (see deploy/README.md):

``fedspatial server``             the coordinating center's SuperLink (TLS, node auth, database)
``fedspatial client``             a hospital's SuperNode (outbound connection only)
``fedspatial keygen NAME``        a hospital's authentication key pair
``fedspatial app-hash PATH``      an app bundle's hash, for a hospital's --allowed-apps
``fedspatial submit CONFIG``      submit an experiment config, stream its log, save its report
``fedspatial results RUN_ID``     follow a submitted run again and save its report
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedspatial.shared.config import ExperimentConfig

logger = logging.getLogger("fedspatial")


def _setup_logging(verbose: bool, *, quiet: bool = False) -> None:
    """INFO lines (``-v``: DEBUG) on stderr.

    ``quiet`` (``fedspatial simulate`` without ``-v``): only WARNING and ERROR lines, as
    ``warning: ...``; the INFO records wait in a buffer until the run's log file exists
    (:class:`fedspatial.console.RunConsole` writes them there)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # opacus calls logging.basicConfig on import; ours must win
    )
    logging.getLogger("flwr").propagate = False  # Flower prints its own log lines
    if quiet and not verbose:
        from fedspatial.console import BufferHandler, UserFormatter

        root = logging.getLogger()
        for handler in root.handlers:
            handler.setLevel(logging.WARNING)
            handler.setFormatter(UserFormatter())
        root.addHandler(BufferHandler())


def _parse_set(items: list[str] | None) -> dict[str, object]:
    """``--set KEY=VALUE`` options -> config overrides (each value read as YAML)."""
    import yaml

    overrides: dict[str, object] = {}
    for item in items or []:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors a user fixes (a config, a path, the data): ``error: ...``, exit status 2."""
    from fedspatial.deployment.errors import DeployError
    from fedspatial.own_data import PreflightRefused
    from fedspatial.shared.config import ConfigError
    from fedspatial.shared.data.manifest import ManifestError

    return (ConfigError, DeployError, FileExistsError, FileNotFoundError, ManifestError, PreflightRefused)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedspatial.ray_cluster import check_reachable, ray_target
    from fedspatial.shared.config import ExperimentConfig, load_config
    from fedspatial.simulation import LOG_NAME, refuse_existing_run, simulate

    overrides = _parse_set(args.set)
    if args.resume:
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise SystemExit(f"--resume {run_dir}: no config.yaml there; is it a fedspatial run folder?")
        if args.data:
            raise SystemExit("--resume continues a run on its own data (its federation.json); drop --data")
        cfg = load_config(cfg_path, overrides)
        cfg = ExperimentConfig.from_dict(
            {**cfg.to_dict(), "results-dir": str(run_dir.parent), "run-name": run_dir.name}
        )
    else:
        if not args.config:
            raise SystemExit("give a config file (e.g. configs/demo.yaml) or --resume RUN_DIR")
        if args.run_name:
            overrides["run-name"] = args.run_name
        cfg = load_config(args.config, overrides)
    # A Ray cluster that does not answer fails now, before the data checks and the run folder
    # (simulate checks it again, and what its nodes see, inside the run's log).
    check_reachable(ray_target(args.ray_address))
    federation = _preflight_simulation(args, cfg)
    # "all": the three modes, whatever the config lists; none: the config's simulation.modes
    modes = {None: None, "all": ["federated", "local", "centralized"]}.get(args.mode, [args.mode])
    run_dir = Path(cfg.results_dir) / cfg.run_name
    refuse_existing_run(run_dir.resolve(), resume=bool(args.resume))
    import yaml

    from fedspatial.console import RunConsole, RunFailed

    command = " ".join(getattr(args, "argv", None) or sys.argv[1:])
    notes = f"command: fedspatial {command}\nconfig:\n{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}"
    try:
        with RunConsole(run_dir / LOG_NAME, verbose=args.verbose, expected=_expected_errors(), notes=notes):
            results = simulate(cfg, modes=modes, resume=bool(args.resume), federation=federation,
                               ray_address=args.ray_address)
    except RunFailed as failed:
        return failed.exit_code
    from fedspatial.server.report import comparison_table

    print()
    print(comparison_table(results))
    print(f"Results: {run_dir}/ (summary.md, summary.html, <mode>/metrics.json, <mode>/loss.png, "
          f"<mode>/sites/<site>/*.h5ad and *_domains.png)")
    return 0


def _preflight_simulation(args: argparse.Namespace, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """Check every site's data against the config before anything starts (raises
    PreflightRefused); returns the manifest written for ``--data`` (None: the config's)."""
    from fedspatial.own_data import (
        check_before_run,
        manifest_dict,
        recheck_command,
        site_inputs,
        sites_of_manifest,
    )
    from fedspatial.shared.data.preflight import Settings
    from fedspatial.simulation import ensure_federation

    config_name = args.config or str(Path(args.resume) / "config.yaml")
    if args.data:
        sites = site_inputs(args.data)
        manifest = ""
    else:
        manifest = str(ensure_federation(cfg))
        sites = sites_of_manifest(manifest)
    check_before_run(sites, Settings.from_config(cfg, config_name=config_name), allow=args.allow or (),
                     recheck=recheck_command(config_name, args.data, manifest, args.set or ()))
    return manifest_dict(sites) if args.data else None


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fedspatial.own_data import sites_of_paths
    from fedspatial.shared.data.preflight import Settings, run_preflight

    settings = Settings()
    if args.config:
        from fedspatial.shared.config import load_config

        settings = Settings.from_config(load_config(args.config, _parse_set(args.set)), config_name=args.config)
    keys = {k: v for k, v in (("spatial_key", args.spatial_key), ("label_key", args.label_key),
                              ("feature_key", args.feature_key)) if v is not None}
    settings = dataclasses.replace(settings, **keys)
    report = run_preflight(sites_of_paths(args.path), settings)
    where = " ".join(args.path)
    single = len(report.sites) == 1
    if single and report.sites[0].summary is not None:
        print(report.sites[0].summary.format())
        print()
    print(report.format())
    if report.errors:
        print(f"\n{len(report.errors)} problem(s) found in {where}: fix them before a run.")
        return 1
    if report.warnings:
        kinds = " ".join(sorted({f"--allow {f.kind}" for f in report.warnings}))
        print(f"\n{where}: usable, but `fedspatial simulate` refuses these warnings unless told {kinds}.")
        return 0
    print(f"\n{where}: OK, ready to join a federation.")
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from fedspatial.own_data import write_manifest

    out = write_manifest(args.path, Path(args.out), overwrite=args.overwrite)
    print(f"manifest written: {out} ({len(args.path)} site(s); data paths relative to its folder).")
    print(f"Edit the site names if needed, check it with `fedspatial inspect {out}`, and run it with "
          f"`fedspatial simulate CONFIG --set data.manifest={out}`.")
    return 0


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from fedspatial.shared.data.synthetic import write_synthetic_federation
    from fedspatial.simulation import synthetic_spec

    manifest = write_synthetic_federation(
        args.folder, synthetic_spec(seed=args.seed, scale=args.scale), overwrite=args.overwrite
    )
    print(f"synthetic federation written; manifest: {manifest.resolve()}")
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from fedspatial.deployment.nodes import ServerOptions, run_server

    return run_server(
        ServerOptions(
            certs=args.certs,
            ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile,
            ssl_ca_certfile=args.ssl_ca_certfile,
            database=args.database,
            host=args.host,
            port=args.port,
            log_file=args.log_file,
            workdir=args.workdir,
            control_host=args.control_host,
            control_port=args.control_port,
            expose_control_api=args.expose_control_api,
            serverappio_port=args.serverappio_port,
        )
    )


def _cmd_client(args: argparse.Namespace) -> int:
    from fedspatial.deployment.nodes import ClientOptions, run_client

    return run_client(
        ClientOptions(
            superlink=args.superlink,
            data_path=args.data_path,
            ca_cert=args.ca_cert,
            auth_key=args.auth_key,
            site_name=args.site_name,
            output_path=args.output_path,
            runtime_port=args.runtime_port,
            connect_timeout=args.connect_timeout,
            spatial_key=args.spatial_key,
            label_key=args.label_key,
            clientapp_runner=args.clientapp_runner,
            allowed_apps=tuple(args.allowed_apps or ()),
            allow_app=tuple(args.allow_app or ()),
            policy=args.policy,
            executor_user=args.executor_user,
        )
    )


def _cmd_app_hash(args: argparse.Namespace) -> int:
    from fedspatial.deployment.app_pinning import app_hash

    for path in args.path:
        digest, what = app_hash(Path(path))
        print(f"{digest}  # {what}")  # a line of an --allowed-apps file
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from fedspatial.deployment.certificates import generate_keypair

    private, public = generate_keypair(
        Path(args.out) / f"{args.name}.key", comment=args.name, overwrite=args.overwrite
    )
    print(f"private key (keep at this hospital, never send it): {private}")
    print(f"public key (send to the coordinating center):        {public}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from fedspatial.deployment.submit import run_submit

    overrides = _parse_set(args.set)
    if args.run_name:
        overrides["run-name"] = args.run_name
    return run_submit(
        Path(args.config),
        overrides=overrides,
        connection=args.connection,
        superlink=args.superlink,
        ca_cert=args.ca_cert,
        app_dir=args.app,
        out=args.out,
    )


def _cmd_results(args: argparse.Namespace) -> int:
    from fedspatial.deployment.submit import run_results

    return run_results(args.run_id, connection=args.connection, out=args.out)


def _add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    from fedspatial.deployment.network import (
        DEFAULT_CLIENT_RUNTIME_PORT,
        DEFAULT_CONTROL_PORT,
        DEFAULT_PORT,
        DEFAULT_SERVERAPPIO_PORT,
    )

    srv = sub.add_parser(
        "server",
        help="coordinating center: run the SuperLink (TLS, SuperNode authentication, database)",
        description="Check certificates, database folder and ports, then run Flower's SuperLink with "
        "TLS, SuperNode authentication and a database (so that it can restart). Only the Fleet API "
        f"(hospitals) listens on --host:--port (default {DEFAULT_PORT}); the Control API (`flwr`, "
        f"`fedspatial submit`) on 127.0.0.1:{DEFAULT_CONTROL_PORT} (operators reach it through an SSH "
        f"tunnel) and the ServerAppIo API on 127.0.0.1:{DEFAULT_SERVERAPPIO_PORT}.",
    )
    srv.add_argument("--certs", type=Path, help="folder with ca.crt, server.crt, server.key (deploy/gen-certs.sh)")
    srv.add_argument("--ssl-certfile", type=Path, help="server certificate (instead of --certs)")
    srv.add_argument("--ssl-keyfile", type=Path, help="server private key (instead of --certs)")
    srv.add_argument("--ssl-ca-certfile", type=Path, help="CA certificate (instead of --certs)")
    srv.add_argument("--database", type=Path, default=Path("fedspatial-state/superlink.db"),
                     help="SQLite state (registered hospitals, runs); keep it across restarts")
    srv.add_argument("--host", default="0.0.0.0", help="address of the Fleet API, for the hospitals (default: all interfaces)")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Fleet API port (default: {DEFAULT_PORT})")
    srv.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT,
                     help=f"Control API port (flwr, fedspatial submit; default: {DEFAULT_CONTROL_PORT})")
    srv.add_argument("--control-host", default="127.0.0.1",
                     help="Control API address (default 127.0.0.1: reach it through an SSH tunnel); "
                     "another address needs --expose-control-api")
    srv.add_argument("--expose-control-api", action="store_true",
                     help="allow a non-loopback --control-host. DANGER: Flower has no user accounts; whoever "
                     "reaches the Control API runs code at every hospital")
    srv.add_argument("--serverappio-port", type=int, default=DEFAULT_SERVERAPPIO_PORT,
                     help=f"the ServerAppIo API's port, always on 127.0.0.1 (default: {DEFAULT_SERVERAPPIO_PORT})")
    srv.add_argument("--log-file", type=Path, help="also write the SuperLink log here (rotated daily)")
    srv.add_argument("--workdir", type=Path,
                     help="working directory of the SuperLink and its ServerApps: a relative run "
                     "config results-dir is resolved against it (default: the current directory)")
    srv.set_defaults(func=_cmd_server)

    cli = sub.add_parser(
        "client",
        help="hospital: run a SuperNode that connects out to the SuperLink",
        description="Check the key, the CA certificate, the site's data (as `fedspatial inspect`) "
        "and that the SuperLink answers with a certificate from that CA, then run "
        "flower-supernode. The connection is outbound only.",
    )
    cli.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the center's SuperLink")
    cli.add_argument("--data-path", required=True, type=Path, help="this site's .h5ad file or folder")
    cli.add_argument("--ca-cert", required=True, type=Path, help="the federation's ca.crt (from the center)")
    cli.add_argument("--auth-key", required=True, type=Path, help="this hospital's private key (fedspatial keygen)")
    cli.add_argument("--site-name", help="name in reports (default: the data folder's name)")
    cli.add_argument("--output-path", type=Path,
                     help="where annotated sections are written (default: <data-path>/../fedspatial-results/<run>/<site>)")
    cli.add_argument("--runtime-port", type=int, default=DEFAULT_CLIENT_RUNTIME_PORT,
                     help="local port (127.0.0.1) for this SuperNode's ClientApps; distinct per SuperNode on one machine")
    cli.add_argument("--connect-timeout", type=float, default=10.0,
                     help="seconds to wait for the SuperLink in the pre-flight check (default: 10)")
    cli.add_argument("--spatial-key", default="spatial")
    cli.add_argument("--label-key", default="domain")
    cli.add_argument("--clientapp-runner", choices=("warm", "flower", "external"), default="warm",
                     help="warm (default): run each message's ClientApp in a process forked from one "
                     "that has imported it already (seconds faster per message); flower: Flower's own "
                     "executor starts a fresh flwr-clientapp process per message; external: the warm "
                     "executor runs in a unit of its own, as --executor-user (deploy/README.md, Confinement)")
    cli.add_argument("--executor-user", metavar="USER[:GROUP]",
                     help="OS user the ClientApps (the run's code) run as; it must not be able to read "
                     "--auth-key (refused otherwise). warm: fedspatial client, started as root, starts the "
                     "executor as this user; external: the user of the executor's own unit")
    cli.add_argument("--allowed-apps", action="append", type=Path, metavar="FILE",
                     help="run only app bundles whose SHA-256 is listed in FILE (one hash per line, "
                     "'#' comments; `fedspatial app-hash`; repeatable). Default: any app the center submits")
    cli.add_argument("--allow-app", action="append", metavar="SHA256",
                     help="allow this app bundle hash (repeatable; with or instead of --allowed-apps)")
    cli.add_argument("--policy", type=Path, metavar="FILE",
                     help="this site's own limits (TOML: require-local-dp, max-epsilon, max-delta, "
                     "allowed-label-keys, min-cell-count, max-rounds, allow-unnoised-releases; deploy/README.md). "
                     "A message that breaks one is refused. Default: none, the server's run config decides")
    cli.set_defaults(func=_cmd_client)

    aph = sub.add_parser("app-hash", help="hospital: print an app bundle's SHA-256 for --allowed-apps",
                         description="Print the SHA-256 of a Flower App bundle: a .fab file (`flwr build`) "
                         "or an app folder, bundled exactly as `flwr run` / `fedspatial submit` do. "
                         "Each output line is a line of an --allowed-apps file.")
    aph.add_argument("path", nargs="+", help=".fab file or app folder (a checkout of the reviewed version)")
    aph.set_defaults(func=_cmd_app_hash)

    key = sub.add_parser("keygen", help="hospital: make the SuperNode authentication key pair",
                         description="Write NAME.key (private, stays here, mode 600) and NAME.pub "
                         "(send to the coordinating center for registration).")
    key.add_argument("name", help="hospital name, e.g. hospital_a")
    key.add_argument("--out", default=".", help="folder (default: current)")
    key.add_argument("--overwrite", action="store_true")
    key.set_defaults(func=_cmd_keygen)

    sbm = sub.add_parser("submit", help="submit an experiment config to the SuperLink and stream the run",
                         description="Validate a YAML experiment config, submit it with `flwr run "
                         "--stream`, stream the run's log until it ends, and save the run report "
                         "(metrics.json, config.json) that the coordinating center sends back.")
    sbm.add_argument("config", help="experiment config (YAML)")
    sbm.add_argument("--connection", help="connection name in ~/.flwr/config.toml (default: its default)")
    sbm.add_argument("--superlink", metavar="HOST:PORT",
                     help="the center's Control API (e.g. 127.0.0.1:9093 through an SSH tunnel) instead of a named connection")
    sbm.add_argument("--ca-cert", type=Path, help="the federation's ca.crt (with --superlink)")
    sbm.add_argument("--app", type=Path, help="the fedspatial Flower App folder (default: this checkout)")
    sbm.add_argument("--out", type=Path,
                     help="where to save the run report (default: <results-dir>/<run-name> in the current folder)")
    sbm.add_argument("--run-name")
    sbm.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    sbm.set_defaults(func=_cmd_submit)

    res = sub.add_parser("results", help="follow a submitted run again and save its report",
                         description="Follow a run's log until it ends (`flwr log RUN_ID --stream`; at "
                         "once for a finished run) and save the run report it carries, as "
                         "`fedspatial submit` does. Run ids: `flwr ls CONNECTION`.")
    res.add_argument("run_id", type=int, help="the run id (`flwr ls CONNECTION`)")
    res.add_argument("--connection", help="connection name in ~/.flwr/config.toml (default: its default)")
    res.add_argument("--out", type=Path, help="where to save the report (default: results/<run-name>)")
    res.set_defaults(func=_cmd_results)


def build_parser() -> argparse.ArgumentParser:
    from fedspatial.shared.data.crosssite import KINDS

    parser = argparse.ArgumentParser(prog="fedspatial", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging; `simulate`: also show its whole log (Flower, Ray), not only the progress")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a local federated simulation from a YAML config")
    sim.add_argument("config", nargs="?", help="experiment config (YAML), e.g. configs/demo.yaml")
    sim.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="also show the whole log (Flower, Ray, every fedspatial line), not only the progress")
    sim.add_argument("--mode", choices=["federated", "local", "centralized", "all"], default=None,
                     help="run one mode, or all three (default: the config's simulation.modes; --resume "
                     "continues the modes its run started with)")
    sim.add_argument("--run-name", help="results go to <results-dir>/<run-name>/")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config key, e.g. --set training.num-rounds=5 (repeatable)")
    sim.add_argument("--data", nargs="+", metavar="[NAME=]PATH",
                     help="your own sites: each folder, .h5ad file, SpatialData .zarr store or Space Ranger / Xenium output folder is one hospital "
                     "(named after it, or NAME=PATH); the manifest is written into the run folder")
    sim.add_argument("--allow", action="append", choices=sorted(KINDS), metavar="KIND",
                     help="go ahead despite this pre-flight warning (repeatable): "
                     + "; ".join(f"{k}: {v}" for k, v in KINDS.items()))
    sim.add_argument("--ray-address", metavar="HOST:PORT",
                     help="run on this running Ray cluster: its head's address (`ray start --head --port`), "
                     "or `auto` (the cluster started on this machine); run this command on a node of the "
                     "cluster. Every node needs the same environment and sees the data and results-dir at "
                     "the same paths (checked before the run). Default: $RAY_ADDRESS if set, else a Ray "
                     "started on this machine (also `local`)")
    sim.set_defaults(func=_cmd_simulate)

    ins = sub.add_parser("inspect", help="check sites' data (one site, several, or a manifest) and compare them",
                         description="Validate each site's sections and compare the sites: features per "
                         "site and shared, what the federation would drop, species/identifier scheme, label "
                         "columns, count-like X. With --config, also the config against the data, exactly "
                         "as `fedspatial simulate` checks before it starts.")
    ins.add_argument("path", nargs="+", metavar="PATH",
                     help="site folders / .h5ad files / .zarr stores / Space Ranger or Xenium folders ([NAME=]PATH), or one federation.json")
    ins.add_argument("--config", help="also check this experiment config against the data")
    ins.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (with --config)")
    ins.add_argument("--spatial-key", help="obsm key of the coordinates (default: spatial, or the config's)")
    ins.add_argument("--label-key", help="obs column of the labels (default: domain, or the config's)")
    ins.add_argument("--feature-key", help="var column matching features across sites (default: var_names)")
    ins.set_defaults(func=_cmd_inspect)

    man = sub.add_parser("manifest", help="write a federation manifest for your site folders, to edit",
                         description="Write a federation manifest: one site per folder, .h5ad file or "
                         ".zarr store, named after it (or NAME=PATH), data paths relative to the manifest.")
    man.add_argument("path", nargs="+", metavar="[NAME=]PATH")
    man.add_argument("--out", default="federation.json", help="manifest file (default: federation.json)")
    man.add_argument("--overwrite", action="store_true")
    man.set_defaults(func=_cmd_manifest)

    demo = sub.add_parser("make-demo-data", help="write the built-in synthetic federation")
    demo.add_argument("folder", nargs="?", default="data/synthetic")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=float, default=1.0, help="multiply section sizes")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(func=_cmd_make_demo_data)

    _add_deploy_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the run's log
    _setup_logging(args.verbose, quiet=args.command == "simulate")
    try:
        return int(args.func(args))
    except _expected_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
