"""``fedspatial server`` and ``fedspatial client``: check the center's or the hospital's
setup, build the ``flower-superlink`` / ``flower-supernode`` command line, and run it."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspatial.deployment.certificates import (
    check_auth_key,
    check_no_other_private_keys,
    check_server_certificates,
    load_certificate,
    public_key_path,
)
from fedspatial.deployment.confinement import (
    ExecutorUser,
    check_key_confined,
    executor_process_options,
    remove_flwr_home,
    resolve_executor_user,
)
from fedspatial.deployment.errors import SUPERLINK_EXIT_HELP, SUPERNODE_EXIT_HELP, DeployError
from fedspatial.deployment.network import (
    DEFAULT_CLIENT_RUNTIME_PORT,
    DEFAULT_CONTROL_PORT,
    DEFAULT_PORT,
    DEFAULT_SERVERAPPIO_PORT,
    check_superlink,
    format_address,
    is_loopback,
    parse_address,
    port_free,
)
from fedspatial.deployment.processes import flower_env, run_child

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- local checks


def check_site_data(data_path: str | Path, *, spatial_key: str = "spatial", label_key: str = "domain") -> str:
    """Run ``fedspatial inspect``'s checks on a hospital's data path: errors refuse, the
    warnings (non-count X, tiny or all-zero sections, shared coordinates ...) are logged.

    Returns
    -------
    str
        The site summary (sections, spots, features).

    Raises
    ------
    DeployError
        When the path is missing or any problem is found.
    """
    from fedspatial.shared.data.preflight import Settings, run_preflight

    path = Path(data_path).expanduser()
    if not path.exists():
        raise DeployError(
            f"data path {path} does not exist: give the folder (or .h5ad file) holding this "
            "hospital's sections with --data-path, and check it with `fedspatial inspect PATH`"
        )
    report = run_preflight([(path.resolve().name or str(path), str(path))], Settings(spatial_key=spatial_key, label_key=label_key))
    problems = [f.message for f in report.errors]
    if problems:
        listed = "\n  - ".join(problems)
        raise DeployError(f"{len(problems)} problem(s) in {path} (`fedspatial inspect {path}`):\n  - {listed}")
    for finding in report.warnings:  # the run config (n-neighbors, labels) decides; the data manager should know
        logger.warning("data check [%s]: %s", finding.kind, finding.message)
    summary = report.sites[0].summary if report.sites else None
    return summary.format() if summary is not None else ""


def _check_writable_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise DeployError(f"{what} {path} is not writable ({err.strerror}): check its owner and permissions") from None


def _toml_string(value: str, what: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    raise DeployError(f"{what} {value!r} contains both quote characters: rename or link it")


# ----------------------------------------------------------------------------- the center


@dataclass(frozen=True)
class ServerOptions:
    """What ``fedspatial server`` needs (its options: :mod:`fedspatial.cli`)."""

    certs: Path | None
    ssl_certfile: Path | None
    ssl_keyfile: Path | None
    ssl_ca_certfile: Path | None
    database: Path
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    """The Fleet API (hospitals): the only API on ``host``."""
    log_file: Path | None = None
    workdir: Path | None = None
    control_host: str = "127.0.0.1"
    control_port: int = DEFAULT_CONTROL_PORT
    """The Control API (operators, submitters); off loopback only with ``expose_control_api``."""
    expose_control_api: bool = False
    serverappio_port: int = DEFAULT_SERVERAPPIO_PORT
    """Flower's ServerAppIo (runtime) API, always on 127.0.0.1."""

    def cert_paths(self) -> tuple[Path, Path, Path]:
        if self.certs is not None:
            base = self.certs.expanduser()
            return base / "server.crt", base / "server.key", base / "ca.crt"
        if not (self.ssl_certfile and self.ssl_keyfile and self.ssl_ca_certfile):
            raise DeployError(
                "give --certs DIR (ca.crt, server.crt, server.key from deploy/gen-certs.sh) or all of "
                "--ssl-certfile, --ssl-keyfile and --ssl-ca-certfile"
            )
        return self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certfile


def superlink_command(opts: ServerOptions) -> list[str]:
    """Check the center's setup and return the ``flower-superlink`` command line.

    Raises
    ------
    DeployError
        Certificates (see :func:`check_server_certificates`), a database folder that
        cannot be written, or a port already in use.
    """
    cert, key, ca = opts.cert_paths()
    check_no_other_private_keys([cert.parent, key.parent, ca.parent], key)
    # The SuperLink's own ServerApps reach it on 127.0.0.1: that name must be in the certificate.
    names = check_server_certificates(cert, key, ca, "127.0.0.1")
    database = opts.database.expanduser().resolve()
    _check_writable_dir(database.parent, "database folder")
    check_control_exposure(opts)
    ports = [(opts.host, opts.port, "--port"), (opts.control_host, opts.control_port, "--control-port"),
             ("127.0.0.1", opts.serverappio_port, "--serverappio-port")]
    if len({p for _, p, _ in ports}) < len(ports):
        raise DeployError("--port, --control-port and --serverappio-port must be three different ports")
    for host, port, option in ports:
        if not port_free(host, port):
            raise DeployError(
                f"port {port} on {host} is already in use: another SuperLink (or another "
                f"service) runs there; stop it, or choose another port with {option}"
            )
    logger.info("SuperLink certificate is valid for: %s (hospitals connect to one of these, port %d)",
                ", ".join(names), opts.port)
    logger.info("state database: %s (%s)", database, "existing" if database.exists() else "new")
    cmd = [
        # -P: the working directory (where runs write) never shadows an installed module.
        sys.executable, "-P", "-m", "fedspatial.deployment.superlink",
        "--fleet", format_address(opts.host, opts.port),
        "--control", format_address(opts.control_host, opts.control_port),
        "--",
        "--ssl-certfile", str(cert.expanduser().resolve()),
        "--ssl-keyfile", str(key.expanduser().resolve()),
        "--ssl-ca-certfile", str(ca.expanduser().resolve()),
        "--enable-supernode-auth",
        "--database", str(database),
        # Flower's own --host/--port: the ServerAppIo listener (fedspatial.deployment.superlink).
        "--host", "127.0.0.1",
        "--port", str(opts.serverappio_port),
        # The center runs the installed fedspatial; never pip/uv-install what a run asks for.
        "--disable-runtime-dependency-installation",
        # The runs' ServerApps: fedspatial's warm executor (server_executor_command), not Flower's SuperExec.
        "--isolation", "process",
    ]
    if opts.log_file is not None:
        log_file = opts.log_file.expanduser().resolve()
        _check_writable_dir(log_file.parent, "log folder")
        cmd += ["--log-file", str(log_file)]
    return cmd


def check_control_exposure(opts: ServerOptions) -> None:
    """The Control API off loopback needs ``--expose-control-api``, and is warned about.

    Open-source Flower 1.42 has no user accounts on it: whoever reaches it submits runs
    (code that runs at the center and at every hospital) and registers SuperNode keys.

    Raises
    ------
    DeployError
        A non-loopback ``--control-host`` without ``--expose-control-api``.
    """
    if is_loopback(opts.control_host):
        return
    if not opts.expose_control_api:
        raise DeployError(
            f"--control-host {opts.control_host} would expose the Control API, through which anyone who reaches "
            "it submits runs that execute at every hospital: keep the default 127.0.0.1 and use an SSH tunnel "
            "(deploy/README.md), or add --expose-control-api behind a firewall that admits only your operators"
        )
    banner = "!" * 78
    logger.warning(
        "\n%s\nTHE CONTROL API IS EXPOSED on %s. Open-source Flower has no user accounts: ANYONE who "
        "reaches this address can submit runs (code that executes at the center and at EVERY HOSPITAL), "
        "register SuperNode keys and stop runs. Admit only your operators' addresses (firewall/VPN), or "
        "restart without --expose-control-api and use an SSH tunnel.\n%s",
        banner, format_address(opts.control_host, opts.control_port), banner,
    )


