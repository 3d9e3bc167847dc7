"""Imported once by the center's warm ServerApp executor (``fedspatial server``; see
:mod:`fedspatial.clientapp_executor`): each run's ServerApp process is forked from there.

It imports what a ServerApp process needs (torch, anndata, scikit-learn, matplotlib,
Flower's ``flwr-serverapp`` runtime). A forked process then forgets fedspatial's own
modules, so that Flower imports the ServerApp afresh from the run's app bundle, as its
own ``flwr-serverapp`` does. The outcome is left in :data:`STATUS_ENV`.
"""

from __future__ import annotations

from fedspatial.preload import preload

STATUS_ENV = "FEDSPATIAL_SERVERAPP_PRELOAD"


def _imports() -> None:
    import flwr.superlink.cli.flwr_serverapp  # noqa: F401  # the process's own entry point

    import fedspatial.server.app  # noqa: F401  # the ServerApp and everything it imports
    from fedspatial.shared.plots import _pyplot

    _pyplot()  # matplotlib (the run's plots)


preload(STATUS_ENV, _imports)
