"""A hospital's SuperNode: Flower's ``flower-supernode`` with its fixed waits shortened
(:mod:`fedspatial.pacing`): it asks for the next message moments after a
reply instead of up to 3 s later, and pulls a message's parts without 1 s pauses.

Flower's own SuperNode (its argument parsing, connection, state and Runtime API,
unchanged) runs in this process. Run by ``fedspatial client``
(:func:`fedspatial.deployment.nodes.supernode_command`) as
``python -m fedspatial.deployment.supernode [--first-pause S] -- FLOWER_ARGS``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fedspatial.logstream import log_to_stderr
from fedspatial.pacing import (
    FIRST_PAUSE,
    FLOWER_IDLE_PAUSE,
    GROWTH,
    PACED_FLOWER,
    Pacing,
    pace,
    quick_object_pulls,
)

logger = logging.getLogger("fedspatial.deployment.supernode")  # not __main__ when run with -m


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m fedspatial.deployment.supernode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first-pause", type=float, default=FIRST_PAUSE,
                        help=f"seconds between asking for messages right after a reply (default {FIRST_PAUSE:g}); "
                        f"growing {GROWTH:g}x per idle request up to Flower's {FLOWER_IDLE_PAUSE:g} s")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's arguments")
    args = parser.parse_args(argv)
    rest = list(args.flower_args)
    return args, rest[1:] if rest[:1] == ["--"] else rest


def main(argv: Sequence[str] | None = None) -> int:
    args, flower_args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.argv = ["flower-supernode", *flower_args]
    # With --isolation subprocess Flower starts `flower-superexec` by name: this environment's first.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

    import flwr
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if pace(loop, Pacing(first=args.first_pause), version=flwr.__version__) and quick_object_pulls(
            loop, version=flwr.__version__):
        logger.info("asking the SuperLink for the next message %.2g s after a reply, up to every %g s when idle",
                    args.first_pause, FLOWER_IDLE_PAUSE)
    else:
        logger.warning("Flower %s (not %s): its SuperNode keeps its own pace (a message every %g s at most "
                       "while idle)", flwr.__version__, PACED_FLOWER, FLOWER_IDLE_PAUSE)
    flower_supernode()
    return 0


if __name__ == "__main__":
    log_to_stderr()  # our lines only: no root handler, Flower prints its own
    sys.exit(main())