def run_server(opts: ServerOptions) -> int:
    """``fedspatial server``: check, then run the SuperLink until stopped."""
    cmd = superlink_command(opts)
    cwd = opts.workdir.expanduser().resolve() if opts.workdir else None
    if cwd is not None:
        cwd.mkdir(parents=True, exist_ok=True)
    logger.info("starting the SuperLink (TLS, SuperNode authentication): hospitals (Fleet API) on %s; "
                "Control API on %s; ServerAppIo API on %s",
                format_address(opts.host, opts.port), format_address(opts.control_host, opts.control_port),
                format_address("127.0.0.1", opts.serverappio_port))
    explain = {k: v.format(database=opts.database) for k, v in SUPERLINK_EXIT_HELP.items()}
    executor = "the ServerApp executor"
    return run_child(cmd, explain=explain, what="flower-superlink", cwd=cwd,
                     helpers={executor: server_executor_command(opts)},
                     helper_options={executor: {"cwd": cwd}} if cwd is not None else None)


def server_executor_command(opts: ServerOptions) -> list[str]:
    """The warm ServerApp executor next to ``flower-superlink --isolation process``: it
    imports the ServerApp once, when the center starts, and forks each run's ServerApp
    from there (Flower's own ``flwr-serverapp``; seconds of imports saved per run)."""
    from fedspatial.clientapp_executor import LAUNCH_COMMAND

    _, _, ca = opts.cert_paths()
    return [
        sys.executable, "-c", LAUNCH_COMMAND, "--task-type", "serverapp",
        "--runtime-api-address", f"127.0.0.1:{opts.serverappio_port}",
        "--root-certificates", str(ca.expanduser().resolve()),
        "--parent-pid", str(os.getpid()),
    ]


# ----------------------------------------------------------------------------- a hospital


@dataclass(frozen=True)
class ClientOptions:
    """What ``fedspatial client`` needs (its options: :mod:`fedspatial.cli`)."""

    superlink: str
    data_path: Path
    ca_cert: Path
    auth_key: Path
    site_name: str | None = None
    output_path: Path | None = None
    runtime_port: int = DEFAULT_CLIENT_RUNTIME_PORT
    connect_timeout: float = 10.0
    spatial_key: str = "spatial"
    label_key: str = "domain"
    clientapp_runner: str = "warm"
    """``warm``: :mod:`fedspatial.clientapp_executor` runs the ClientApps from a preloaded
    fork server; ``flower``: Flower's own SuperExec starts ``flwr-clientapp`` per message."""
    allowed_apps: tuple[Path, ...] = ()
    """Allow-list files of app bundle hashes (:mod:`fedspatial.deployment.app_pinning`)."""
    allow_app: tuple[str, ...] = ()
    """Allowed app bundle hashes given on the command line."""
    policy: Path | None = None
    """The site policy file (:mod:`fedspatial.shared.privacy.policy`); ``None``: the run config decides."""
    executor_user: str | None = None
    """The OS user the ClientApps run as, who must not read the key (:mod:`fedspatial.deployment.confinement`)."""


CLIENTAPP_RUNNERS = ("warm", "flower", "external")
"""``external``: the executor runs in a unit or container of its own (another user)."""


def client_allow_list(opts: ClientOptions) -> dict[str, str] | None:
    """The hospital's allowed app bundle hashes (``None``: any bundle runs).

    Raises
    ------
    DeployError
        A bad allow-list (see :func:`load_allow_list`), or one with ``--clientapp-runner
        flower``: Flower 1.42's own runner cannot check a bundle's hash (its
        ``--trusted-entities`` verifies only bundles signed through Flower Hub).
    """
    from fedspatial.deployment.app_pinning import load_allow_list

    allowed = load_allow_list(opts.allowed_apps, opts.allow_app)
    if allowed is not None and opts.clientapp_runner == "external":
        raise DeployError(
            "--clientapp-runner external: give --allowed-apps/--allow-app to the executor itself "
            "(its own unit: deploy/systemd/fedspatial-executor.service), not to `fedspatial client`"
        )
    if allowed is not None and opts.clientapp_runner != "warm":
        raise DeployError(
            "--allowed-apps/--allow-app need --clientapp-runner warm (the default): Flower's own runner "
            "cannot pin app bundles by hash (its --trusted-entities only verifies bundles signed "
            "through Flower Hub, not one submitted with `flwr run`)"
        )
    return allowed


