"""Run code apart from the hospital's key (issue 14 item 5).

The ClientApp processes run code that the center submits. ``fedspatial client
--executor-user USER`` names the OS user they run as, which must not be able to read
the SuperNode's authentication key (owner, group or others): with the default runner
(``warm``) ``fedspatial client`` (started as root) starts the executor as that user;
with ``--clientapp-runner external`` the operator starts it in a unit or container of
its own (``deploy/systemd/fedspatial-executor.service``, compose ``hospital-executor``)
and ``fedspatial client`` only checks the key against that user.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspatial.deployment.errors import DeployError

logger = logging.getLogger(__name__)

SAME_USER_WARNING = (
    "\n{bar}\nTHE RUN'S CODE CAN READ THIS HOSPITAL'S KEY: the ClientApps (code the center submits) run as "
    "this SuperNode's own user, who reads {key}. Run them as another user: --executor-user NAME "
    "(as root), or --clientapp-runner external with deploy/systemd/fedspatial-executor.service "
    "(deploy/README.md, \"Confinement\").\n{bar}"
)


@dataclass(frozen=True)
class ExecutorUser:
    """The OS user (and groups) the ClientApp executor runs as."""

    spec: str
    uid: int
    gid: int | None
    groups: frozenset[int]
    """Every group id the user is in (primary and supplementary, where known)."""
    home: str | None = None


def resolve_executor_user(spec: str) -> ExecutorUser:
    """``NAME``, ``UID``, ``NAME:GROUP`` or ``UID:GID`` (numbers need no passwd entry,
    as in a container).

    Raises
    ------
    DeployError
        An unknown user or group name.
    """
    user, _, group = spec.partition(":")
    entry: pwd.struct_passwd | None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise DeployError(f"--executor-user {spec}: no user {user!r} on this machine (useradd --system {user})") from None
        entry = None
    uid = int(user) if entry is None else entry.pw_uid
    gid = None if entry is None else entry.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise DeployError(f"--executor-user {spec}: no group {group!r} on this machine") from None
    groups = {gid} if gid is not None else set()
    if entry is not None:
        groups |= {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    return ExecutorUser(spec, uid, gid, frozenset(groups), None if entry is None else entry.pw_dir)


def key_readers_problem(st_uid: int, st_gid: int, mode: int, user: ExecutorUser) -> str | None:
    """Why ``user`` could read a file with this owner, group and mode (``None``: it cannot)."""
    if user.uid == 0:
        return "the executor's user is root"
    if st_uid == user.uid:
        return f"it is owned by the executor's user (uid {user.uid})"
    if mode & stat.S_IRGRP and (st_gid in user.groups or user.gid is None):
        return f"its group (gid {st_gid}) can read it and the executor's user is in that group (or its groups are unknown)"
    if mode & stat.S_IROTH:
        return "every user can read it (mode o+r)"
    return None


def check_key_confined(key: Path, user: ExecutorUser | None) -> None:
    """Refuse a key the executor's user could read; without ``--executor-user``, warn loudly.

    Raises
    ------
    DeployError
        The key is readable by the executor's user, or that user is this process's.
    """
    st = key.stat()
    if user is None:
        logger.warning(SAME_USER_WARNING.format(bar="!" * 78, key=key))
        return
    if user.uid == os.geteuid():
        raise DeployError(
            f"--executor-user {user.spec} is the user this SuperNode runs as: the run's code could read {key}; "
            "give the executor a user of its own (deploy/README.md, \"Confinement\")"
        )
    problem = key_readers_problem(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), user)
    if problem is not None:
        raise DeployError(
            f"authentication key {key} is readable by the executor's user {user.spec}: {problem}. "
            f"Make it owned by the SuperNode's user with mode 600 (chown SUPERNODE_USER {key} && chmod 600 {key})"
        )
    logger.info("authentication key %s: not readable by the executor's user %s", key, user.spec)


def executor_process_options(user: ExecutorUser, env: dict[str, str]) -> tuple[dict[str, Any], Path]:
    """``subprocess.Popen`` options that start the executor as ``user``, and its own
    ``FLWR_HOME`` (where Flower unpacks each run's app; remove it afterwards).

    Raises
    ------
    DeployError
        This process cannot change user (not root), or the user has no group.
    """
    if os.geteuid() != 0:
        raise DeployError(
            f"--executor-user {user.spec} with --clientapp-runner warm needs `fedspatial client` to start as root "
            "(it starts the executor as that user); otherwise start the executor in its own unit and give "
            "--clientapp-runner external (deploy/systemd/fedspatial-executor.service)"
        )
    if user.gid is None:
        raise DeployError(f"--executor-user {user.spec}: give its group too (UID:GID)")
    flwr_home = Path(tempfile.mkdtemp(prefix="fedspatial-executor-"))
    os.chown(flwr_home, user.uid, user.gid)
    env = {**env, "FLWR_HOME": str(flwr_home), "HOME": user.home or str(flwr_home)}
    return {"user": user.uid, "group": user.gid, "extra_groups": [], "env": env, "umask": 0o027}, flwr_home


def remove_flwr_home(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
