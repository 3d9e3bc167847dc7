"""What the warm executors' fork servers share (:mod:`fedspatial.clientapp_preload`,
:mod:`fedspatial.serverapp_preload`): import once, record the outcome, and make every
forked process forget fedspatial's own modules, so that Flower imports the app afresh
from the run's bundle, as its own ``flwr-clientapp`` / ``flwr-serverapp`` do.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


def forget_fedspatial() -> None:
    """Drop fedspatial's modules from ``sys.modules`` (third-party imports stay warm)."""
    for name in [m for m in sys.modules if m == "fedspatial" or m.startswith("fedspatial.")]:
        del sys.modules[name]


def preload(status_env: str, load: Callable[[], None]) -> None:
    """Run ``load`` (the imports); leave ``ok`` or the error in ``status_env`` for the
    executor's probe (a fork server would swallow the error); forget fedspatial at every fork."""
    try:
        load()
    except Exception:
        os.environ[status_env] = "failed: " + traceback.format_exc()
    else:
        os.environ[status_env] = "ok"
    os.register_at_fork(after_in_child=forget_fedspatial)
