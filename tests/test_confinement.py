"""Issue 14 item 5: the run's code runs apart from the hospital's key, and the service
units and the compose file confine it (network, files, memory, privileges).

Fast: the key check (owner, group, others; the SuperNode's own user), the options that go
with ``--executor-user``, the directives of the systemd units and the compose settings.
Slow (root only, a throwaway user from ``useradd``): the executor started by
``fedspatial client``'s own code as that user cannot read the key.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedspatial.deployment import nodes
from fedspatial.deployment.certificates import generate_keypair
from fedspatial.deployment.confinement import (
    ExecutorUser,
    check_key_confined,
    executor_process_options,
    key_readers_problem,
    remove_flwr_home,
    resolve_executor_user,
)
from fedspatial.deployment.errors import DeployError
from fedspatial.deployment.nodes import ClientOptions, client_allow_list, client_executor_user

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _user(uid: int, gid: int | None, *groups: int) -> ExecutorUser:
    return ExecutorUser(f"{uid}", uid, gid, frozenset({*groups, *([gid] if gid is not None else [])}))


def test_key_readers_problem() -> None:
    run = _user(2000, 2000, 3000)
    assert key_readers_problem(1000, 1000, 0o600, run) is None
    assert key_readers_problem(1000, 1000, 0o640, run) is None  # a group the executor is not in
    assert "owned by the executor's user" in str(key_readers_problem(2000, 1000, 0o600, run))
    assert "group" in str(key_readers_problem(1000, 3000, 0o640, run))  # supplementary group
    assert "group" in str(key_readers_problem(1000, 1000, 0o640, _user(2000, None)))  # groups unknown
    assert "every user" in str(key_readers_problem(1000, 1000, 0o604, run))
    assert "root" in str(key_readers_problem(1000, 1000, 0o600, _user(0, 0)))


def test_key_readable_by_the_executor_is_refused(tmp_path: Path, caplog) -> None:
    key, _ = generate_keypair(tmp_path / "site.key")
    st = key.stat()
    other = f"{os.geteuid() + 54321}:{st.st_gid + 54321}"  # no passwd entry needed (containers)
    check_key_confined(key, resolve_executor_user(other))  # mode 600, another owner: fine
    key.chmod(0o604)
    with pytest.raises(DeployError, match=r"readable by the executor's user .*every user can read it"):
        check_key_confined(key, resolve_executor_user(other))
    key.chmod(0o640)
    check_key_confined(key, resolve_executor_user(other))  # not the executor's group
    with pytest.raises(DeployError, match="its group"):
        check_key_confined(key, resolve_executor_user(f"{os.geteuid() + 54321}:{st.st_gid}"))
    with pytest.raises(DeployError, match="is the user this SuperNode runs as"):
        check_key_confined(key, resolve_executor_user(str(os.geteuid())))
    with pytest.raises(DeployError, match="no user 'no-such-user-fs'"):
        resolve_executor_user("no-such-user-fs")
    caplog.set_level("WARNING")
    check_key_confined(key, None)  # no executor user: allowed, but said loudly
    assert "THE RUN'S CODE CAN READ THIS HOSPITAL'S KEY" in caplog.text


def test_executor_user_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = ClientOptions(superlink="127.0.0.1:9092", data_path=tmp_path, ca_cert=tmp_path / "ca.crt",
                         auth_key=tmp_path / "site.key")
    other = f"{os.geteuid() + 54321}:{os.getegid() + 54321}"
    assert client_executor_user(opts) is None  # the default: warm, same user (warned about)
    with pytest.raises(DeployError, match="external needs --executor-user"):
        client_executor_user(ClientOptions(**{**opts.__dict__, "clientapp_runner": "external"}))
    with pytest.raises(DeployError, match="Flower's own runner"):
        client_executor_user(ClientOptions(**{**opts.__dict__, "clientapp_runner": "flower", "executor_user": other}))
    external = ClientOptions(**{**opts.__dict__, "clientapp_runner": "external", "executor_user": other})
    assert client_executor_user(external) is not None and client_executor_user(external).uid == os.geteuid() + 54321
    with pytest.raises(DeployError, match="to the executor itself"):
        client_allow_list(ClientOptions(**{**external.__dict__, "allow_app": ("a" * 64,)}))
    monkeypatch.setattr(nodes.os, "geteuid", lambda: 1000)  # warm + another user needs root
    with pytest.raises(DeployError, match="needs `fedspatial client` to start as root"):
        client_executor_user(ClientOptions(**{**opts.__dict__, "executor_user": other}))


def test_command_line_and_executor_allow_list(tmp_path: Path) -> None:
    from fedspatial.cli import build_parser
    from fedspatial.clientapp_executor import main

    client = ["client", "--superlink", "h:1", "--data-path", "d", "--ca-cert", "c", "--auth-key", "k"]
    args = build_parser().parse_args([*client, "--clientapp-runner", "external", "--executor-user", "run:run"])
    assert (args.clientapp_runner, args.executor_user) == ("external", "run:run")
    bad = tmp_path / "allowed.txt"
    bad.write_text("not-a-hash\n")
    # The executor of its own unit reads the allow-list file itself; a bad one stops it before it starts.
    assert main(["--runtime-api-address", "127.0.0.1:1", "--allowed-apps", str(bad)]) == 2


# ----------------------------------------------------------------------------- systemd units


def _unit(path: Path) -> dict[str, list[str]]:
    """``[Service]`` directives of a unit file (comments dropped, continuations joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    section, out = "", {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


COMMON = {"ProtectSystem": ["strict"], "ProtectHome": ["true"], "NoNewPrivileges": ["true"],
          "PrivateTmp": ["true"], "CapabilityBoundingSet": [""], "IPAddressDeny": ["any"],
          "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"], "SystemCallFilter": ["@system-service"]}


def test_systemd_units_confine_the_run() -> None:
    supernode = _unit(DEPLOY / "systemd" / "fedspatial-client.service")
    executor = _unit(DEPLOY / "systemd" / "fedspatial-executor.service")
    for unit in (supernode, executor):
        for key, value in COMMON.items():
            assert unit.get(key) == value, (key, unit.get(key))
        assert unit["MemoryMax"] and re.fullmatch(r"\d+[KMGT]", unit["MemoryMax"][0])
        assert unit["ReadOnlyPaths"] == ["/srv/fedspatial/data"]
    # The SuperNode: the center and this host; the key, read by its own user only.
    assert supernode["IPAddressAllow"] == ["localhost", "203.0.113.10"]
    assert supernode["ReadWritePaths"] == ["/var/lib/fedspatial"]
    start = supernode["ExecStart"][0]
    assert "--clientapp-runner external" in start and "--executor-user fedspatial-run" in start
    assert supernode["User"] == ["fedspatial"] and "/etc/fedspatial/keys/" in start
    # The executor (the run's code): loopback only, another user, the key folder hidden.
    assert executor["IPAddressAllow"] == ["localhost"]
    assert executor["User"] == ["fedspatial-run"] != supernode["User"]
    assert executor["ReadWritePaths"] == ["/srv/fedspatial/output /var/lib/fedspatial-run"]
    assert executor["InaccessiblePaths"] == ["-/etc/fedspatial/keys"]
    assert "fedspatial.clientapp_executor" in executor["ExecStart"][0]
    assert "--runtime-api-address 127.0.0.1:9094" in executor["ExecStart"][0]


@pytest.mark.slow  # needs systemd-analyze (not in CI)
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for unit in (DEPLOY / "systemd").glob("*.service"):
        # The installed paths (/opt/fedspatial/venv) do not exist here.
        text = unit.read_text().replace("/opt/fedspatial/venv/bin/python", sys.executable)
        (tmp_path / unit.name).write_text(text.replace("/opt/fedspatial/venv/bin/fedspatial", "/bin/true"))
    done = subprocess.run(["systemd-analyze", "verify", *sorted(map(str, tmp_path.glob("*.service")))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


# ----------------------------------------------------------------------------- compose


def _target(volume: str) -> str:
    """The container path of a ``SOURCE:TARGET[:ro]`` mount (SOURCE may be ``${VAR:-default}``)."""
    match = re.fullmatch(r"(\$\{[^}]*\}|[^:]*):([^:]+)(:ro|:rw)?", volume)
    assert match, volume
    return match.group(2)


def test_compose_confines_the_hospital() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yml").read_text())["services"]
    supernode, executor = services["hospital"], services["hospital-executor"]
    for svc in (supernode, executor):
        assert svc["read_only"] is True
        assert svc["cap_drop"] == ["ALL"]
        assert svc["security_opt"] == ["no-new-privileges:true"]
        assert svc["mem_limit"]
        assert {t.split(":")[0] for t in svc["tmpfs"]} == {"/flwr", "/tmp"}  # all it writes, besides /output
        data = [v for v in svc["volumes"] if _target(v) == "/data"]
        assert len(data) == 1 and data[0].endswith(":ro")
        assert "ports" not in svc
    # The key is mounted into the SuperNode alone; the executor runs as another uid.
    assert any(_target(v) == "/keys/site.key" and v.endswith(":ro") for v in supernode["volumes"])
    assert not any("key" in v or "certs" in v for v in executor["volumes"])
    assert executor["user"] != supernode["user"]
    assert "--clientapp-runner=external" in supernode["command"]
    assert any(a.startswith("--executor-user=${FEDSPATIAL_RUN_UID") for a in supernode["command"])
    # The only writable mount is the executor's output folder.
    writable = [v for s in (supernode, executor) for v in s["volumes"] if not v.endswith(":ro")]
    assert writable == ["${OUTPUT_DIR:-/srv/fedspatial/output}:/output"]
    # Network: the executor shares the SuperNode's (loopback to its port); the SuperNode has one
    # bridge network with a fixed name for the host firewall (egress to the center only).
    assert executor["network_mode"] == "service:hospital" and "networks" not in executor
    assert supernode["networks"] == ["hospital-egress"]
    net = yaml.safe_load((DEPLOY / "compose.yml").read_text())["networks"]["hospital-egress"]
    assert net["driver_opts"]["com.docker.network.bridge.name"] == "br-fedspatial"


# ----------------------------------------------------------------------------- a real user (root)


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd (creates a throwaway user)")
    name = f"fsrun{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        done = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"userdel {name}: {done.stderr}"  # e.g. a process of it left running


@pytest.mark.slow  # root only (useradd): not in CI
def test_executor_runs_as_another_user_who_cannot_read_the_key(tmp_path: Path, throwaway_user: str) -> None:
    from fedspatial.deployment.processes import flower_env, run_child

    key, _ = generate_keypair(tmp_path / "site.key")  # root's, mode 600
    user = resolve_executor_user(throwaway_user)
    check_key_confined(key, user)
    options, flwr_home = executor_process_options(user, flower_env())
    try:
        assert stat.S_IMODE(flwr_home.stat().st_mode) == 0o700 and flwr_home.stat().st_uid == user.uid
        # fedspatial client's own plumbing: the helper (the executor's place) started as that user.
        probe = (f'id -u > "$FLWR_HOME/uid"; id -G > "$FLWR_HOME/groups"; '
                 f'cat {key} > "$FLWR_HOME/key" 2> "$FLWR_HOME/err"; echo $? > "$FLWR_HOME/rc"; exec sleep 30')
        code = run_child(["sleep", "2"], explain={}, what="stand-in SuperNode",
                         helpers={"executor": ["sh", "-c", probe]},
                         helper_options={"executor": {**options, "cwd": flwr_home}})
        assert code == 0
        assert int((flwr_home / "uid").read_text()) == user.uid
        assert (flwr_home / "groups").read_text().split() == [str(user.gid)]  # root's groups dropped
        assert (flwr_home / "rc").read_text().strip() != "0"
        assert "Permission denied" in (flwr_home / "err").read_text()
        assert (flwr_home / "key").read_text() == ""
    finally:
        remove_flwr_home(flwr_home)
    # The same user through the key's group, through others, or as its owner: refused.
    os.chown(key, 0, user.gid or 0)
    key.chmod(0o640)
    with pytest.raises(DeployError, match="its group"):
        check_key_confined(key, user)
    os.chown(key, 0, 0)
    key.chmod(0o604)
    with pytest.raises(DeployError, match="every user"):
        check_key_confined(key, user)
    key.chmod(0o600)
    os.chown(key, user.uid, 0)
    with pytest.raises(DeployError, match="owned by the executor's user"):
        check_key_confined(key, user)
