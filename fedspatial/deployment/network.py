"""Addresses, local ports and the pre-flight check that the SuperLink answers over TLS."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
from pathlib import Path

from cryptography import x509

from fedspatial.deployment.certificates import certificate_names, load_certificate
from fedspatial.deployment.errors import DeployError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9092
"""The center's public port: the Fleet API, the only one hospitals use."""
DEFAULT_CONTROL_PORT = 9093
"""The center's Control API (``flwr run``, ``flwr supernode register``, ``fedspatial
submit``): 127.0.0.1 unless ``fedspatial server --expose-control-api``."""
DEFAULT_SERVERAPPIO_PORT = 9091
"""The center's ServerAppIo (Flower's runtime) API: always 127.0.0.1, for its own ServerApps."""
DEFAULT_CLIENT_RUNTIME_PORT = 9094
"""A SuperNode's local Runtime API port (127.0.0.1 only; ClientApp processes use it)."""


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


def format_address(host: str, port: int) -> str:
    """``(host, port)`` -> ``"host:port"`` (``"[v6]:port"`` for an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def port_free(host: str, port: int) -> bool:
    """Whether this machine can listen on ``host:port`` now."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- the SuperLink


def _peer_certificate(host: str, port: int, timeout: float) -> x509.Certificate | None:
    """The certificate a TLS server presents, without verifying it (for error messages)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, ctx.wrap_socket(
            sock, server_hostname=None if is_ip(host) else host
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
    where = format_address(host, port)
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
    where = format_address(host, port)
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


def free_loopback_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (held open together while
    chosen, so they differ); for local deployments, their tests and benchmarks."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