def client_policy(opts: ClientOptions) -> Path | None:
    """Validate the site policy file strictly (before anything connects) and log what it
    enforces, or say loudly that there is none; returns its absolute path."""
    from fedspatial.shared.privacy.policy import NO_POLICY_WARNING, load_policy

    if opts.policy is None:
        logger.warning("%s", NO_POLICY_WARNING)
        return None
    path = Path(opts.policy).expanduser().resolve()
    policy = load_policy(path)  # SitePolicyError (a ConfigError): `fedspatial client` stops here
    logger.info("site policy %s (re-read at every message; a message that breaks it is refused): %s", path, policy.summary())
    return path


def supernode_command(opts: ClientOptions) -> list[str]:
    """Check the hospital's setup and return the ``flower-supernode`` command line.

    Order: files first (cheap, local), then the data, then the network.

    Raises
    ------
    DeployError
        See :func:`check_auth_key`, :func:`check_site_data`, :func:`check_superlink`.
    """
    host, port = parse_address(opts.superlink)
    client_allow_list(opts)
    policy = client_policy(opts)
    ca = Path(opts.ca_cert).expanduser().resolve()
    load_certificate(ca, "CA certificate")
    key = check_auth_key(opts.auth_key).resolve()
    executor_user = client_executor_user(opts)
    check_key_confined(key, executor_user)
    data = Path(opts.data_path).expanduser().resolve()
    summary = check_site_data(data, spatial_key=opts.spatial_key, label_key=opts.label_key)
    logger.info("site data %s:\n%s", data, summary)
    site = opts.site_name or data.stem
    node_config = [f"data-path={_toml_string(str(data), 'data path')}", f"site-name={_toml_string(site, 'site name')}"]
    if opts.output_path is not None:
        out = Path(opts.output_path).expanduser().resolve()
        if executor_user is None:
            _check_writable_dir(out, "output path")
        else:  # the executor's user writes there, not this one
            logger.info("output path %s must be writable by the executor's user %s", out, executor_user.spec)
        node_config.append(f"output-path={_toml_string(str(out), 'output path')}")
    elif executor_user is None:
        _check_writable_dir(data.parent / "fedspatial-results", "output folder")
    if policy is not None:
        node_config.append(f"policy-path={_toml_string(str(policy), 'policy path')}")
    if not port_free("127.0.0.1", opts.runtime_port):
        raise DeployError(
            f"local port {opts.runtime_port} (this SuperNode's Runtime API, 127.0.0.1 only) is in use: "
            "another SuperNode runs on this machine; give each one its own --runtime-port"
        )
    if opts.clientapp_runner not in CLIENTAPP_RUNNERS:
        raise DeployError(f"--clientapp-runner must be one of {', '.join(CLIENTAPP_RUNNERS)}, not {opts.clientapp_runner!r}")
    check_superlink(format_address(host, port), ca, timeout=opts.connect_timeout)
    return [
        # Flower's SuperNode, asking for the next message sooner inside a run
        # (fedspatial.deployment.supernode); -P: the working directory never shadows a module.
        sys.executable, "-P", "-m", "fedspatial.deployment.supernode", "--",
        "--superlink", format_address(host, port),
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key),
        "--node-config", " ".join(node_config),
        # The Runtime API is for this machine's ClientApp processes only.
        "--host", "127.0.0.1",
        "--port", str(opts.runtime_port),
        # warm: our executor, not Flower's SuperExec, starts the ClientApps.
        "--isolation", "subprocess" if opts.clientapp_runner == "flower" else "process",
    ]


