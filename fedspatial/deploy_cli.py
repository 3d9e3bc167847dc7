"""Deployment: thin wrappers over Flower's ``flower-superlink`` and ``flower-supernode``.

``fedspatial server``  the coordinating center's SuperLink (TLS, SuperNode authentication,
                       a database so that it can restart)
``fedspatial client``  a hospital's SuperNode (outbound connection only)
``fedspatial keygen``  a hospital's authentication key pair
``fedspatial submit``  submit an experiment config as a Flower run and stream its log

Each wrapper checks what Flower would otherwise report late or cryptically (certificates,
keys, the site's data, whether the SuperLink can be reached and speaks TLS with the given
CA) and stops with a message that says what happened and what to do. Then it runs the
Flower command as a child process, forwards SIGINT/SIGTERM to it and translates Flower's
exit codes into the same kind of message.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9092
"""The center's one TCP port: Flower 1.42 serves the Fleet API (hospitals), the Control
API (``flwr run``, ``flwr supernode register``) and its Runtime API on the same port."""
DEFAULT_CLIENT_RUNTIME_PORT = 9094
"""A SuperNode's local Runtime API port (127.0.0.1 only; ClientApp processes use it)."""
CERT_WARN_DAYS = 30

# Flower exit codes (flwr.supercore.exit.ExitCode) -> what a hospital or the center can do.
# A code may be refined by a marker in Flower's log: 305 covers every failed first contact.
_SUPERNODE_EXIT_HELP: dict[tuple[int, str], str] = {
    (302, ""): "the authentication key {auth_key} is not an EC private key in OpenSSH format: "
    "make a new pair with `fedspatial keygen` and have the center register the new .pub",
    (305, "[code: 2004]"): "the SuperLink refused this SuperNode. Either (a) this hospital's "
    "public key is not registered at the center: send {auth_pub} to the coordinating center, "
    "who registers it with `flwr supernode register {auth_pub_name} <connection>`; or (b) a "
    "SuperNode with the same key is still marked online there (another copy is running, or "
    "one stopped less than about a minute ago without signing off): stop the other copy or "
    "wait a minute, then start again",
    (305, "CERTIFICATE_VERIFY_FAILED"): "the SuperLink's certificate could not be verified with "
    "{ca_cert}: the CA file is wrong or the center's certificate changed; start again to get "
    "the pre-flight diagnosis",
    (305, ""): "the first contact with the SuperLink failed (see the log above): check the "
    "address, that the SuperLink runs, and that this machine may connect out to it",
    (606, ""): "this hospital's Flower version differs from the center's: install the same "
    "fedspatial release (same flwr version) as the coordinating center",
}
_SUPERLINK_EXIT_HELP: dict[tuple[int, str], str] = {
    (104, ""): "flower-superlink rejected its arguments (see the log above)",
    (105, ""): "the database {database} was written by another Flower version: start with the "
    "version that wrote it, or move the file away to start with an empty state "
    "(hospitals must then be registered again)",
}


def explain_exit(help_table: Mapping[tuple[int, str], str], code: int, log_lines: Sequence[str]) -> str | None:
    """The most specific explanation of Flower exit ``code`` given its log."""
    text = "\n".join(log_lines)
    for (known, marker), hint in help_table.items():
        if known == code and marker and marker in text:
            return hint
    return help_table.get((code, ""))


class DeployError(RuntimeError):
    """A deployment check failed; the message says what happened and what to do."""


# ----------------------------------------------------------------------------- addresses


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``.

    Raises
    ------
    DeployError
        When the address has no valid port.
    """
    address = address.strip()
    host, port_text = address, ""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DeployError(
            f"'{address}' is not an address of the form HOST:PORT (e.g. fl.example.org:{DEFAULT_PORT})"
        )
    return host, int(port_text)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- certificates


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise DeployError(f"{what} {path} does not exist (or is not a file)")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DeployError(
            f"{what} {path} cannot be read ({err.strerror}): check its owner and permissions"
        ) from None


def load_certificate(path: str | Path, what: str = "certificate") -> x509.Certificate:
    """Read a PEM certificate (the first of a bundle) and check that it is valid now.

    A CA file may be a bundle (old and new CA during a CA rotation): then it is enough that
    one of them is valid now; expired ones are reported as warnings.

    Raises
    ------
    DeployError
        When the file is missing, unreadable, not PEM, or holds no certificate valid now.
    """
    path = Path(path).expanduser()
    try:
        certs = x509.load_pem_x509_certificates(_read(path, what))
    except ValueError:
        raise DeployError(f"{what} {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    now = _utcnow()
    problems = []
    for cert in certs:
        if now < cert.not_valid_before_utc:
            problems.append(
                f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: "
                "check this machine's clock"
            )
        elif now > cert.not_valid_after_utc:
            problems.append(
                f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d} UTC: the center "
                "renews it with `deploy/gen-certs.sh --renew ...` (deploy/README.md, certificate rotation)"
            )
        else:
            days_left = (cert.not_valid_after_utc - now).days
            if days_left < CERT_WARN_DAYS:
                logger.warning("%s %s expires in %d days (%s UTC): plan its renewal", what, path,
                               days_left, f"{cert.not_valid_after_utc:%Y-%m-%d}")
            for problem in problems:
                logger.warning("%s (another certificate in the bundle is valid)", problem)
            return cert
    raise DeployError(problems[0])


def certificate_names(cert: x509.Certificate) -> list[str]:
    """DNS names and IP addresses a certificate is valid for (subjectAltName)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def check_server_certificates(cert_path: Path, key_path: Path, ca_path: Path, host: str) -> list[str]:
    """Check the SuperLink's certificate, key and CA before Flower reads them.

    Returns
    -------
    list of str
        The names the server certificate is valid for (what hospitals may connect to).

    Raises
    ------
    DeployError
        Missing or unreadable files, expired certificates, a key that does not belong to
        the certificate, a certificate not issued by the CA, or no name the SuperLink
        can reach itself by.
    """
    ca = load_certificate(ca_path, "CA certificate")
    cert = load_certificate(cert_path, "server certificate")
    try:
        key = serialization.load_pem_private_key(_read(Path(key_path), "server key"), password=None)
    except (ValueError, TypeError):
        raise DeployError(f"server key {key_path} is not an unencrypted PEM private key") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, pub) != cert.public_key().public_bytes(
        serialization.Encoding.PEM, pub
    ):
        raise DeployError(
            f"server key {key_path} does not belong to server certificate {cert_path}: "
            "use the server.key written together with server.crt by deploy/gen-certs.sh"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise DeployError(
            f"server certificate {cert_path} was not issued by the CA {ca_path}: hospitals "
            "verify the SuperLink with that CA and would refuse it; use the ca.crt from the "
            "same deploy/gen-certs.sh folder"
        ) from None
    names = certificate_names(cert)
    # The SuperLink starts the ServerApp through its own port over TLS, connecting to the
    # bind host (0.0.0.0 -> 127.0.0.1): that name must be in the certificate.
    self_name = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if self_name not in names:
        raise DeployError(
            f"server certificate {cert_path} is valid for {', '.join(names) or 'no names'} but "
            f"the SuperLink reaches itself at {self_name}: regenerate it with deploy/gen-certs.sh "
            "(it always includes localhost and 127.0.0.1)"
        )
    return names


def _peer_certificate(host: str, port: int, timeout: float) -> x509.Certificate | None:
    """The certificate a TLS server presents, without verifying it (for error messages)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, ctx.wrap_socket(
            sock, server_hostname=None if _is_ip(host) else host
        ) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def check_superlink(address: str, ca_cert: str | Path, *, timeout: float = 10.0) -> None:
    """Check that the SuperLink at ``address`` answers and proves its identity with a
    certificate issued by ``ca_cert`` for the name used (a bounded TCP + TLS handshake).

    Raises
    ------
    DeployError
        Unreachable (refused, timed out, unknown name), not TLS, wrong CA, expired or
        not-yet-valid certificate, or a certificate for other names.
    """
    host, port = parse_address(address)
    load_certificate(ca_cert, "CA certificate")
    where = _format_address(host, port)
    checks = (
        f"Check: (1) the address and port (the center's `fedspatial server --port`, default "
        f"{DEFAULT_PORT}); (2) that the SuperLink is running there; (3) firewalls: this machine "
        f"must be allowed outbound TCP to {where} and the center inbound TCP on port {port} "
        "from this machine (nothing needs to be open towards the hospital)"
    )
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as err:
        raise DeployError(
            f"cannot resolve '{host}' ({err.strerror}): check the spelling of the SuperLink's "
            "name and this machine's DNS, or use its IP address"
        ) from None
    except TimeoutError:
        raise DeployError(f"no answer from the SuperLink at {where} within {timeout:.0f} s. {checks}") from None
    except ConnectionRefusedError:
        raise DeployError(
            f"the SuperLink at {where} refused the connection (nothing listens on port {port}). {checks}"
        ) from None
    except OSError as err:
        raise DeployError(f"cannot reach the SuperLink at {where} ({err.strerror or err}). {checks}") from None

    ctx = ssl.create_default_context(cafile=str(Path(ca_cert).expanduser()))
    try:
        with sock, ctx.wrap_socket(sock, server_hostname=host):  # handshake, bounded by timeout
            pass
    except ssl.SSLCertVerificationError as err:
        raise DeployError(_verify_failure(err, host, port, Path(ca_cert), timeout)) from None
    except TimeoutError:
        raise DeployError(
            f"{where} accepted the connection but did not complete a TLS handshake within "
            f"{timeout:.0f} s: is this the SuperLink's port?"
        ) from None
    except (ssl.SSLError, OSError) as err:
        raise DeployError(
            f"{where} does not speak TLS ({getattr(err, 'reason', None) or err}): either the SuperLink "
            "was started without certificates (--insecure), or another service listens on that port"
        ) from None
    logger.info("SuperLink %s reachable; its certificate is issued by %s", where, ca_cert)


def _verify_failure(err: ssl.SSLCertVerificationError, host: str, port: int, ca: Path, timeout: float) -> str:
    where = _format_address(host, port)
    peer = _peer_certificate(host, port, timeout)
    names = ", ".join(certificate_names(peer)) if peer else "unknown"
    code = err.verify_code
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return (
            f"the SuperLink's certificate is valid for {names}, not for '{host}': connect with one "
            f"of those names, or ask the center to add '{host}' (deploy/gen-certs.sh --renew ... {host})"
        )
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        until = f" on {peer.not_valid_after_utc:%Y-%m-%d} UTC" if peer else ""
        return (
            f"the SuperLink's certificate expired{until}: the center must renew it "
            "(deploy/gen-certs.sh --renew, then restart `fedspatial server`); nothing changes at hospitals"
        )
    if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        return "the SuperLink's certificate is not valid yet: check the clocks of this machine and the center"
    issuer = peer.issuer.rfc4514_string() if peer else "another CA"
    return (
        f"the SuperLink at {where} presented a certificate that the CA in {ca} did not issue "
        f"(issuer: {issuer}; {err.verify_message}): this is the wrong CA file, or not the "
        "federation's SuperLink. Get ca.crt from the coordinating center and pass it with --ca-cert"
    )


# ----------------------------------------------------------------------------- keys


def public_key_path(private_path: str | Path) -> Path:
    """``hospital_a.key`` -> ``hospital_a.pub``; any other name gets ``.pub`` appended (ssh-keygen)."""
    p = Path(private_path)
    return p.with_suffix(".pub") if p.suffix == ".key" else p.with_name(p.name + ".pub")


def generate_keypair(private_path: str | Path, *, comment: str = "", overwrite: bool = False) -> tuple[Path, Path]:
    """Write a SuperNode authentication key pair (EC P-384, OpenSSH format).

    The private key (mode 600) stays at the hospital; the public key (:func:`public_key_path`)
    goes to the coordinating center for registration. Same as
    ``ssh-keygen -t ecdsa -b 384 -N "" -f PRIVATE``.

    Raises
    ------
    DeployError
        When either file exists and ``overwrite`` is false.
    """
    private_path = Path(private_path).expanduser()
    public_path = public_key_path(private_path)
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise DeployError(
                f"{p} exists: a registered key must not be replaced by accident. Use another "
                "name, or --overwrite (the center must then register the new .pub)"
            )
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_bytes)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(public_bytes + (f" {comment}".encode() if comment else b"") + b"\n")
    return private_path, public_path


def check_auth_key(path: str | Path) -> Path:
    """Check that ``path`` holds a SuperNode private key Flower can use.

    Raises
    ------
    DeployError
        Missing, unreadable, or not an unencrypted EC private key in OpenSSH format.
    """
    path = Path(path).expanduser()
    data = _read(path, "authentication key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError):
        raise DeployError(
            f"authentication key {path} is not an unencrypted private key in OpenSSH format: "
            "give the private key (not the .pub), or make a new pair with `fedspatial keygen`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"authentication key {path} is not an EC key: make one with `fedspatial keygen`")
    if path.stat().st_mode & 0o077:
        logger.warning("authentication key %s is readable by other users: chmod 600 %s", path, path)
    return path


# ----------------------------------------------------------------------------- site data


def check_site_data(data_path: str | Path, *, spatial_key: str = "spatial", label_key: str = "domain") -> str:
    """Run ``fedspatial inspect``'s validation on a hospital's data path.

    Returns
    -------
    str
        The site summary (sections, spots, features).

    Raises
    ------
    DeployError
        When the path is missing or any problem is found.
    """
    from fedspatial.shared.data.io import inspect_site

    path = Path(data_path).expanduser()
    if not path.exists():
        raise DeployError(
            f"data path {path} does not exist: give the folder (or .h5ad file) holding this "
            "hospital's sections with --data-path, and check it with `fedspatial inspect PATH`"
        )
    summary, problems = inspect_site(path, spatial_key=spatial_key, label_key=label_key)
    if problems:
        listed = "\n  - ".join(problems)
        raise DeployError(f"{len(problems)} problem(s) in {path} (`fedspatial inspect {path}`):\n  - {listed}")
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


def _port_free(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- commands


def _flower_binary(name: str) -> str:
    """A Flower command from this environment (the venv's bin first, then PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise DeployError(f"`{name}` not found: install fedspatial (it brings flwr) into this environment")
    return found


@dataclass(frozen=True)
class ServerOptions:
    """What ``fedspatial server`` needs (see :func:`build_parser_server`)."""

    certs: Path | None
    ssl_certfile: Path | None
    ssl_keyfile: Path | None
    ssl_ca_certfile: Path | None
    database: Path
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    log_file: Path | None = None
    workdir: Path | None = None

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
    names = check_server_certificates(cert, key, ca, opts.host)
    database = opts.database.expanduser().resolve()
    _check_writable_dir(database.parent, "database folder")
    if not _port_free(opts.host, opts.port):
        raise DeployError(
            f"port {opts.port} on {opts.host} is already in use: another SuperLink (or another "
            f"service) runs there; stop it, or choose another port with --port"
        )
    logger.info("SuperLink certificate is valid for: %s (hospitals connect to one of these, port %d)",
                ", ".join(names), opts.port)
    logger.info("state database: %s (%s)", database, "existing" if database.exists() else "new")
    cmd = [
        _flower_binary("flower-superlink"),
        "--ssl-certfile", str(cert.expanduser().resolve()),
        "--ssl-keyfile", str(key.expanduser().resolve()),
        "--ssl-ca-certfile", str(ca.expanduser().resolve()),
        "--enable-supernode-auth",
        "--database", str(database),
        "--host", opts.host,
        "--port", str(opts.port),
        # The center runs the installed fedspatial; never pip/uv-install what a run asks for.
        "--disable-runtime-dependency-installation",
    ]
    if opts.log_file is not None:
        log_file = opts.log_file.expanduser().resolve()
        _check_writable_dir(log_file.parent, "log folder")
        cmd += ["--log-file", str(log_file)]
    return cmd


@dataclass(frozen=True)
class ClientOptions:
    """What ``fedspatial client`` needs (see :func:`build_parser_client`)."""

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


CLIENTAPP_RUNNERS = ("warm", "flower")


def supernode_command(opts: ClientOptions) -> list[str]:
    """Check the hospital's setup and return the ``flower-supernode`` command line.

    Order: files first (cheap, local), then the data, then the network.

    Raises
    ------
    DeployError
        See :func:`check_auth_key`, :func:`check_site_data`, :func:`check_superlink`.
    """
    host, port = parse_address(opts.superlink)
    ca = Path(opts.ca_cert).expanduser().resolve()
    load_certificate(ca, "CA certificate")
    key = check_auth_key(opts.auth_key).resolve()
    data = Path(opts.data_path).expanduser().resolve()
    summary = check_site_data(data, spatial_key=opts.spatial_key, label_key=opts.label_key)
    logger.info("site data %s:\n%s", data, summary)
    site = opts.site_name or data.stem
    node_config = [f"data-path={_toml_string(str(data), 'data path')}", f"site-name={_toml_string(site, 'site name')}"]
    if opts.output_path is not None:
        out = Path(opts.output_path).expanduser().resolve()
        _check_writable_dir(out, "output path")
        node_config.append(f"output-path={_toml_string(str(out), 'output path')}")
    else:
        _check_writable_dir(data.parent / "fedspatial-results", "output folder")
    if not _port_free("127.0.0.1", opts.runtime_port):
        raise DeployError(
            f"local port {opts.runtime_port} (this SuperNode's Runtime API, 127.0.0.1 only) is in use: "
            "another SuperNode runs on this machine; give each one its own --runtime-port"
        )
    if opts.clientapp_runner not in CLIENTAPP_RUNNERS:
        raise DeployError(f"--clientapp-runner must be one of {', '.join(CLIENTAPP_RUNNERS)}, not {opts.clientapp_runner!r}")
    check_superlink(_format_address(host, port), ca, timeout=opts.connect_timeout)
    return [
        _flower_binary("flower-supernode"),
        "--superlink", _format_address(host, port),
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key),
        "--node-config", " ".join(node_config),
        # The Runtime API is for this machine's ClientApp processes only.
        "--host", "127.0.0.1",
        "--port", str(opts.runtime_port),
        # warm: our executor, not Flower's SuperExec, starts the ClientApps.
        "--isolation", "process" if opts.clientapp_runner == "warm" else "subprocess",
    ]


def executor_command(opts: ClientOptions) -> list[str]:
    """The warm ClientApp executor next to ``flower-supernode --isolation process``."""
    from fedspatial.clientapp_executor import LAUNCH_COMMAND

    return [
        sys.executable, "-c", LAUNCH_COMMAND,
        "--runtime-api-address", f"127.0.0.1:{opts.runtime_port}",
        "--parent-pid", str(os.getpid()),
    ]


def flower_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry and no update check, because a
    hospital's SuperNode must talk to the coordinating center only (override by setting
    the variables yourself)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # Flower's SuperExec (the center's ServerApp launcher; a hospital's with
    # --clientapp-runner flower) looks for new tasks every second by default: a second
    # of delay per message, for a local HTTP request that costs nothing.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    return env


_FLOWER_EXIT_RE = re.compile(r"Exit Code: (\d+)")


def run_child(cmd: Sequence[str], *, explain: Mapping[tuple[int, str], str], what: str,
              env: Mapping[str, str] | None = None, cwd: Path | None = None,
              ended_by_itself: str = "", helpers: Mapping[str, Sequence[str]] | None = None) -> int:
    """Run ``cmd`` with its output passed through, forwarding SIGINT/SIGTERM to it.

    ``ended_by_itself`` is logged when the child exits with 0 unasked. ``helpers`` (name ->
    command) run next to the child and share its fate: they are stopped when it ends, and
    the child is stopped when one of them ends unasked.

    Flower processes exit with 1 on any error and name the real reason in a log line
    ``Exit Code: N``; a known ``N`` is explained from ``explain`` (see :func:`explain_exit`).

    Returns
    -------
    int
        The child's exit code (0 when it was stopped by a forwarded signal; 1 when a
        helper ended unasked).
    """
    logger.debug("running: %s", " ".join(cmd))
    full_env = flower_env(env)
    proc = subprocess.Popen(list(cmd), env=full_env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    side: dict[str, subprocess.Popen[Any]] = {}
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        running: list[subprocess.Popen[Any]] = [proc, *side.values()]
        for p in running:
            if p.poll() is None:
                p.send_signal(signum)

    flower_codes: list[int] = []
    recent: deque[str] = deque(maxlen=50)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            recent.append(line)
            if match := _FLOWER_EXIT_RE.search(line):
                flower_codes.append(int(match.group(1)))

    # Flower's helper processes inherit the pipe and only exit once their parent is reaped,
    # so wait for the child itself, not for the end of its output.
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    helper_failed = ""
    try:
        for name, helper_cmd in (helpers or {}).items():
            logger.debug("running %s: %s", name, " ".join(helper_cmd))
            side[name] = subprocess.Popen(list(helper_cmd), env=full_env, cwd=cwd)
        while (code := proc.poll()) is None:
            for name, helper in side.items():
                if not stopping and not helper_failed and helper.poll() is not None:
                    helper_failed = f"{name} ended unasked (exit code {helper.returncode}, see the log above)"
                    logger.error("%s: stopping %s too", helper_failed, what)
                    proc.terminate()
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_processes(list(side.values()))
    reader.join(timeout=15)
    flower_code = flower_codes[-1] if flower_codes else None
    if helper_failed:
        logger.error("%s stopped because %s; start it again (a service manager restarts it)", what, helper_failed)
        return 1
    if stopping:
        logger.info("%s stopped", what)
        return 0
    if code == 0 and ended_by_itself:
        logger.warning("%s ended without being asked to: %s", what, ended_by_itself)
    if code != 0:
        reason = flower_code if flower_code is not None else code
        hint = explain_exit(explain, reason, list(recent)) or (
            f"see its log above and https://flower.ai/docs/framework/ref-exit-codes/{reason}.html"
        )
        logger.error("%s stopped (Flower exit code %s): %s", what, reason, hint)
    return code


def _stop_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = 15.0) -> None:
    """SIGTERM to each process still running, SIGKILL after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def run_server(opts: ServerOptions) -> int:
    """``fedspatial server``: check, then run ``flower-superlink`` until stopped."""
    cmd = superlink_command(opts)
    cwd = opts.workdir.expanduser().resolve() if opts.workdir else None
    if cwd is not None:
        cwd.mkdir(parents=True, exist_ok=True)
    logger.info("starting the SuperLink on %s (TLS, SuperNode authentication)",
                _format_address(opts.host, opts.port))
    explain = {k: v.format(database=opts.database) for k, v in _SUPERLINK_EXIT_HELP.items()}
    return run_child(cmd, explain=explain, what="flower-superlink", cwd=cwd)


def run_client(opts: ClientOptions) -> int:
    """``fedspatial client``: check, then run ``flower-supernode`` until stopped."""
    cmd = supernode_command(opts)
    pub = public_key_path(opts.auth_key)
    explain = {
        k: v.format(auth_key=opts.auth_key, auth_pub=pub, auth_pub_name=pub.name, ca_cert=opts.ca_cert)
        for k, v in _SUPERNODE_EXIT_HELP.items()
    }
    logger.info("connecting to the SuperLink at %s (outbound only)", opts.superlink)
    helpers = {"the ClientApp executor": executor_command(opts)} if opts.clientapp_runner == "warm" else {}
    return run_child(
        cmd, explain=explain, what="flower-supernode",
        ended_by_itself="the coordinating center has probably removed this hospital "
        "(`flwr supernode unregister`); ask the center before starting it again",
        helpers=helpers,
    )


# ----------------------------------------------------------------------------- submit


RESULT_MARKER = "FEDSPATIAL-RESULTS v1 "
"""Starts the one log line in which the ServerApp returns the run's report files."""
MAX_RESULT_BYTES = 8 * 2**20


