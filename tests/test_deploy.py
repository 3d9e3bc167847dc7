"""Deployment with real processes on 127.0.0.1: a SuperLink with TLS (certificates from
``deploy/gen-certs.sh``), SuperNode authentication and a database, three SuperNodes with
their own synthetic site data, all started through ``fedspatial server`` / ``client``.

``make test`` runs all but the two longest (also marked ``slow``: a site lost mid-run, the
SuperLink restarted mid-run); ``make test-deploy`` (``pytest -m deploy``) runs them all.
Every process gets a marker in its environment; teardown stops each by its pid and checks that none is
left. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anndata as ad
import psutil
import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_grid import FakeGrid
from flwr.app import Error, Message

from fedspatial.deployment.certificates import (
    check_auth_key,
    check_server_certificates,
    generate_keypair,
)
from fedspatial.deployment.errors import DeployError
from fedspatial.deployment.network import check_superlink, free_loopback_ports, parse_address
from fedspatial.deployment.nodes import ServerOptions, superlink_command
from fedspatial.deployment.processes import run_child
from fedspatial.deployment.submit import save_results, write_flwr_connection
from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation
from fedspatial.shared.protocol.result_line import (
    MAX_RESULT_BYTES,
    RESULT_MARKER,
    ResultLineError,
    parse_result_line,
    result_line,
)

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SITES = ("hospital_a", "hospital_b", "hospital_c")
CONNECTION = "deploy-test"
# Small sites and model; kmeans-max-iter bounds the number of message rounds, because in a
# deployment each message costs seconds (Flower's SuperNode polls the SuperLink every 3 s
# when idle, and runs each message in a new ClientApp process).
RUN_CONFIG = {
    "num-rounds": 2,
    "local-epochs": 1,
    "batch-size": 64,
    "n-top-features": 60,
    "hidden-dim": 32,
    "latent-dim": 8,
    "kmeans-max-iter": 2,
}
RUN_TIMEOUT = 600.0
MARKER = f"fedspatial-deploy-test-{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------- processes


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FEDSPATIAL_TEST_MARKER=MARKER,  # inherited by every process Flower starts
        PYTHONUNBUFFERED="1",
    )
    return env


def _marked_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if proc.environ().get("FEDSPATIAL_TEST_MARKER") == MARKER:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _stop_tree(popen: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Stop a process and everything it started (Flower detaches its helpers into new
    sessions), by pid: ``sig`` first, SIGKILL after ``grace`` seconds."""
    try:
        tree = [psutil.Process(popen.pid), *psutil.Process(popen.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    try:
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Stop every process a test started (newest first, each with its children, by pid) and
    check that none of this suite's processes is left running."""
    for proc in reversed(procs):
        _stop_tree(proc)
    # Helpers started after a tree was listed exit once their parent is gone.
    deadline = time.monotonic() + 15
    while (leftovers := _marked_processes()) and time.monotonic() < deadline:
        time.sleep(1)
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    assert not leftovers, f"processes left running: {[p.pid for p in leftovers]}"


def _wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 1.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclasses.dataclass
class Deployment:
    root: Path
    certs: Path
    data: Path
    keys: Path
    flwr_home: Path
    port: int
    """The Fleet API (hospitals); the Control API (the `flwr` connection) and the
    ServerAppIo API listen on their own ports."""
    control_port: int
    serverappio_port: int
    env: dict[str, str]
    procs: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    server: subprocess.Popen | None = None
    clients: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def results(self) -> Path:
        return self.root / "center" / "results"

    def spawn(self, args: list[str], log: str, **kwargs) -> subprocess.Popen:
        out = open(self.root / "logs" / log, "ab")  # noqa: SIM115  # closed with the process
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, **kwargs)
        out.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / "logs" / name).read_text(errors="replace")

    def run(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, env=self.env, timeout=timeout)

    # -- the center ----------------------------------------------------------------------
    def start_server(self) -> None:
        self.server = self.spawn(
            [str(BIN / "fedspatial"), "server", "--certs", str(self.certs),
             "--database", str(self.root / "state" / "superlink.db"),
             "--host", "127.0.0.1", "--port", str(self.port), "--control-port", str(self.control_port),
             "--serverappio-port", str(self.serverappio_port), "--workdir", str(self.root / "center")],
            "server.log",
        )

        def up() -> bool:
            try:
                check_superlink(self.address, self.certs / "ca.crt", timeout=2)
            except DeployError:
                assert self.server is not None and self.server.poll() is None, self.log("server.log")
                return False
            return True

        _wait_for(up, 60, "the SuperLink to accept TLS connections")

    def stop_server(self) -> None:
        assert self.server is not None
        _stop_tree(self.server)
        self.server = None

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.run([str(BIN / "flwr"), *args], timeout=timeout)

    def nodes(self) -> list[dict]:
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout[res.stdout.index("{"):])["nodes"]

    def online(self) -> int:
        return sum(n["status"] == "online" for n in self.nodes())

    # -- hospitals -----------------------------------------------------------------------
    def client_args(self, site: str, *, key: str | None = None, ca: Path | None = None,
                    address: str | None = None, port: int | None = None) -> list[str]:
        return [
            str(BIN / "fedspatial"), "client",
            "--superlink", address or self.address,
            "--data-path", str(self.data / site),
            "--ca-cert", str(ca or self.certs / "ca.crt"),
            "--auth-key", str(self.keys / f"{key or site}.key"),
            "--output-path", str(self.root / "out" / site),
            "--runtime-port", str(port or free_loopback_ports()[0]),
        ]

    def policy(self, site: str) -> Path:
        """The site policy file hospital_a's operator owns (empty: no limit yet)."""
        return self.root / f"policy-{site}.toml"

    def start_client(self, site: str) -> None:
        extra = ["--policy", str(self.policy(site))] if site == "hospital_a" else []
        if extra and not self.policy(site).exists():
            self.policy(site).write_text("")
        self.clients[site] = self.spawn([*self.client_args(site), *extra], f"client-{site}.log")

    def crash_client(self, site: str) -> None:
        """A hospital machine dies: SIGKILL to the SuperNode and everything it started."""
        _stop_tree(self.clients.pop(site), sig=signal.SIGKILL, grace=10)

    # -- runs ------------------------------------------------------------------------------
    def run_config_file(self, name: str, **extra) -> Path:
        path = self.root / f"{name}.toml"
        cfg = {**RUN_CONFIG, "run-name": name, "results-dir": str(self.results), **extra}
        path.write_text(tomli_w.dumps(cfg))
        return path

    def experiment(self, name: str, *, min_nodes: int, message_timeout: float = 600.0) -> Path:
        """The YAML experiment config of ``RUN_CONFIG`` (for ``fedspatial submit``)."""
        path = self.root / f"{name}.yaml"
        path.write_text(
            f"run-name: {name}\nresults-dir: {self.results}\n"
            f"features: {{n-top-features: {RUN_CONFIG['n-top-features']}}}\n"
            f"model: {{hidden-dim: {RUN_CONFIG['hidden-dim']}, latent-dim: {RUN_CONFIG['latent-dim']}}}\n"
            f"training: {{num-rounds: {RUN_CONFIG['num-rounds']}, local-epochs: {RUN_CONFIG['local-epochs']}, "
            f"batch-size: {RUN_CONFIG['batch-size']}, min-nodes: {min_nodes}, message-timeout: {message_timeout}}}\n"
            f"clustering: {{kmeans-max-iter: {RUN_CONFIG['kmeans-max-iter']}}}\n"
        )
        return path

    def fedspatial_submit(self, name: str, *, min_nodes: int, message_timeout: float = 600.0) -> list[str]:
        return [str(BIN / "fedspatial"), "submit",
                str(self.experiment(name, min_nodes=min_nodes, message_timeout=message_timeout)),
                "--connection", CONNECTION, "--app", str(ROOT), "--out", str(self.root / "submitter" / name)]

    def submit(self, name: str, **extra) -> subprocess.Popen:
        """``flwr run . <connection> --stream`` in the background."""
        return self.spawn(
            [str(BIN / "flwr"), "run", str(ROOT), CONNECTION, "--stream",
             "--run-config", str(self.run_config_file(name, **extra))],
            f"run-{name}.log",
        )

    def wait_run(self, proc: subprocess.Popen, name: str) -> str:
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            _stop_tree(proc)
            raise AssertionError(f"run {name} did not finish in {RUN_TIMEOUT:.0f} s:\n{self.log(f'run-{name}.log')[-3000:]}") from None
        return self.log(f"run-{name}.log")

    def report(self, name: str) -> dict:
        return json.loads((self.results / name / "metrics.json").read_text())

    def checkpoint_round(self, name: str) -> int:
        state = self.results / name / "checkpoint" / "state.json"
        return int(json.loads(state.read_text())["round"]) if state.exists() else 0


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Deployment:
    """Certificates (deploy script), hospital keys (``fedspatial keygen``), site data and a
    Flower connection; no process running yet."""
    root = tmp_path_factory.mktemp("deploy")
    for sub in ("logs", "state", "center", "out"):
        (root / sub).mkdir()
    certs = root / "certs"
    subprocess.run(["bash", str(ROOT / "deploy" / "gen-certs.sh"), "-o", str(certs), "-k", str(root / "ca-private"),
                    "127.0.0.1"], check=True, capture_output=True, timeout=60)
    # A second, unrelated CA (its key in the default folder, other-ca-private/): what a hospital holding the wrong file would have.
    subprocess.run(["bash", str(ROOT / "deploy" / "gen-certs.sh"), "-o", str(root / "other"), "127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    spec = dataclasses.replace(SyntheticSpec(seed=5), spots_per_section=(120, 180), n_features=80)
    write_synthetic_federation(root / "data", spec)
    keys = root / "keys"
    for name in (*SITES, "intruder"):
        res = subprocess.run([str(BIN / "fedspatial"), "keygen", name, "--out", str(keys)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    flwr_home = root / "flwr"
    port, control_port, serverappio_port = free_loopback_ports(3)
    write_flwr_connection(flwr_home, CONNECTION, f"127.0.0.1:{control_port}", certs / "ca.crt")
    return Deployment(root, certs, root / "data", keys, flwr_home, port, control_port, serverappio_port,
                      _env(flwr_home))


@pytest.fixture(scope="module")
def deployment(material: Deployment) -> Iterator[Deployment]:
    """The SuperLink, the three hospitals' keys registered, their SuperNodes online."""
    dep = material
    try:
        dep.start_server()
        for site in SITES:
            res = dep.flwr("supernode", "register", str(dep.keys / f"{site}.pub"), CONNECTION, "--name", site)
            assert res.returncode == 0 and "registered successfully" in res.stdout, res.stdout + res.stderr
        for site in SITES:
            dep.start_client(site)
        try:
            _wait_for(lambda: dep.online() == 3, 180, "three SuperNodes online", interval=2)
        except AssertionError as err:  # say why: each SuperNode's exit code and log tail
            tails = "\n".join(
                f"--- {site} (exit code {dep.clients[site].poll()}):\n{dep.log(f'client-{site}.log')[-1500:]}"
                for site in SITES
            )
            raise AssertionError(f"{err}\n{tails}\n--- server:\n{dep.log('server.log')[-1500:]}") from None
        yield dep
    finally:
        stop_all(dep.procs)


# ----------------------------------------------------------------------------- checks without processes


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _cert(path: Path, key_path: Path, issuer_key, *, days: tuple[int, int], names: list[str],
          issuer: x509.Name | None = None) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .sign(issuer_key or key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def test_server_certificate_checks(material: Deployment, tmp_path: Path) -> None:
    certs, other = material.certs, material.root / "other"
    names = check_server_certificates(certs / "server.crt", certs / "server.key", certs / "ca.crt", "0.0.0.0")
    assert {"localhost", "127.0.0.1"} <= set(names)
    with pytest.raises(DeployError, match="does not belong to server certificate"):
        check_server_certificates(certs / "server.crt", other / "server.key", certs / "ca.crt", "0.0.0.0")
    with pytest.raises(DeployError, match="was not issued by the CA"):
        check_server_certificates(certs / "server.crt", certs / "server.key", other / "ca.crt", "0.0.0.0")
    with pytest.raises(DeployError, match="does not exist"):
        check_server_certificates(tmp_path / "nope.crt", certs / "server.key", certs / "ca.crt", "0.0.0.0")
    expired = tmp_path / "expired.crt"
    _cert(expired, tmp_path / "expired.key", None, days=(-30, -1), names=["localhost"])
    with pytest.raises(DeployError, match=r"expired on .* renews it"):
        check_server_certificates(expired, tmp_path / "expired.key", certs / "ca.crt", "0.0.0.0")
    with pytest.raises(DeployError, match=r"reaches itself at 10\.1\.2\.3"):
        check_server_certificates(certs / "server.crt", certs / "server.key", certs / "ca.crt", "10.1.2.3")


@contextlib.contextmanager
def _tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 presenting ``cert`` (handshake only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # closed
                return
            with contextlib.suppress(ssl.SSLError, OSError), ctx.wrap_socket(conn, server_side=True):
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_superlink_certificate_problems_are_named(material: Deployment, tmp_path: Path) -> None:
    """Certificates from the right CA, but for another name or expired."""
    ca_key = serialization.load_pem_private_key((material.root / "ca-private" / "ca.key").read_bytes(), None)
    ca_name = x509.load_pem_x509_certificate((material.certs / "ca.crt").read_bytes()).subject
    ca = material.certs / "ca.crt"
    _cert(tmp_path / "other.crt", tmp_path / "other.key", ca_key, days=(-1, 30), names=["other.example"], issuer=ca_name)
    with _tls_server(tmp_path / "other.crt", tmp_path / "other.key") as port, \
            pytest.raises(DeployError, match=r"valid for other\.example, not for '127\.0\.0\.1'"):
        check_superlink(f"127.0.0.1:{port}", ca, timeout=5)
    _cert(tmp_path / "old.crt", tmp_path / "old.key", ca_key, days=(-30, -1), names=["127.0.0.1"], issuer=ca_name)
    with _tls_server(tmp_path / "old.crt", tmp_path / "old.key") as port, \
            pytest.raises(DeployError, match=r"certificate expired on .* the center must renew it"):
        check_superlink(f"127.0.0.1:{port}", ca, timeout=5)


def test_keys_and_addresses(material: Deployment, tmp_path: Path) -> None:
    key = material.keys / "hospital_a.key"
    assert check_auth_key(key) == key
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert (material.keys / "hospital_a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(DeployError, match=r"not the \.pub"):
        check_auth_key(material.keys / "hospital_a.pub")
    with pytest.raises(DeployError, match="exists"):
        generate_keypair(key)
    assert parse_address("fl.example.org:9092") == ("fl.example.org", 9092)
    assert parse_address("[::1]:9092") == ("::1", 9092)
    with pytest.raises(DeployError, match="HOST:PORT"):
        parse_address("fl.example.org")


def test_client_refuses_bad_data_before_connecting(material: Deployment, tmp_path: Path) -> None:
    """Missing data path and data with problems: the `fedspatial inspect` message, no connection."""
    args = material.client_args("hospital_a", address="127.0.0.1:9")  # nothing would answer there
    missing = [*args]
    missing[missing.index("--data-path") + 1] = str(tmp_path / "no-such-site")
    res = material.run(missing)
    assert res.returncode == 2 and "does not exist" in res.stderr and "fedspatial inspect" in res.stderr
    bad = ad.read_h5ad(next((material.data / "hospital_a").glob("*.h5ad")))
    del bad.obsm["spatial"]
    (tmp_path / "bad").mkdir()
    bad.write_h5ad(tmp_path / "bad" / "s1.h5ad")
    broken = [*args]
    broken[broken.index("--data-path") + 1] = str(tmp_path / "bad")
    res = material.run(broken)
    assert res.returncode == 2 and "obsm['spatial']" in res.stderr


def test_unreachable_superlink_fails_fast_with_a_clear_message(material: Deployment) -> None:
    port = free_loopback_ports()[0]  # nothing listens there
    start = time.monotonic()
    res = material.run(material.client_args("hospital_a", address=f"127.0.0.1:{port}"), timeout=60)
    assert res.returncode == 2
    assert "refused the connection" in res.stderr and "firewall" in res.stderr, res.stderr
    # A port that accepts TCP but never answers (a wrong service, a stalled proxy).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        args = material.client_args("hospital_a", address=f"127.0.0.1:{silent.getsockname()[1]}")
        res = material.run([*args, "--connect-timeout", "3"], timeout=60)
    assert res.returncode == 2 and "did not complete a TLS handshake within 3 s" in res.stderr, res.stderr
    assert time.monotonic() - start < 45


def test_result_line_round_trip(tmp_path: Path) -> None:
    """The run report rides back in one log line: intact, checked, and only into its folder."""
    files = {"metrics.json": '{"joint": {"ari": NaN}}\n', "config.json": "{}\n"}
    line = result_line("r1", "/srv/results/r1", files)
    assert "\n" not in line
    assert parse_result_line("INFO :      some other line\n") is None
    bundle = parse_result_line(f"prefix {line}\n")  # wherever the stream puts it
    assert bundle is not None and bundle["files"] == files and bundle["center-folder"] == "/srv/results/r1"
    saved = save_results(bundle, tmp_path / "out")
    assert [p.read_text() for p in saved] == list(files.values())
    with pytest.raises(ResultLineError, match="checksum"):
        parse_result_line(line.replace("NaN", "0.5"))
    with pytest.raises(ResultLineError, match="damaged"):
        parse_result_line(line[: len(line) // 2])
    with pytest.raises(ResultLineError, match="unexpected file"):  # more: tests/test_results_safety.py
        parse_result_line(result_line("r1", "/x", {"../escape.json": "{}"}))
    assert not (tmp_path / "escape.json").exists()
    with pytest.raises(ResultLineError, match="too large"):
        result_line("r1", "/x", {"metrics.json": "x" * MAX_RESULT_BYTES})


def test_ca_key_stays_out_of_the_servers_folder(material: Deployment, tmp_path: Path) -> None:
    """Issue 14 item 2: gen-certs.sh keeps the CA key apart, and `fedspatial server`
    refuses to start while a CA key (or any private key but its own) is in --certs."""
    assert not (material.certs / "ca.key").exists()
    ca_key = material.root / "ca-private" / "ca.key"
    assert oct(ca_key.stat().st_mode & 0o777) == "0o600"
    # Renewal reuses the CA from its own folder (nothing new for the hospitals) ...
    certs = tmp_path / "certs"
    shutil.copytree(material.certs, certs)
    gen = ["bash", str(ROOT / "deploy" / "gen-certs.sh"), "-o", str(certs)]
    res = subprocess.run([*gen, "-k", str(ca_key.parent), "--renew", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "reusing the CA" in res.stdout, res.stderr
    assert (certs / "ca.crt").read_bytes() == (material.certs / "ca.crt").read_bytes()
    # ... and refuses a CA folder inside the certificate folder.
    res = subprocess.run([*gen, "-k", str(certs / "ca"), "--renew", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "inside" in res.stderr and not (certs / "ca").exists()

    ports = free_loopback_ports(3)
    server = [str(BIN / "fedspatial"), "server", "--certs", str(certs), "--database", str(tmp_path / "db" / "s.db"),
              "--host", "127.0.0.1", "--port", str(ports[0]), "--control-port", str(ports[1]),
              "--serverappio-port", str(ports[2])]
    for name in ("ca.key", "backup.pem"):  # by its name, or by its content
        shutil.copy(ca_key, certs / name)
        res = material.run(server, timeout=60)
        (certs / name).unlink()
        assert res.returncode == 2, res.stderr[-2000:]
        error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"private key {certs / name} is in the certificate folder" in error[0]
        assert "move it out" in error[0] and "--ca-dir" in error[0]
    # Negative control: the same folder without the key passes every check.
    opts = ServerOptions(certs=certs, ssl_certfile=None, ssl_keyfile=None, ssl_ca_certfile=None,
                         database=tmp_path / "db" / "s.db", host="127.0.0.1", port=ports[0],
                         control_port=ports[1], serverappio_port=ports[2])
    assert "fedspatial.deployment.superlink" in superlink_command(opts)


def test_control_and_serverappio_apis_default_to_loopback(material: Deployment, tmp_path: Path,
                                                          monkeypatch, caplog) -> None:
    """Issue 14 item 1, the command line: with the Fleet API on all interfaces, the
    Control and ServerAppIo APIs still bind 127.0.0.1; exposing the Control API takes an
    explicit flag and logs a warning. (No process: nothing may listen off loopback here.)"""
    from fedspatial.deployment import nodes

    monkeypatch.setattr(nodes, "port_free", lambda host, port: True)
    opts = ServerOptions(certs=material.certs, ssl_certfile=None, ssl_keyfile=None, ssl_ca_certfile=None,
                         database=tmp_path / "s.db", host="0.0.0.0", port=9092)
    cmd = superlink_command(opts)
    flower = cmd[cmd.index("--") + 1:]
    assert cmd[cmd.index("--fleet") + 1] == "0.0.0.0:9092"
    assert cmd[cmd.index("--control") + 1] == "127.0.0.1:9093"
    assert flower[flower.index("--host") + 1] == "127.0.0.1" and flower[flower.index("--port") + 1] == "9091"
    public = dataclasses.replace(opts, control_host="0.0.0.0")
    with pytest.raises(DeployError, match="--expose-control-api"):
        superlink_command(public)
    cmd = superlink_command(dataclasses.replace(public, expose_control_api=True))
    assert cmd[cmd.index("--control") + 1] == "0.0.0.0:9093"
    assert "THE CONTROL API IS EXPOSED on 0.0.0.0:9093" in caplog.text


def test_wrapper_stops_when_its_helper_dies(caplog) -> None:
    """`fedspatial client` runs the warm executor beside flower-supernode: if it dies, the
    SuperNode (which could not run any message) is stopped too, with a message."""
    start = time.monotonic()
    code = run_child(
        [sys.executable, "-c", "import time; time.sleep(60)"], explain={}, what="the main process",
        helpers={"the helper": [sys.executable, "-c", "raise SystemExit(3)"]},
    )
    assert code == 1 and time.monotonic() - start < 30
    assert "the helper ended unasked (exit code 3" in caplog.text


def test_warm_executor_preloads_dependencies_not_fedspatial() -> None:
    """Task processes fork with torch, torch-geometric, matplotlib and Flower's ClientApp
    runtime imported, but without fedspatial's modules: Flower then loads the ClientApp
    from the run's bundle, as in its own `flwr-clientapp`."""
    modules = ["torch", "torch_geometric", "matplotlib.pyplot", "anndata",
               "flwr.supernode.runtime.run_clientapp", "fedspatial", "fedspatial.client.app"]
    program = (
        "import sys, time\n"
        "from fedspatial.clientapp_executor import WarmExecutor\n"
        "ex = WarmExecutor('127.0.0.1:1')\n"
        "ex.warm_up()\n"
        f"code = {f'import sys; print(sorted(m for m in {modules!r} if m in sys.modules))'!r}\n"
        "t = time.perf_counter()\n"
        "p = ex._ctx.Process(target=exec, args=(code,))\n"
        "p.start(); p.join()\n"
        "print(round(time.perf_counter() - t, 3), p.exitcode)\n"
    )
    res = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "FEDSPATIAL_TEST_MARKER": MARKER})
    assert res.returncode == 0, res.stderr[-3000:]
    loaded, timing = res.stdout.strip().splitlines()[-2:]
    assert loaded == str(sorted(set(modules) - {"fedspatial", "fedspatial.client.app"}))
    seconds, exitcode = timing.split()
    assert exitcode == "0" and float(seconds) < 5  # a fork, not a Python start-up with imports


class _FailingGrid(FakeGrid):
    """Replies at once; nodes in ``dead`` answer with Flower's node-unavailable error."""

    def __init__(self, online: set[int], dead: set[int]) -> None:
        super().__init__(online)
        self.dead = dead

    def answer(self, message: Message) -> Message:
        if message.metadata.dst_node_id in self.dead:
            return Message(Error(code=3, reason="Node Unavailable"), reply_to=message)
        return super().answer(message)


def test_site_group_drops_failed_sites_until_too_few_remain(flower_task_identity) -> None:
    from fedspatial.server.messaging import SiteError, SiteGroup, ask

    grid = _FailingGrid({1, 2, 3}, dead={3})
    sites = SiteGroup(grid, [1, 2, 3], min_nodes=2, patience=0.2, hint="checkpoint kept")
    sites.names = {1: "a", 2: "b", 3: "c"}
    # Flower's own error replies come from the SuperLink, not the site: attributed by message id.
    assert sorted(ask(sites, sites.nodes, "describe")) == [1, 2]
    assert sites.nodes == [1, 2] and "Node Unavailable" in sites.dropped["c"]
    assert sites.get_node_ids() == [1, 2]
    grid.dead = {2}
    with pytest.raises(SiteError, match=r"only 1 site\(s\) left, fewer than min-nodes=2(.|\n)*- b: (.|\n)*checkpoint kept"):
        ask(sites, sites.nodes, "describe")
    # Too few online for longer than `patience`: an error instead of Flower's endless wait.
    late = SiteGroup(_FailingGrid({1}, set()), [1, 2], min_nodes=2, patience=0.2)
    assert late.get_node_ids() == [1]
    time.sleep(0.3)
    with pytest.raises(SiteError, match="only 1 site"):
        late.get_node_ids()


# ----------------------------------------------------------------------------- the deployment


def _status(port: int, path: str, ca: Path) -> tuple[int, str]:
    """POST ``path`` to the SuperLink on 127.0.0.1:``port`` (TLS): status and body."""
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ssl.create_default_context(cafile=str(ca)))
    try:
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        res = conn.getresponse()
        return res.status, res.read().decode(errors="replace")
    finally:
        conn.close()


def test_each_api_listens_on_its_own_loopback_port(deployment: Deployment) -> None:
    """Issue 14 item 1, real processes: the hospitals' port serves the Fleet API only; the
    Control API (runs, key registration) and the ServerAppIo API (ServerApp tasks) are
    refused there and listen on 127.0.0.1 ports of their own."""
    assert deployment.server is not None
    tree = [psutil.Process(deployment.server.pid), *psutil.Process(deployment.server.pid).children(recursive=True)]
    listening = set()
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            listening |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", p) for p in (deployment.port, deployment.control_port, deployment.serverappio_port)}
    ca = deployment.certs / "ca.crt"
    refused = "not served on this port"
    for port, path in [(deployment.port, "/v1/control/list-runs"), (deployment.port, "/v1/runtime/acquire-task"),
                       (deployment.port, "/docs"), (deployment.port, "/v1/fleet/../control/list-runs"),
                       (deployment.control_port, "/v1/fleet/get-run"), (deployment.control_port, "/v1/runtime/get-nodes"),
                       (deployment.serverappio_port, "/v1/control/list-runs"), (deployment.serverappio_port, "/v1/fleet/get-run")]:
        assert _status(port, path, ca) == (404, refused + "\n"), (port, path)
    # Negative control: each API's own paths reach Flower (which then judges the request).
    for port, path in [(deployment.port, "/v1/fleet/get-run"), (deployment.control_port, "/v1/control/list-runs")]:
        assert _status(port, path, ca)[1] != refused + "\n", (port, path)
    # The Flower command line: refused on the hospitals' port, served on the Control port.
    public = deployment.root / "flwr-public"
    write_flwr_connection(public, "public", deployment.address, ca)
    res = subprocess.run([str(BIN / "flwr"), "ls", "public"], capture_output=True, text=True, timeout=60,
                         env={**deployment.env, "FLWR_HOME": str(public)})
    assert res.returncode != 0 and "404" in res.stdout + res.stderr, res.stdout[-2000:]
    # ... and so is registering an unknown SuperNode key from there: keys are the center operator's.
    res = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(deployment.keys / "intruder.pub"), "public"],
                         capture_output=True, text=True, timeout=60, env={**deployment.env, "FLWR_HOME": str(public)})
    assert res.returncode != 0 and "404" in res.stdout + res.stderr, res.stdout[-2000:]
    assert len(deployment.nodes()) == 3
    res = deployment.flwr("ls", CONNECTION)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def test_wrong_ca_is_refused_with_a_clear_message(deployment: Deployment) -> None:
    args = deployment.client_args("hospital_a", ca=deployment.root / "other" / "ca.crt")
    res = deployment.run(args, timeout=60)
    assert res.returncode == 2
    assert "wrong CA file" in res.stderr and "did not issue" in res.stderr, res.stderr
    # ... and Flower itself agrees: a SuperNode holding that CA never gets online.
    proc = deployment.spawn(
        [str(BIN / "flower-supernode"), "--superlink", deployment.address,
         "--root-certificates", str(deployment.root / "other" / "ca.crt"),
         "--auth-supernode-private-key", str(deployment.keys / "hospital_a.key"),
         "--port", str(free_loopback_ports()[0]), "--max-retries", "2"],
        "raw-wrong-ca.log",
    )
    try:
        proc.wait(timeout=90)
    finally:
        _stop_tree(proc)
    assert proc.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("raw-wrong-ca.log")
    assert deployment.online() == 3


def test_unregistered_supernode_is_refused(deployment: Deployment) -> None:
    args = deployment.client_args("hospital_a", key="intruder")
    start = time.monotonic()
    res = deployment.run(args, timeout=120)
    assert res.returncode != 0
    assert "refused this SuperNode" in res.stderr and "not registered" in res.stderr, res.stderr[-3000:]
    assert "flwr supernode register intruder.pub" in res.stderr
    assert time.monotonic() - start < 90
    assert len(deployment.nodes()) == 3 and deployment.online() == 3


@pytest.mark.timeout(900)  # real runs: minutes each on 2 cores
def test_two_round_run_completes(deployment: Deployment) -> None:
    """`fedspatial submit CONFIG`: results at the center, annotated sections at the sites."""
    start = time.monotonic()
    res = deployment.run(deployment.fedspatial_submit("t1", min_nodes=3), timeout=RUN_TIMEOUT)
    wall = time.monotonic() - start
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "run finished. Report saved to" in res.stderr
    # fedspatial's own log lines and the final summary come with Flower's log stream ...
    assert "INFO fedspatial.shared.phases.describe: sites: hospital_" in res.stdout, res.stdout[-3000:]
    # Each line once: a root log handler that a library installs on import (opacus does)
    # would repeat Flower's and fedspatial's lines.
    assert res.stdout.count("[ROUND 1/2]") == 1 and res.stdout.count("run 't1' finished") == 1
    assert "run 't1' finished: 2 round(s), 3 site(s)" in res.stdout and "joint ARI" in res.stdout
    # Site names are bound to the names the keys were registered with (issue 14 item 7) ...
    assert ("site names checked against the registered keys: hospital_a (bound), hospital_b (bound), "
            "hospital_c (bound)") in res.stdout
    # ... and the report files come back byte for byte; the marked line is not echoed.
    assert RESULT_MARKER not in res.stdout and "[run report received:" in res.stdout
    for name in ("metrics.json", "config.json"):
        assert (deployment.root / "submitter" / "t1" / name).read_bytes() == (deployment.results / "t1" / name).read_bytes()
    # A submitter who stopped following gets the report again from the run's log.
    run_id = res.stdout.split("Successfully started run ")[1].split()[0]
    again = deployment.run([str(BIN / "fedspatial"), "results", run_id, "--connection", CONNECTION,
                            "--out", str(deployment.root / "again")], timeout=120)
    assert again.returncode == 0 and "report of run 't1' saved to" in again.stderr, again.stderr[-2000:]
    assert (deployment.root / "again" / "metrics.json").read_bytes() == (deployment.results / "t1" / "metrics.json").read_bytes()
    report = deployment.report("t1")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["n-sites"] == 3 for r in report["rounds"])
    assert set(report["sites"]) == set(SITES)
    assert 0.0 <= report["joint"]["ari"] <= 1.0
    assert report["dropped-sites"] == {}
    assert (deployment.results / "t1" / "model" / "model.safetensors").is_file()
    for site in SITES:
        written = sorted((deployment.root / "out" / site).rglob("*.h5ad"))
        assert len(written) == len(report["sites"][site]["sections"])
        annotated = ad.read_h5ad(written[0])
        assert annotated.obsm["X_fedspatial"].shape[1] == 8
        assert "fedspatial_domain" in annotated.obs
    assert not list((deployment.results / "t1").rglob("*.h5ad"))  # sections stay at the sites
    # The run's ServerApp was forked by the center's warm executor, not started afresh ...
    assert f"run {run_id}: ServerApp process" in deployment.log("server.log")
    # ... and each site answered the run's messages from one worker process, which loaded its data
    # once (issue 17 item 4), not once per message as a fresh ClientApp process does.
    for site in SITES:
        log = deployment.log(f"client-{site}.log")
        workers = re.findall(r"run (\d+): ClientApp worker \d+ started", log)
        assert workers.count(run_id) == 1, log[-3000:]
        assert log.count("fedspatial.shared.data.io: loaded") == len(workers) < log.count("Receiving:")
    # ... and no hospital's own path reaches the center (issue 14 item 6): file names only.
    assert str(deployment.root / "out") not in (deployment.results / "t1" / "metrics.json").read_text()
    section = next(iter(report["sections"].values()))
    assert not Path(section["output"]).is_absolute() and section["output"].endswith(".h5ad")
    (deployment.root / "t1-wall.txt").write_text(f"{wall:.1f}\n")


# ----------------------------------------------------------------------------- attacks (issue 14)
# Each test below is one row of benchmarks/results/security.md: an attack tried against the real
# processes, refused. They run after the full run above and leave the three hospitals online.


def _restart_client(dep: Deployment, site: str, *extra: str) -> None:
    """Stop a hospital's SuperNode (by pid) and start it again with ``extra`` options."""
    _stop_tree(dep.clients.pop(site))
    extra = (*extra, "--policy", str(dep.policy(site))) if site == "hospital_a" else extra
    # Flower refuses a key it still marks online: start again once the SuperLink saw it go.
    _wait_for(lambda: dep.online() == 2, 180, f"{site} marked offline", interval=2)
    dep.clients[site] = dep.spawn([*dep.client_args(site), *extra], f"client-{site}.log")
    _wait_for(lambda: dep.online() == 3, 120, f"{site} back online", interval=2)


def _fails_fast(dep: Deployment, name: str, message_timeout: float = 600.0) -> tuple[str, float]:
    """``fedspatial submit`` a run that one site refuses, ``min-nodes`` = every site: the run
    must stop, and the submitter's exit code say so."""
    start = time.monotonic()
    res = dep.run(dep.fedspatial_submit(name, min_nodes=3, message_timeout=message_timeout), timeout=RUN_TIMEOUT)
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-3000:]
    assert "fewer than min-nodes=3; the run stops" in log, log[-3000:]
    assert not (dep.results / name / "metrics.json").exists()
    return log, time.monotonic() - start


def test_a_hospitals_own_policy_refuses_a_run_without_local_dp(deployment: Deployment) -> None:
    """Item 4: the center submits a run without local DP; hospital_a's operator requires it
    in the policy file only they own (re-read at every message: no restart). The site
    refuses before computing anything and says so in its own log; the run config cannot
    lift the limit."""
    policy = deployment.policy("hospital_a")
    policy.write_text("require-local-dp = true\nmax-epsilon = 8.0\n")
    try:
        log, _ = _fails_fast(deployment, "t-policy")
        assert "site hospital_a refuses query.describe by its site policy: require-local-dp=true" in log
        assert "SITE POLICY REFUSAL: site hospital_a refuses" in deployment.log("client-hospital_a.log")
    finally:
        policy.write_text("")


@pytest.mark.slow  # two SuperNode restarts, each waiting for Flower to see the node go: `make test-deploy`
@pytest.mark.timeout(900)
def test_a_site_claiming_another_sites_name_is_dropped(deployment: Deployment) -> None:
    """Item 7: hospital_b's SuperNode says it is hospital_a. Its key was registered as
    hospital_b, so the center drops it instead of merging two hospitals' results."""
    _restart_client(deployment, "hospital_b", "--site-name", "hospital_a")
    try:
        log, _ = _fails_fast(deployment, "t-identity")
        assert "says it is site 'hospital_a' but its key is registered as 'hospital_b'" in log, log[-3000:]
    finally:
        _restart_client(deployment, "hospital_b")


def test_a_hung_site_is_dropped_after_the_message_timeout(deployment: Deployment) -> None:
    """Item 8: hospital_c's machine hangs (SIGSTOP to its SuperNode and executor: online to
    Flower for a while, answering nothing). With ``message-timeout`` 20 s the center drops it
    after 20 s, not Flower's hour, and min-nodes decides (here: every site, so the run stops)."""
    tree = [psutil.Process(deployment.clients["hospital_c"].pid),
            *psutil.Process(deployment.clients["hospital_c"].pid).children(recursive=True)]
    for proc in tree:
        proc.suspend()
    try:
        log, wall = _fails_fast(deployment, "t-hung", message_timeout=20.0)
    finally:
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
    # named by the name its key was registered with (it never said which site it is)
    assert "- hospital_c (registered key; node " in log and "no reply within 20 s (message-timeout)" in log, log[-3000:]
    assert "No round finished: nothing to resume" in log
    assert wall < 120, wall
    _wait_for(lambda: deployment.online() == 3, 120, "hospital_c back online", interval=2)


EVIL_SERVERAPP = """\
from flwr.serverapp import ServerApp
app = ServerApp()
@app.main()
def main(grid, context):
    print({line!r}, flush=True)
"""
EVIL_CLIENTAPP = "from flwr.clientapp import ClientApp\napp = ClientApp()\n"


def test_a_crafted_result_line_does_not_plant_an_ssh_key(deployment: Deployment, tmp_path: Path) -> None:
    """Item 6: whoever runs code at the center writes the run's log. A run whose ServerApp
    prints a result line naming ``../../.ssh`` and ``authorized_keys`` (valid JSON, valid
    checksums): ``fedspatial results RUN_ID`` refuses it and writes nothing anywhere."""
    import hashlib

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBAD attacker@example\n"
    bundle = {"run-name": "../../.ssh", "center-folder": "/srv/x", "files": {"authorized_keys": key},
              "sha256": {"authorized_keys": hashlib.sha256(key.encode()).hexdigest()}}
    app = tmp_path / "evil_app"
    (app / "evil").mkdir(parents=True)
    (app / "evil" / "__init__.py").write_text("")
    (app / "evil" / "server_app.py").write_text(EVIL_SERVERAPP.format(line=RESULT_MARKER + json.dumps(bundle)))
    (app / "evil" / "client_app.py").write_text(EVIL_CLIENTAPP)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "attacker"\n'
        '[tool.flwr.app.components]\nserverapp = "evil.server_app:app"\nclientapp = "evil.client_app:app"\n'
        '[tool.flwr.app.config]\nx = 1\n'
    )
    res = deployment.flwr("run", str(app), CONNECTION, "--stream", timeout=300)
    assert RESULT_MARKER in res.stdout, (res.stdout + res.stderr)[-3000:]
    run_id = res.stdout.split("Successfully started run ")[1].split()[0]
    home = tmp_path / "home" / "user"
    (home / ".ssh").mkdir(parents=True)
    (home / "work").mkdir()
    got = subprocess.run([str(BIN / "fedspatial"), "results", run_id, "--connection", CONNECTION],
                         capture_output=True, text=True, env=deployment.env, timeout=120, cwd=home / "work")
    assert got.returncode != 0
    assert "not a valid run name" in got.stderr and "refusing to save it" in got.stderr, got.stderr[-2000:]
    assert not (home / ".ssh" / "authorized_keys").exists()
    assert sorted(os.listdir(home)) == [".ssh", "work"] and os.listdir(home / "work") == []


@pytest.mark.slow  # minutes, most of it Flower noticing the lost site: `make test-deploy`
@pytest.mark.timeout(1200)  # real runs: minutes each on 2 cores
def test_run_completes_after_losing_a_site(deployment: Deployment) -> None:
    """A hospital machine dies in round 2: the run drops it and finishes with two."""
    run = deployment.submit("t4", **{"min-nodes": 2})
    _wait_for(lambda: deployment.checkpoint_round("t4") >= 1 or run.poll() is not None, RUN_TIMEOUT,
              "round 1 of run t4", interval=2)
    assert run.poll() is None, deployment.log("run-t4.log")[-3000:]
    deployment.crash_client("hospital_c")
    log = deployment.wait_run(run, "t4")
    assert run.returncode == 0, log[-3000:]
    report = deployment.report("t4")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][0]["n-sites"] == 3 and report["rounds"][1]["n-sites"] == 2
    assert set(report["sites"]) == {"hospital_a", "hospital_b"}
    assert "hospital_c" in report["dropped-sites"]
    assert "dropped out of the run" in log


@pytest.mark.slow  # two runs and a restart: `make test-deploy`
@pytest.mark.timeout(1500)  # real runs: minutes each on 2 cores
def test_superlink_restart_keeps_state_and_a_new_run_completes(deployment: Deployment) -> None:
    """The center restarts mid-run: registrations and runs survive in the database, the
    hospitals reconnect by themselves, and the interrupted run resumes from its checkpoint."""
    if "hospital_c" in deployment.clients:  # run alone: take the same starting point
        deployment.crash_client("hospital_c")
    runs_before = deployment.flwr("ls", CONNECTION, "--format", "json").stdout
    run = deployment.spawn(deployment.fedspatial_submit("t5", min_nodes=2), "submit-t5.log")
    _wait_for(lambda: deployment.checkpoint_round("t5") >= 1 or run.poll() is not None, RUN_TIMEOUT,
              "round 1 of run t5", interval=2)
    deployment.stop_server()
    try:
        run.wait(timeout=120)  # the submitter notices, and is told how to go on
    finally:
        _stop_tree(run)
    assert run.returncode != 0
    told = deployment.log("submit-t5.log")
    assert "Connection to the SuperLink is unavailable" in told and "--set resume=true" in told, told[-2000:]
    assert not (deployment.results / "t5" / "metrics.json").exists()

    deployment.start_server()
    _wait_for(lambda: deployment.online() == 2, 120, "hospitals a and b to reconnect", interval=3)
    assert len(deployment.nodes()) == 3  # registrations survived, nobody re-registered
    runs_after = json.loads(deployment.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"]
    before_ids = {r["run-id"] for r in json.loads(runs_before)["runs"]}
    assert before_ids <= {r["run-id"] for r in runs_after}

    resumed = deployment.submit("t5", **{"min-nodes": 2, "resume": True})
    log = deployment.wait_run(resumed, "t5")
    assert resumed.returncode == 0, log[-3000:]
    report = deployment.report("t5")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert set(report["sites"]) == {"hospital_a", "hospital_b"}
