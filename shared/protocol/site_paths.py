"""No path of a hospital leaves it: the last check on every reply a site sends.

A site's answers may name the files it wrote (finalize reports each annotated section and
plot). Absolute paths would tell the center, and anyone reading the run's log or its
``metrics.json``, how the hospital's disks are laid out. :func:`strip_site_paths`
rewrites every string that lies under one of the site's folders (its output folder, its
data paths) to the part below that folder, whichever phase produced it, including
inside JSON text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedspatial.shared.protocol.payload import ConfigValue, Payload


def _prefixes(roots: Iterable[str | Path]) -> list[str]:
    """Each root as written and resolved, longest first, with a trailing separator."""
    out: set[str] = set()
    for root in roots:
        text = str(root)
        if not text:
            continue
        for form in (text, os.path.abspath(text), str(Path(text).expanduser().resolve())):
            out.add(form.rstrip(os.sep) + os.sep)
    return sorted(out, key=len, reverse=True)


def _strip(text: str, prefixes: list[str]) -> str:
    for prefix in prefixes:
        if text.startswith(prefix):
            return text[len(prefix):]
        if text == prefix.rstrip(os.sep):
            return "."
    return text


def _walk(value: Any, prefixes: list[str]) -> Any:
    if isinstance(value, str):
        return _strip(value, prefixes)
    if isinstance(value, list):
        return [_walk(v, prefixes) for v in value]
    if isinstance(value, dict):
        return {_strip(str(k), prefixes): _walk(v, prefixes) for k, v in value.items()}
    return value


def _config_value(value: ConfigValue, prefixes: list[str]) -> ConfigValue:
    if isinstance(value, str):
        if value[:1] in "{[":  # JSON text (e.g. finalize's report): rewrite what it holds
            try:
                decoded = json.loads(value)
            except ValueError:
                return _strip(value, prefixes)
            cleaned = _walk(decoded, prefixes)
            return value if cleaned == decoded else json.dumps(cleaned)  # untouched unless a path went
        return _strip(value, prefixes)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_strip(str(v), prefixes) for v in value]
    return value


def strip_site_paths(payload: Payload, roots: Iterable[str | Path]) -> Payload:
    """``payload`` with every path under one of ``roots`` made relative to that root.

    Parameters
    ----------
    payload : Payload
        A reply about to leave the site.
    roots : iterable of str or Path
        The site's folders: its output folder first, then its data paths.
    """
    prefixes = _prefixes(roots)
    config = {key: _config_value(value, prefixes) for key, value in payload.config.items()}
    return Payload(payload.arrays, config, payload.metrics)