def client_executor_user(opts: ClientOptions) -> ExecutorUser | None:
    """The ``--executor-user`` (``None``: the ClientApps run as this process's user).

    Raises
    ------
    DeployError
        An unknown user; ``external`` without one (a separate unit must say who it runs as).
    """
    if opts.executor_user is None:
        if opts.clientapp_runner == "external":
            raise DeployError("--clientapp-runner external needs --executor-user (the user the executor's unit runs as), "
                              "so that the key can be checked against it")
        return None
    if opts.clientapp_runner == "flower":
        raise DeployError("--executor-user needs --clientapp-runner warm or external (Flower's own runner "
                          "starts the ClientApps as the SuperNode's user)")
    user = resolve_executor_user(opts.executor_user)
    if opts.clientapp_runner == "warm" and os.geteuid() != 0:
        raise DeployError(
            f"--executor-user {user.spec} with --clientapp-runner warm needs `fedspatial client` to start as root "
            "(it starts the executor as that user); otherwise run the executor in its own unit as that user and "
            "give --clientapp-runner external (deploy/systemd/fedspatial-executor.service)"
        )
    return user


def executor_command(opts: ClientOptions, allowed: Mapping[str, str] | None) -> list[str]:
    """The warm ClientApp executor next to ``flower-supernode --isolation process``;
    ``allowed``: the hospital's app allow-list (:func:`client_allow_list`), if any."""
    from fedspatial.clientapp_executor import LAUNCH_COMMAND

    return [
        sys.executable, "-c", LAUNCH_COMMAND,
        "--runtime-api-address", f"127.0.0.1:{opts.runtime_port}",
        "--parent-pid", str(os.getpid()),
        *[arg for h in sorted(allowed or {}) for arg in ("--allow-app", h)],
    ]


def run_client(opts: ClientOptions) -> int:
    """``fedspatial client``: check, then run ``flower-supernode`` until stopped."""
    cmd = supernode_command(opts)
    pub = public_key_path(opts.auth_key)
    explain = {
        k: v.format(auth_key=opts.auth_key, auth_pub=pub, auth_pub_name=pub.name, ca_cert=opts.ca_cert)
        for k, v in SUPERNODE_EXIT_HELP.items()
    }
    allowed = client_allow_list(opts)
    if allowed is None and opts.clientapp_runner == "external":
        logger.info("app allow-list: held by the executor's own unit (its --allowed-apps)")
    elif allowed is None:
        from fedspatial.deployment.app_pinning import NO_ALLOW_LIST_WARNING

        logger.warning(NO_ALLOW_LIST_WARNING)
    else:
        logger.info("app allow-list: only these app bundles run here:\n  %s",
                    "\n  ".join(f"{h}  {c}".rstrip() for h, c in sorted(allowed.items())))
    logger.info("connecting to the SuperLink at %s (outbound only)", opts.superlink)
    executor = "the ClientApp executor"
    helpers = {executor: executor_command(opts, allowed)} if opts.clientapp_runner == "warm" else {}
    user = client_executor_user(opts)
    options: dict[str, dict[str, Any]] = {}
    flwr_home = None
    if helpers and user is not None:
        options[executor], flwr_home = executor_process_options(user, flower_env())
        options[executor]["cwd"] = flwr_home
        logger.info("the ClientApp executor runs as %s (uid %d), FLWR_HOME %s", user.spec, user.uid, flwr_home)
    elif opts.clientapp_runner == "external":
        logger.info("ClientApps: the executor of its own unit (user %s) takes them from 127.0.0.1:%d",
                    opts.executor_user, opts.runtime_port)
    try:
        return run_child(
            cmd, explain=explain, what="flower-supernode",
            ended_by_itself="the coordinating center has probably removed this hospital "
            "(`flwr supernode unregister`); ask the center before starting it again",
            helpers=helpers, helper_options=options,
        )
    finally:
        if flwr_home is not None:
            remove_flwr_home(flwr_home)
