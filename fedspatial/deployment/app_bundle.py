"""The app bundle a submission sends, built without walking ignored folders.

``flwr run APP_DIR`` bundles the app by listing every file under ``APP_DIR`` (resolving
each one) and only then dropping what ``.gitignore`` and Flower's own rules leave out. In
a checkout set up as the README says, ``.venv`` holds some 60,000 files: listing them
took 4-8 s of every submission on the 2-core test machine, before the run started.

:func:`app_files` lists the same files while skipping folders that ``.gitignore``
excludes as a whole (git never looks inside those either), and :func:`stage_app` copies
just the bundle's files into a folder that ``flwr run`` then bundles in moments. The
bundle, and so its SHA-256 (``fedspatial app-hash``, a hospital's allow-list), is byte
for byte the one ``flwr run APP_DIR`` builds: Flower's own rules still choose the files
(``tests/test_app_bundle.py``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def app_files(app: Path) -> dict[str, Path]:
    """The files Flower's ``collect_files`` lists under ``app`` (relative POSIX path ->
    path; no symbolic links, nothing outside ``app``), less those inside a folder that
    the app's ``.gitignore`` excludes."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    root = app.expanduser().resolve()
    ignore = build_pathspec(load_gitignore_patterns(root / ".gitignore"))
    files: dict[str, Path] = {}
    for folder, dirs, names in os.walk(root, followlinks=False):
        here = Path(folder)
        rel = here.relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not ignore.match_file(prefix + d + "/")]
        for name in names:
            path = here / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            files[prefix + name] = path
    return files


def bundle_files(app: Path) -> dict[str, Path]:
    """The files of the app's bundle, chosen by Flower's own rules (``.gitignore``,
    Flower's include and exclude patterns)."""
    from flwr.cli.utils import filter_paths_for_publish

    chosen = filter_paths_for_publish(app_files(app))
    return {rel: path for rel, path in chosen.items() if isinstance(path, Path)}


def build_bundle(app: Path) -> bytes:
    """The bundle ``flwr run app`` builds (Flower's ``build_fab_from_disk``), in moments."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(app))[0]


def stage_app(app: Path, dest: Path) -> Path:
    """Copy the bundle's files of ``app`` into the empty folder ``dest`` (which ``flwr
    run`` then bundles as it would bundle ``app``); returns ``dest``."""
    for rel, path in bundle_files(app).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest
