"""Imported once by the warm ClientApp executor's fork server (see
:mod:`fedspatial.clientapp_executor`); every task process is forked from there.

It imports what a ClientApp process needs (torch, torch-geometric, anndata, scikit-learn,
matplotlib, flwr's ClientApp runtime). A forked task process then forgets fedspatial's
own modules, so that it imports the ClientApp afresh from the run's Flower App bundle,
as ``flwr-clientapp`` does: re-importing fedspatial's own modules takes a fifth of a
second, their third-party imports are what takes seconds. The outcome is left in the
environment variable :data:`STATUS_ENV`, which the forked processes inherit.

With an app allow-list (environment variable ``FEDSPATIAL_ALLOWED_APPS``, set by the
executor), Flower's ``install_from_fab`` is wrapped in every task process so that it
recomputes the bundle's hash and refuses an unlisted one before unpacking it: a second
check behind the executor's, which refuses such a task before forking.
"""

from __future__ import annotations

import os

from fedspatial.logstream import log_to_stderr
from fedspatial.preload import preload

STATUS_ENV = "FEDSPATIAL_CLIENTAPP_PRELOAD"


def _pin_apps() -> None:
    from fedspatial.deployment.app_pinning import ALLOW_ENV, guard_install

    if allowed := os.environ.get(ALLOW_ENV):
        from flwr.supernode.runtime import run_clientapp

        run_clientapp.install_from_fab = guard_install(  # type: ignore[attr-defined]
            run_clientapp.install_from_fab, frozenset(allowed.split(",")))  # type: ignore[attr-defined]


def _imports() -> None:
    import flwr.cli.install  # what a task process runs around the ClientApp
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    import fedspatial.client.app  # the ClientApp and everything it imports
    import fedspatial.shared.models._pyg  # noqa: F401  # torch-geometric (query.embed)
    from fedspatial.shared.plots import _pyplot

    _pyplot()  # matplotlib (query.finalize)
    _pin_apps()


preload(STATUS_ENV, _imports)
# fedspatial's INFO lines in the hospital's log, once each: the logger tree outlives the modules.
log_to_stderr()