def result_line(run_name: str, center_folder: str, files: Mapping[str, str]) -> str:
    """The marked log line carrying ``files`` (name -> text) back to the submitter.

    Raises
    ------
    DeployError
        When the files are too large for one log line (they stay at the center).
    """
    bundle = {
        "run-name": run_name,
        "center-folder": center_folder,
        "files": dict(files),
        "sha256": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()},
    }
    line = RESULT_MARKER + json.dumps(bundle, separators=(",", ":"))
    if len(line) > MAX_RESULT_BYTES:
        raise DeployError(
            f"the run report ({len(line) // 2**20} MiB) is too large to send back in the run's log; "
            f"copy it from the coordinating center: {center_folder}/"
        )
    return line


def parse_result_line(line: str) -> dict[str, Any] | None:
    """The bundle of a result line (None for any other line).

    Raises
    ------
    DeployError
        When the line is marked but damaged (cut off, or a file that fails its checksum).
    """
    start = line.find(RESULT_MARKER)
    if start < 0:
        return None
    try:
        bundle = json.loads(line[start + len(RESULT_MARKER):])
        files, sums = bundle["files"], bundle["sha256"]
    except (ValueError, KeyError, TypeError):
        raise DeployError("the run report line in the run's log is damaged (cut off?)") from None
    for name, text in files.items():
        if hashlib.sha256(text.encode()).hexdigest() != sums.get(name):
            raise DeployError(f"the run report's {name} failed its checksum on the way back")
    return dict(bundle)


