"""Issue 14 item 3: a hospital pins the app bundles that may run on its machine.

Fast: the allow-list file format and its errors, `fedspatial app-hash` against `flwr
build`, the warm executor's check with a fake bundle (refused before any fork, the hash
recomputed from the bytes), the second check in the task process, and the refusal of an
allow-list with Flower's own runner. Slow (real processes on 127.0.0.1, `make test-deploy`):
an unlisted bundle is refused at one hospital while a listed one runs at another.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from fedspatial.deployment.app_pinning import (
    NO_ALLOW_LIST_WARNING,
    app_hash,
    guard_install,
    load_allow_list,
    parse_allow_list,
    refusal_reason,
)
from fedspatial.deployment.errors import DeployError
from fedspatial.deployment.nodes import ClientOptions, client_allow_list

ROOT = Path(__file__).resolve().parent.parent
A, B = "a" * 64, "0123456789abcdef" * 4


def test_allow_list_file_format() -> None:
    text = (
        "# approved fedspatial versions\n"
        "\n"
        f"{A}  # 0.3.0, reviewed 2026-12-01\n"
        f"  SHA256:{B.upper()}\n"  # upper case and a sha256: prefix are accepted
        f"{A}\n"  # listed twice: fine
    )
    assert parse_allow_list(text, "apps.txt") == {A: "", B: ""}
    assert parse_allow_list(f"{A} # r\n", "x") == {A: "r"}


def test_allow_list_errors_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match=r"apps\.txt:2: 'abc' is not a SHA-256 app hash .*fedspatial app-hash"):
        parse_allow_list(f"{A}\nabc # short\n", "apps.txt")
    with pytest.raises(DeployError, match=r"apps\.txt:1: one hash per line"):
        parse_allow_list(f"{A} {B}\n", "apps.txt")
    with pytest.raises(DeployError, match=r"apps\.txt:1: .*not a SHA-256"):
        parse_allow_list(f"{A}0\n", "apps.txt")  # 65 digits
    with pytest.raises(DeployError, match="cannot read it"):
        load_allow_list([tmp_path / "missing.txt"], [])
    (tmp_path / "empty.txt").write_text("# nothing approved yet\n")
    with pytest.raises(DeployError, match="lists no app hash"):
        load_allow_list([tmp_path / "empty.txt"], [])
    with pytest.raises(DeployError, match="--allow-app: 'xyz'"):
        load_allow_list([], ["xyz"])
    # Files and command-line hashes add up; neither given: no allow-list at all.
    (tmp_path / "apps.txt").write_text(f"{A}  # v1\n")
    assert load_allow_list([tmp_path / "apps.txt"], [B]) == {A: "v1", B: "--allow-app"}
    assert load_allow_list([], []) is None


def test_allow_list_needs_the_warm_runner(tmp_path: Path) -> None:
    """Flower's own runner cannot check a bundle's hash: the combination is refused."""
    opts = ClientOptions(superlink="127.0.0.1:9", data_path=tmp_path, ca_cert=tmp_path / "ca.crt",
                         auth_key=tmp_path / "k.key", allow_app=(A,))
    assert client_allow_list(opts) == {A: "--allow-app"}
    flower = ClientOptions(**{**opts.__dict__, "clientapp_runner": "flower"})
    with pytest.raises(DeployError, match=r"need --clientapp-runner warm.*--trusted-entities"):
        client_allow_list(flower)
    assert client_allow_list(ClientOptions(**{**flower.__dict__, "allow_app": ()})) is None
    assert "any app the center submits will run here; pin with --allowed-apps" in NO_ALLOW_LIST_WARNING


def _tiny_app(folder: Path) -> Path:
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "tinyapp"\nversion = "1.2.3"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "hospital"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tinyapp.server:app"\nclientapp = "tinyapp.client:app"\n\n'
        '[tool.flwr.app.config]\nrounds = 1\n'
    )
    (folder / "tinyapp").mkdir()
    for name in ("__init__.py", "server.py", "client.py"):
        (folder / "tinyapp" / name).write_text("app = None\n")
    return folder


def test_app_hash_matches_flwr_build(tmp_path: Path) -> None:
    """The hash of a folder (bundled as `flwr run` does) is the hash of `flwr build`'s .fab."""
    app = _tiny_app(tmp_path / "tinyapp")
    flwr = Path(sys.executable).with_name("flwr")
    res = subprocess.run([str(flwr), "build", "--app", str(app)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    (fab,) = tmp_path.glob("*.fab")
    digest, what = app_hash(app)
    assert (digest, "tinyapp 1.2.3") == (hashlib.sha256(fab.read_bytes()).hexdigest(), what.split(",")[0])
    assert app_hash(fab)[0] == digest and fab.name.endswith(f".{digest[:8]}.fab")
    # The command prints a line of an allow-list file.
    res = subprocess.run([sys.executable, "-m", "fedspatial", "app-hash", str(fab)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert parse_allow_list(res.stdout, "stdout") == {digest: f"tinyapp 1.2.3, file {fab}"}
    (tmp_path / "junk.fab").write_bytes(b"not a zip")
    with pytest.raises(DeployError, match="is not a Flower App bundle"):
        app_hash(tmp_path / "junk.fab")


class _FakeRuntime:
    """The SuperNode's Runtime API as the executor sees it: two tasks, then nothing."""

    def __init__(self, executor, tasks) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskResponse
        from flwr.proto.task_pb2 import Task

        self.executor = executor
        self.queue = [AcquireTaskResponse(task=Task(task_id=i, fab_hash=h), token=f"token-{i}")
                      for i, h in enumerate(tasks, start=1)]

    def AcquireTask(self, request):  # Flower's method name
        from flwr.proto.runtime_pb2 import AcquireTaskResponse

        if not self.queue:
            self.executor.stop()
            return AcquireTaskResponse()
        return self.queue.pop(0)

    def close(self) -> None:
        pass


def test_warm_executor_refuses_an_unlisted_bundle_before_forking(monkeypatch, flower_task_identity) -> None:
    """A fake bundle: the unlisted task is refused without a fork (error reply with the
    hash recomputed from the bytes, task FAILED); the listed one is launched."""
    from flwr.app import Context, Message, RecordDict
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.fab import Fab
    from flwr.supernode.runtime import run_clientapp as flower

    from fedspatial.clientapp_executor import WarmExecutor

    bundle = b"PK fake bundle: never unpacked"
    real = hashlib.sha256(bundle).hexdigest()
    claimed = "f" * 64  # a hash field sent alongside: not what is checked or reported
    message = Message(RecordDict(), dst_node_id=1, message_type="query")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    run = type("Run", (), {"run_id": 7})()
    pushed: list = []
    monkeypatch.setattr(flower, "pull_task_input", lambda client: (message, context, run, Fab(claimed, bundle, {})))
    monkeypatch.setattr(flower, "push_message", lambda client, reply, ctx: pushed.append(("reply", reply)))
    monkeypatch.setattr(flower, "push_task_output",
                        lambda client, ctx, status, details: pushed.append(("status", status, details)))
    executor = WarmExecutor("127.0.0.1:1", allowed=frozenset({A}), poll_interval=0.01)
    launched: list = []
    monkeypatch.setattr(executor, "launch", lambda token, task: launched.append(task.task_id))
    tokens: list = []
    fake = _FakeRuntime(executor, [real, A])
    monkeypatch.setattr(executor, "_client", lambda token=None: tokens.append(token) or fake)
    executor.serve()
    assert launched == [2] and executor.workers == []  # task 1 never reached a fork
    assert tokens == [None, "token-1"]  # the refusal speaks for task 1 with its own token
    (_, reply), (_, status, details) = pushed
    assert reply.error.code == ErrorCode.INVALID_FAB and reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.error.reason == details == refusal_reason(real)
    assert f"sha256:{real} is not on this hospital's allow-list" in details and claimed not in details
    assert "fedspatial app-hash" in details and status == SubStatus.FAILED


def test_task_process_checks_the_bundle_again_before_unpacking(tmp_path: Path) -> None:
    """The fork server wraps Flower's install_from_fab: the hash of the bytes decides."""
    installed: list = []
    bundle = b"fake bundle"
    digest = hashlib.sha256(bundle).hexdigest()
    install = guard_install(lambda fab, **kw: installed.append(fab), frozenset({A}))
    with pytest.raises(PermissionError, match=f"sha256:{digest} is not on this hospital's allow-list"):
        install(bundle, skip_prompt=True)
    (tmp_path / "b.fab").write_bytes(bundle)
    with pytest.raises(PermissionError):
        install(tmp_path / "b.fab")
    assert installed == []
    guard_install(lambda fab, **kw: installed.append(fab), frozenset({digest}))(bundle, skip_prompt=True)
    assert installed == [bundle]


def test_task_processes_get_the_second_check() -> None:
    """With an allow-list, the executor's fork server wraps install_from_fab in every task
    process (without one, Flower's own function is left as it is)."""
    program = (
        "import sys\n"
        "from fedspatial.clientapp_executor import WarmExecutor\n"
        f"ex = WarmExecutor('127.0.0.1:1', allowed=frozenset([{A!r}]))\n"
        "ex.warm_up()\n"
        "code = 'import sys; from flwr.supernode.runtime import run_clientapp as r; "
        "sys.exit(r.install_from_fab.__name__ != \"guarded\")'\n"
        "p = ex._ctx.Process(target=exec, args=(code,))\n"
        "p.start(); p.join(); print('exit', p.exitcode)\n"
    )
    res = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("exit 0"), res.stdout + res.stderr[-3000:]



# ----------------------------------------------------------------------------- real processes

from test_deploy import (  # noqa: E402  # the deployment suite's fixtures and helpers
    BIN,
    CONNECTION,
    Deployment,
    _wait_for,
    material,  # noqa: F401  # a fixture
    stop_all,
)


def _snapshot(dest: Path) -> Path:
    """A copy of the checkout, so that the app's hash cannot change while the test runs."""
    import shutil

    top_level = {".venv", ".git", "results", "data", "benchmarks", "build", "dist", ".mypy_cache", ".ruff_cache"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if Path(folder) == ROOT and (n in top_level or n.endswith(".fab"))}

    shutil.copytree(ROOT, dest, symlinks=True, ignore=ignore)
    return dest


def _start_client(dep: Deployment, site: str, home: Path, *extra: str) -> subprocess.Popen:
    """`fedspatial client` with its own FLWR_HOME (where Flower would unpack bundles)."""
    out = open(dep.root / "logs" / f"client-{site}.log", "ab")  # noqa: SIM115  # closed below
    proc = subprocess.Popen([*dep.client_args(site), *extra], stdout=out, stderr=subprocess.STDOUT,
                            env={**dep.env, "FLWR_HOME": str(home)})
    out.close()
    dep.procs.append(proc)
    dep.clients[site] = proc
    return proc


@pytest.mark.deploy
@pytest.mark.slow  # a real run, minutes on 2 cores: `make test-deploy`
@pytest.mark.timeout(900)
def test_unlisted_app_is_refused_before_it_runs_and_a_listed_one_runs(material: Deployment,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    """hospital_a pins another hash: the run's bundle is refused there before any of its
    code runs (nothing unpacked, nothing written), with the reason in the run's report and
    one line in hospital_a's log. hospital_b lists the hash (positive control): it runs."""
    dep = material
    app = _snapshot(tmp_path / "app")
    digest, _ = app_hash(app)
    allow = tmp_path / "allowed-apps.txt"
    allow.write_text(f"# approved versions\n{digest}  # fedspatial, reviewed\n")
    homes = {site: tmp_path / f"home-{site}" for site in ("hospital_a", "hospital_b")}
    try:
        dep.start_server()
        for site in homes:
            res = dep.flwr("supernode", "register", str(dep.keys / f"{site}.pub"), CONNECTION, "--name", site)
            assert res.returncode == 0, res.stdout + res.stderr
        _start_client(dep, "hospital_a", homes["hospital_a"], "--allow-app", "0" * 64)
        _start_client(dep, "hospital_b", homes["hospital_b"], "--allowed-apps", str(allow))
        _wait_for(lambda: dep.online() == 2, 180, "two SuperNodes online", interval=2)
        cmd = [str(BIN / "fedspatial"), "submit", str(dep.experiment("pinned", min_nodes=1)),
               "--connection", CONNECTION, "--app", str(app), "--out", str(dep.root / "submitter" / "pinned")]
        res = dep.run(cmd, timeout=600)
        assert res.returncode == 0 and (dep.results / "pinned" / "metrics.json").is_file(), \
            (res.stdout + res.stderr)[-4000:]
        report = dep.report("pinned")
        assert set(report["sites"]) == {"hospital_b"}
        # Dropped at its first message, before it could describe itself: named by its key's registration.
        log_a = dep.log("client-hospital_a.log")
        node_a = log_a.split("SuperNode ID: ")[1].split()[0]
        who = f"hospital_a (registered key; node {node_a})"
        assert list(report["dropped-sites"]) == [who], report["dropped-sites"]
        dropped = report["dropped-sites"][who]
        assert f"app bundle sha256:{digest} is not on this hospital's allow-list" in dropped, dropped
        assert "fedspatial app-hash" in dropped
        refused = [line for line in log_a.splitlines() if "REFUSED run" in line]
        assert len(refused) == 1 and digest in refused[0], log_a[-3000:]
        assert "app allow-list: only these app bundles run here" in log_a
        # No ClientApp code ran at hospital_a: the bundle was never unpacked, nothing written.
        assert not (homes["hospital_a"] / "apps").exists() or not any((homes["hospital_a"] / "apps").iterdir())
        assert not (dep.root / "out" / "hospital_a").exists() or not any((dep.root / "out" / "hospital_a").rglob("*"))
        assert "REFUSED" not in dep.log("client-hospital_b.log")
        assert list((dep.root / "out" / "hospital_b").rglob("*.h5ad"))
        assert any((homes["hospital_b"] / "apps").iterdir())
    finally:
        stop_all(dep.procs)
