"""Flower 1.42's fixed waits, shortened where fedspatial runs Flower's processes.

A federated run is a chain of short steps, each waiting for every site's reply to the last
one, and Flower 1.42 adds fixed waits to every step that no option changes:

- a SuperNode that asked for a message and got none sleeps 3 s before asking again;
  once its ClientApp has a reply it checks every 0.5 s (:class:`Pacing`);
- a message's metadata reaches the other side before its contents (Flower pushes the
  parts after it), and whoever pulls a part that has not arrived yet waits 1 s, then 2 s,
  ... (``pull_objects``' default back-off; :func:`quick_object_pulls`).

On the demo these waits were most of a deployed run's wall time (benchmarks/results/deploy.md).
Each change below is a parameter of Flower's own code, set in the one module that uses it,
only for the pinned Flower version (:data:`PACED_FLOWER`): any other version keeps Flower's
pace, with a warning. Requests a hospital or the center makes while idle are as frequent as
with Flower's own waits.
"""

from __future__ import annotations

import functools
import time
from types import ModuleType
from typing import Any

PACED_FLOWER = "1.42.0"
"""The Flower version whose pauses :class:`Pacing` knows (``start_client_internal``)."""
FLOWER_IDLE_PAUSE = 3.0
"""Flower's pause after asking for a message and getting none."""
FLOWER_REPLY_PAUSE = 0.5
"""Flower's pause while it waits for a reply (or an object of one) from its ClientApp."""
FIRST_PAUSE = 0.05
"""Default first pause after a reply; each following idle pause is :data:`GROWTH` times longer."""
GROWTH = 1.6
REPLY_PAUSE = 0.02
FIRST_RETRY = 0.02
"""Seconds before pulling again a part of a message that has not arrived yet (Flower: 1 s)."""
RETRY_CAP = 1.0


class Pacing:
    """Stands in for the ``time`` module of Flower's SuperNode loop.

    ``sleep(3)`` (nothing to do) becomes ``first``, then ``first * growth``, ... up to
    Flower's 3 s; a ``sleep(0.5)`` (a message is being answered) becomes ``reply`` and
    starts the sequence again from ``first``. Every other attribute is :mod:`time`'s own.
    """

    def __init__(self, *, first: float = FIRST_PAUSE, growth: float = GROWTH, reply: float = REPLY_PAUSE,
                 sleep: Any = time.sleep) -> None:
        if not 0 < first <= FLOWER_IDLE_PAUSE:
            raise ValueError(f"the first pause must be in (0, {FLOWER_IDLE_PAUSE:g}] s, not {first:g}")
        if growth < 1:
            raise ValueError(f"growth must be at least 1, not {growth:g}")
        self.first, self.growth, self.reply = first, growth, min(reply, FLOWER_REPLY_PAUSE)
        self._next = FLOWER_IDLE_PAUSE  # until the first message: Flower's own pace
        self._sleep = sleep

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_PAUSE:
            pause = self._next
            self._next = min(FLOWER_IDLE_PAUSE, self._next * self.growth)
        else:  # a message is in hand: the next one may follow soon after its reply
            pause = min(seconds, self.reply)
            self._next = self.first
        self._sleep(pause)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def pace(module: ModuleType, pacing: Pacing, *, version: str) -> bool:
    """Give ``module`` (Flower's ``start_client_internal``) ``pacing`` as its ``time``;
    False (nothing changed) for a Flower version other than :data:`PACED_FLOWER`, or a
    module that is not as expected."""
    if version != PACED_FLOWER or getattr(module, "time", None) is not time:
        return False
    module.time = pacing  # type: ignore[attr-defined]
    return True


def quick_object_pulls(module: ModuleType, *, version: str) -> bool:
    """Make ``module``'s ``pull_objects`` (Flower's, as imported by the SuperNode loop or
    the ServerApp's grid) retry a part that has not arrived after :data:`FIRST_RETRY`
    seconds, doubling up to :data:`RETRY_CAP`, instead of after 1 s up to 10 s. False
    (nothing changed) for another Flower version or an unexpected module."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    if version != PACED_FLOWER or getattr(module, "pull_objects", None) is not pull_objects:
        return False
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        pull_objects, initial_backoff=FIRST_RETRY, backoff_cap=RETRY_CAP)
    return True