def save_results(bundle: Mapping[str, Any], folder: Path) -> list[Path]:
    """Write the bundle's files into ``folder`` (atomically, names checked)."""
    from fedspatial.shared.storage.atomic import write_text_atomic

    saved = []
    for name, text in bundle["files"].items():
        if Path(name).name != name or name.startswith("."):  # never write outside the folder
            raise DeployError(f"the run report names an unexpected file {name!r}; nothing saved")
        saved.append(write_text_atomic(folder / name, text))
    return saved



def project_root() -> Path | None:
    """The fedspatial Flower App folder (a checkout with pyproject.toml), if there is one."""
    root = Path(__file__).resolve().parent.parent
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
        f'address = "{_format_address(host, port)}"\n'
        f"root-certificates = {json.dumps(str(Path(ca_cert).expanduser().resolve()))}\n"
    )
    return path


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
        cmd = [_flower_binary("flwr"), "run", str(app)]
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
        logger.warning(
            "the run ended but its report did not come back (the ServerApp stopped before the end, "
            "or the center runs another fedspatial version); results at the coordinating center: %s/", target,
        )
        return 0
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
    cmd = [_flower_binary("flwr"), "log", str(run_id)]
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
    local = (out or Path("results") / str(bundle["run-name"])).expanduser()
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
            except DeployError as err:
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
