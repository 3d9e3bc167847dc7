"""fedspatial's log lines in a process that Flower starts (a ServerApp, a ClientApp's fork server).

Nothing configures logging for fedspatial there, so its INFO records would be dropped;
Flower streams (ServerApp) or shows (SuperNode) what such a process writes to stderr.
"""

from __future__ import annotations

import logging
import sys

PACKAGE = "fedspatial"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def log_to_stderr(*, defer_to_root: bool = False) -> None:
    """Show fedspatial's INFO lines on stderr, once each.

    A handler on the ``fedspatial`` logger that is there already is kept. A root handler
    that some library installed on import (opacus calls ``logging.basicConfig``) would
    repeat every Flower and fedspatial line: neither propagates to it.

    Parameters
    ----------
    defer_to_root : bool
        Change nothing when logging is set up for fedspatial's INFO lines already (a root
        handler and INFO level: ``fedspatial simulate``), or when the package has a
        handler; then Flower's logger is left alone too.
    """
    package = logging.getLogger(PACKAGE)
    root = logging.getLogger()
    if defer_to_root and (package.handlers or (root.handlers and package.getEffectiveLevel() <= logging.INFO)):
        return
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines
