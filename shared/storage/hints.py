"""Hints for a path that does not exist: the close names next to it (a typo is the usual cause)."""

from __future__ import annotations

import difflib
from pathlib import Path


def did_you_mean(path: str | Path, *, limit: int = 3) -> str:
    """``"; did you mean X?"`` naming the entries of ``path``'s folder whose names are close
    to its name (``""`` when none is, or the folder itself is missing).

    >>> did_you_mean("/nonexistent/folder/x.yaml")
    ''
    """
    p = Path(path).expanduser()
    folder = p.parent if str(p.parent) else Path(".")
    try:
        names = sorted(entry.name for entry in folder.iterdir())
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=limit, cutoff=0.6)
    if not close:
        return ""
    shown = " or ".join(str(p.with_name(name)) for name in close)
    return f"; did you mean {shown}?"
