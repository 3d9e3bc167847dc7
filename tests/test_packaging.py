"""One import namespace everywhere: wheel, editable install and a Flower App bundle."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["server/app.py", "client/app.py", "shared/models/gat_autoencoder.py", "strategies/fedavg.py"]


def test_wheel_maps_folders_into_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("fedspatial-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in PARTS:
        assert f"fedspatial/{part}" in names
    # Every module of every part, sub-packages included (the package list is explicit).
    sources = {f"fedspatial/{p.relative_to(ROOT).as_posix()}" for d in ("server", "client", "shared", "strategies") for p in (ROOT / d).rglob("*.py")}
    assert not sources - names, sorted(sources - names)
    # Nothing lands at the top level of site-packages but the package itself.
    tops = {n.split("/")[0] for n in names if not n.startswith("fedspatial-")}
    assert tops == {"fedspatial"}


def test_checkout_links_each_part_into_the_package():
    for part in ("server", "client", "shared", "strategies"):
        link = ROOT / "fedspatial" / part
        assert link.is_symlink() and link.resolve() == ROOT / part


def test_editable_install_imports_from_the_checkout():
    import fedspatial.server.app as server_app
    import fedspatial.shared.training.loop as training

    assert Path(server_app.__file__).resolve() == ROOT / "server" / "app.py"
    assert Path(training.__file__).resolve() == ROOT / "shared" / "training" / "loop.py"


def test_flower_app_bundle_imports_its_own_copy(tmp_path):
    flwr = Path(sys.executable).with_name("flwr")
    if not flwr.exists():
        pytest.skip("flwr CLI not installed beside this Python")
    build = tmp_path / "build"
    # symlinks=True: the checkout's fedspatial/<part> links travel as links, which Flower leaves out
    # Only the checkout's own top-level clutter is left out: a pattern such as "data" would also
    # drop the package shared/data/.
    top_level = {".venv", ".git", "results", "data", "benchmarks", "build", "dist"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if Path(folder) == ROOT and (n in top_level or n.endswith(".fab"))}

    shutil.copytree(ROOT, build, symlinks=True, ignore=ignore)
    subprocess.run([str(flwr), "build"], cwd=build, check=True, capture_output=True)
    (fab,) = build.glob("*.fab")
    unpacked = tmp_path / "app"
    zipfile.ZipFile(fab).extractall(unpacked)
    names = set(zipfile.ZipFile(fab).namelist())
    assert {"fedspatial/__init__.py", *PARTS} <= names
    assert not any(n.startswith("fedspatial/server/") for n in names)  # the link was left out
    # Flower puts the app folder first on sys.path and imports the components by name.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import fedspatial.server.app as s, fedspatial.client.app as c;"
        "print(s.__file__); print(c.__file__); print(type(s.app).__name__, type(c.app).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(unpacked)], check=True, capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(unpacked)) and out[1].startswith(str(unpacked))
    assert out[2:] == ["ServerApp", "ClientApp"]
