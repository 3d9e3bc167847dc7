"""A hospital's allow-list of Flower App bundles (issue 14 item 3).

Without it, every app bundle (FAB) the center submits runs at the hospital. With
``fedspatial client --allowed-apps FILE`` (and/or ``--allow-app SHA256``) the warm
ClientApp executor runs a message only when the SHA-256 of the run's bundle is listed;
any other bundle is refused before a process is forked for it, before anything in it is
unpacked or imported (:mod:`fedspatial.clientapp_executor`).

The allow-list file: one SHA-256 hash (64 hexadecimal digits, as printed by
``fedspatial app-hash``) per line, optionally followed by a ``#`` comment; blank lines and
lines starting with ``#`` are ignored::

    # fedspatial releases approved by the hospital's data protection officer
    d3874b0e583fe40109011257085a129ec5c7d7a1d57a4d8a42748b19bb0ecbb3  # 0.3.0, reviewed 2026-12-01
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedspatial.deployment.errors import DeployError

ALLOW_ENV = "FEDSPATIAL_ALLOWED_APPS"
"""Comma-separated allowed hashes, for the executor's fork server (its second check)."""
_HASH = re.compile(r"[0-9a-f]{64}")
NO_ALLOW_LIST_WARNING = (
    "no app allow-list: any app the center submits will run here; pin with --allowed-apps "
    "FILE (hashes from `fedspatial app-hash`, see deploy/README.md)"
)


def normalize_hash(value: str, where: str) -> str:
    """``value`` as a lowercase SHA-256 hex digest (an optional ``sha256:`` prefix is dropped)."""
    text = value.strip().lower().removeprefix("sha256:")
    if not _HASH.fullmatch(text):
        raise DeployError(
            f"{where}: {value.strip()!r} is not a SHA-256 app hash (64 hexadecimal digits): "
            "copy it from `fedspatial app-hash PATH`"
        )
    return text


def parse_allow_list(text: str, source: str) -> dict[str, str]:
    """``{hash: comment}`` from an allow-list file's text (format: module docstring)."""
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        entry, _, comment = line.partition("#")
        if not entry.strip():
            continue
        fields = entry.split()
        if len(fields) != 1:
            raise DeployError(
                f"{source}:{number}: one hash per line, a comment after '#': {line.strip()!r}"
            )
        found[normalize_hash(fields[0], f"{source}:{number}")] = comment.strip()
    return found


def load_allow_list(files: Iterable[Path], hashes: Iterable[str]) -> dict[str, str] | None:
    """The allowed hashes from ``--allowed-apps`` files and ``--allow-app`` values, or
    ``None`` when neither was given (then every bundle runs).

    Raises
    ------
    DeployError
        A missing or unreadable file, a malformed line, or an allow-list with no hash.
    """
    files, hashes = list(files), list(hashes)
    if not files and not hashes:
        return None
    allowed: dict[str, str] = {}
    for path in files:
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except OSError as err:
            raise DeployError(f"--allowed-apps {path}: cannot read it ({err.strerror})") from None
        allowed.update(parse_allow_list(text, str(path)))
    for value in hashes:
        allowed[normalize_hash(value, "--allow-app")] = "--allow-app"
    if not allowed:
        raise DeployError(
            f"the allow-list ({', '.join(map(str, files))}) lists no app hash: no run could work here; "
            "add the hash of an approved version (`fedspatial app-hash PATH`)"
        )
    return allowed


def refusal_reason(fab_hash: str) -> str:
    """Why a bundle was refused, and what to do: the error reply's reason."""
    return (
        f"app bundle sha256:{fab_hash} is not on this hospital's allow-list (--allowed-apps): "
        "refused before any of its code ran. If this is a new version, the center announces its "
        "hash; the hospital reviews it, checks it with `fedspatial app-hash`, adds it to its "
        "allow-list file and restarts `fedspatial client`"
    )


def fab_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def guard_install(install: Callable[..., Any], allowed: frozenset[str]) -> Callable[..., Any]:
    """``install`` (Flower's ``install_from_fab``) refusing a bundle whose recomputed hash
    is not in ``allowed``, before it is unpacked: the second check, in the task process."""

    def guarded(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = fab_sha256(content)
        if digest not in allowed:
            raise PermissionError(refusal_reason(digest))
        return install(fab_file, *args, **kwargs)

    return guarded


def app_hash(path: Path) -> tuple[str, str]:
    """The SHA-256 of an app bundle, and what it is.

    ``path`` is a ``.fab`` file (``flwr build``) or an app folder (a checkout), which is
    bundled exactly as ``flwr run`` / ``fedspatial submit`` bundles it.
    """
    from flwr.common.config import get_fab_config

    path = Path(path).expanduser().resolve()
    if path.is_dir():
        if not (path / "pyproject.toml").is_file():
            raise DeployError(f"{path} is not a Flower App folder (no pyproject.toml)")
        from fedspatial.deployment.app_bundle import build_bundle

        try:
            content = build_bundle(path)
        except ValueError as err:
            raise DeployError(f"{path}: cannot bundle it as `flwr run` would: {err}") from None
        how = f"bundled from {path} as `flwr run` does"
    elif path.is_file():
        content = path.read_bytes()
        how = f"file {path}"
    else:
        raise DeployError(f"{path} does not exist: give a .fab file (flwr build) or an app folder")
    try:
        config = get_fab_config(content)
        project = config["project"]
        what = f"{project['name']} {project['version']}, {how}"
    except Exception as err:  # any malformed bundle
        raise DeployError(f"{path} is not a Flower App bundle: {err}") from None
    return fab_sha256(content), what
