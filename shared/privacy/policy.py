"""A site's own limits: the site policy, which only the hospital's operator controls.

The run config comes from the server; a hospital trusts nobody outside it. A site policy
(a TOML file the hospital's operator writes, given to ``fedspatial client --policy FILE``
or to ``flower-supernode --node-config "policy-path='/etc/fedspatial/policy.toml'"``;
in a simulation, a ``policy`` entry of a site in the federation manifest) states what the
site accepts, whatever the server asks. Every message is checked against it before a
phase computes anything (:func:`refusal`); a label x domain table with a small cell is
withheld from the reply (:func:`withhold_small_tables`).

No Flower imports: the ClientApp (``client/app.py``) enforces it.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedspatial.shared.config import ConfigError, ExperimentConfig
from fedspatial.shared.protocol.payload import Payload

POLICY_NODE_CONFIG_KEY = "policy-path"
"""Node config key naming the site policy file (``fedspatial client --policy`` sets it)."""
SITE_POLICY_ERROR = 4003
"""Error code of a reply a site refused because the request breaks its site policy."""
NO_POLICY_WARNING = (
    "no site policy: the server's run config decides local DP, epsilon, delta, the label column, "
    "the number of rounds and which un-noised statistics this site releases; give one with "
    "`fedspatial client --policy FILE` (deploy/README.md, 'Site policy')"
)
METADATA_QUERIES = frozenset({"describe", "setup"})
"""Queries whose replies hold only names, section sizes and cell counts (never a
statistic of the cells' values): not "un-noised releases" for ``allow-unnoised-releases``."""
WITHHELD = "withheld: a cell below the site's min-cell-count"


class SitePolicyError(ConfigError):
    """A site policy file is missing, not TOML, or has an unknown key or a wrong value."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts (kebab-case keys in the file; a key left out sets no limit)."""

    require_local_dp: bool = False
    max_epsilon: float | None = None
    max_delta: float | None = None
    allowed_label_keys: tuple[str, ...] | None = None
    """``None``: any label column; ``()``: none (the run must set ``label-key = ""``)."""
    min_cell_count: int = 0
    max_rounds: int | None = None
    allow_unnoised_releases: bool = True
    source: str = ""
    """Where the policy came from (a file, a manifest entry): for log lines and errors."""

    def summary(self) -> str:
        """One line: every field and its value (``-`` for no limit)."""
        def show(value: Any) -> str:
            if value is None:
                return "-"
            if isinstance(value, bool):
                return str(value).lower()
            return str(list(value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else str(value)

        return ", ".join(f"{_kebab(f.name)}={show(getattr(self, f.name))}" for f in fields(self) if f.name != "source")

    @staticmethod
    def strictest(policies: Iterable[SitePolicy]) -> SitePolicy | None:
        """One policy that breaks none of ``policies`` (a simulated node serving several
        sites, e.g. the centralized mode, obeys every one of them); ``None`` if none."""
        out: SitePolicy | None = None
        for p in policies:
            if out is None:
                out = p
                continue
            labels = out.allowed_label_keys if p.allowed_label_keys is None else p.allowed_label_keys if out.allowed_label_keys is None else tuple(
                k for k in out.allowed_label_keys if k in p.allowed_label_keys)
            out = SitePolicy(
                require_local_dp=out.require_local_dp or p.require_local_dp,
                max_epsilon=_min(out.max_epsilon, p.max_epsilon),
                max_delta=_min(out.max_delta, p.max_delta),
                allowed_label_keys=labels,
                min_cell_count=max(out.min_cell_count, p.min_cell_count),
                max_rounds=_min(out.max_rounds, p.max_rounds),
                allow_unnoised_releases=out.allow_unnoised_releases and p.allow_unnoised_releases,
                source=f"{out.source} + {p.source}",
            )
        return out


def _min(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else min(a, b)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


_KEYS = {_kebab(f.name): f.name for f in fields(SitePolicy) if f.name != "source"}


def parse_policy(raw: Mapping[str, Any], source: str) -> SitePolicy:
    """Validate a policy mapping strictly: unknown keys and wrong types are errors."""
    if not isinstance(raw, Mapping):
        raise SitePolicyError(f"site policy {source}: expected a table of keys, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), list(_KEYS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise SitePolicyError(f"site policy {source}: unknown key '{key}'.{hint} Allowed keys: {', '.join(_KEYS)}")
        values[_KEYS[key]] = _check(key, value, source)
    return SitePolicy(**values, source=source)


def _check(key: str, value: Any, source: str) -> Any:
    where = f"site policy {source}: {key}"
    if key in ("require-local-dp", "allow-unnoised-releases"):
        if not isinstance(value, bool):
            raise SitePolicyError(f"{where}: expected true or false, got {value!r}")
        return value
    if key in ("min-cell-count", "max-rounds"):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "min-cell-count" else 1):
            raise SitePolicyError(f"{where}: expected an integer >= {0 if key == 'min-cell-count' else 1}, got {value!r}")
        return value
    if key == "allowed-label-keys":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise SitePolicyError(f"{where}: expected a list of column names (e.g. [\"domain\"]; [] = no labels), got {value!r}")
        return tuple(value)
    # max-epsilon, max-delta
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise SitePolicyError(f"{where}: expected a number > 0, got {value!r}")
    if key == "max-delta" and value >= 1:
        raise SitePolicyError(f"{where}: must be below 1 (typically below 1 / number of cells), got {value!r}")
    return float(value)


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a site policy file (TOML)."""
    path = Path(path).expanduser()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SitePolicyError(f"site policy {path} does not exist") from None
    except OSError as err:
        raise SitePolicyError(f"site policy {path} cannot be read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise SitePolicyError(f"site policy {path} is not valid TOML: {err}") from None
    return parse_policy(raw, str(path))


def policy_from_entry(entry: Any, base: Path | None = None) -> SitePolicy:
    """A manifest's ``policy`` entry: a file path (relative to ``base``) or an inline table."""
    if isinstance(entry, str):
        path = Path(entry).expanduser()
        return load_policy(path if path.is_absolute() or base is None else base / path)
    return parse_policy(entry, "(manifest entry)")


def unnoised(query: str, cfg: ExperimentConfig) -> bool:
    """Whether the reply to ``query`` releases a statistic of the cells without noise
    (a query a new phase adds counts as un-noised until it says otherwise here)."""
    if query in METADATA_QUERIES:
        return False
    if query in ("train", "embed", "dp_cluster_stats", "finalize"):
        # under local DP: DP-SGD, no release (embed), DP k-means, the DP label x domain tables
        return not cfg.privacy.local_dp
    if query == "feature_stats":
        return not cfg.privacy.local_dp and cfg.privacy.feature_stats_noise <= 0
    return True


def refusal(policy: SitePolicy, query: str, cfg: ExperimentConfig, request: Payload) -> str | None:
    """Why the site refuses ``query`` with the run's settings ``cfg``, or ``None``.
    The reason names the policy field and the value the server asked for."""
    p = cfg.privacy
    if not p.local_dp:
        for name, value in (("require-local-dp", policy.require_local_dp), ("max-epsilon", policy.max_epsilon), ("max-delta", policy.max_delta)):
            if value not in (None, False):
                shown = "true" if value is True else f"{value:g}"
                return f"{name}={shown}: the server asked for privacy.local-dp=false (no (epsilon, delta) bound)"
    if policy.max_epsilon is not None:
        for key, value in (("target-epsilon", p.target_epsilon), ("budget-epsilon", p.budget_epsilon)):
            if value > policy.max_epsilon:
                return f"max-epsilon={policy.max_epsilon:g}: the server asked for privacy.{key}={value:g}"
    if policy.max_delta is not None and p.delta > policy.max_delta:
        return f"max-delta={policy.max_delta:g}: the server asked for privacy.delta={p.delta:g}"
    label = cfg.data.label_key
    if policy.allowed_label_keys is not None and label and label not in policy.allowed_label_keys:
        return (f"allowed-label-keys={list(policy.allowed_label_keys)}: the server asked for data.label-key={label!r}"
                " (a run without labels sets label-key = \"\")")
    if policy.max_rounds is not None:
        if cfg.training.num_rounds > policy.max_rounds:
            return f"max-rounds={policy.max_rounds}: the server asked for training.num-rounds={cfg.training.num_rounds}"
        server_round = int(request.number("server-round", 0)) if "server-round" in request.config else 0
        if server_round > policy.max_rounds:
            return f"max-rounds={policy.max_rounds}: the server asked for round {server_round}"
    if not policy.allow_unnoised_releases and unnoised(query, cfg):
        return (f"allow-unnoised-releases=false: the server asked for {query}, whose reply is not noised "
                f"(privacy.local-dp={str(p.local_dp).lower()}, feature-stats-noise={p.feature_stats_noise:g})")
    return None


def _small(counts: Any, minimum: int) -> bool:
    """Whether a nested list of counts has a cell with 0 < count < minimum."""
    if isinstance(counts, list):
        return any(_small(c, minimum) for c in counts)
    return isinstance(counts, int | float) and 0 < counts < minimum


def _withhold(tables: dict[str, Any], minimum: int) -> list[str]:
    """Remove every table (``{"counts": ...}`` per site name) that has a small cell."""
    gone = [name for name, t in tables.items() if isinstance(t, dict) and _small(t.get("counts"), minimum)]
    for name in gone:
        del tables[name]
    return gone


def withhold_small_tables(policy: SitePolicy, reply: Payload) -> tuple[Payload, list[str]]:
    """``reply`` without its label x domain tables (finalize's ``contingency`` and
    ``calibration``, the calibration phase's tables) that have a non-zero cell below
    ``min-cell-count``. Each such table is left out whole, not cell by cell (a suppressed
    cell can be recomputed from the margins the site also releases); the server takes it as
    a site without labels, and finalize's report says ``withheld-tables``. Zero cells are
    not small cells. Returns the reply and what was withheld."""
    minimum = policy.min_cell_count
    if minimum <= 1:
        return reply, []
    config = dict(reply.config)
    withheld: list[str] = []
    if isinstance(config.get("report"), str):
        report = json.loads(str(config["report"]))
        for part in ("contingency", "calibration"):
            withheld += [f"{part} {name}" for name in _withhold(report.get(part) or {}, minimum)]
        if withheld:
            report["withheld-tables"] = {"tables": withheld, "reason": WITHHELD, "min-cell-count": minimum}
        config["report"] = json.dumps(report)
    if isinstance(config.get("calibration"), str):
        tables = json.loads(str(config["calibration"]))
        withheld += [f"calibration {name}" for name in _withhold(tables, minimum)]
        config["calibration"] = json.dumps(tables)
    return (replace(reply, config=config) if withheld else reply), withheld
