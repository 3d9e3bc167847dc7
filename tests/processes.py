"""This test process's descendants, from ``ps`` (so tests can check what a run left behind
without touching processes that other jobs on the shared machine started)."""

from __future__ import annotations

import os
import subprocess


def descendants(*, markers: tuple[str, ...]) -> set[int]:
    """Pids of this process's descendants whose command line contains one of ``markers``."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:] if len(line.split(None, 2)) == 3]
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    ours, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in ours:
                ours.add(child)
                todo.append(child)
    return {int(pid) for pid, _, args in rows if int(pid) in ours and any(m in args for m in markers)}
