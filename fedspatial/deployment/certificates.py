"""Certificates (the center's, the CA) and the SuperNode authentication keys: checks and key generation."""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedspatial.deployment.errors import DeployError

logger = logging.getLogger(__name__)

CERT_WARN_DAYS = 30


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


_PRIVATE_KEY_PEM = b"PRIVATE KEY-----"  # BEGIN (EC|RSA|ENCRYPTED|OPENSSH|) PRIVATE KEY
_MAX_SCANNED_BYTES = 1 << 20


def check_no_other_private_keys(folders: list[Path], server_key: Path) -> None:
    """Refuse certificate folders that hold a private key other than the server's.

    The SuperLink and every run's ServerApp (code that submitters send) can read the
    ``--certs`` folder; a CA key there would let that code mint certificates that
    hospitals trust. So ``ca.key``, or any PEM private key besides ``server_key``, stops
    the server.

    Raises
    ------
    DeployError
        One line naming the file and how to move it away.
    """
    keep = server_key.expanduser().resolve()
    for folder in dict.fromkeys(f.expanduser().resolve() for f in folders):
        if not folder.is_dir():
            continue
        try:
            entries = sorted(folder.iterdir())
        except OSError:  # unreadable: the certificate checks that follow say so
            continue
        for path in entries:
            if path.resolve() == keep or not path.is_file():
                continue
            is_key = path.name == "ca.key"
            if not is_key and path.stat().st_size <= _MAX_SCANNED_BYTES:
                try:
                    is_key = _PRIVATE_KEY_PEM in path.read_bytes()
                except OSError:  # unreadable to us: not something the server could leak either
                    is_key = False
            if is_key:
                raise DeployError(
                    f"private key {path} is in the certificate folder {folder}, which the SuperLink and every "
                    f"run's code can read: move it out (e.g. `mv {path} {folder}-ca-private/`, as "
                    "deploy/gen-certs.sh --ca-dir does) and keep the CA key offline"
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
