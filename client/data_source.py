"""Which data a SuperNode trains on, and where its private outputs go.

Deployment: the hospital's SuperNode is started with
``--node-config "data-path='/data/site' site-name='hospital_a' output-path='/data/out'"``.
A site may add ``privacy-budget=2.0`` (epsilon) to hold itself to a stricter budget than
the run's, and ``policy-path='/etc/fedspatial/policy.toml'`` (``fedspatial client --policy``)
for its site policy (:mod:`fedspatial.shared.privacy.policy`). Simulation: virtual SuperNodes only have ``partition-id``; they look themselves up in a
federation manifest (written by ``fedspatial simulate`` / ``fedspatial make-demo-data``)
named by the run config key ``manifest`` or the ``FEDSPATIAL_MANIFEST`` variable; a
site's ``policy`` entry there (a TOML file, relative to the manifest, or an inline table)
is its site policy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspatial.shared.data.manifest import read_manifest
from fedspatial.shared.data.sections import SiteSource
from fedspatial.shared.privacy.policy import (
    POLICY_NODE_CONFIG_KEY,
    SitePolicy,
    load_policy,
    policy_from_entry,
)


class NodeConfigError(ValueError):
    """The SuperNode was started without what it needs to find its data."""



@dataclass(frozen=True)
class NodeData:
    name: str
    sources: tuple[SiteSource, ...]
    output_dir: Path
    privacy_budget: float | None = None
    """The site's own epsilon budget (node config or manifest `privacy-budget`); the
    stricter of it and the run's budget applies."""
    policy: SitePolicy | None = None
    """The site policy (node config ``policy-path``, or the manifest sites' ``policy``
    entries); ``None``: the server's run config decides."""


def _budget(raw: Any) -> float | None:
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise NodeConfigError(f"privacy-budget must be a positive number (epsilon), got {raw!r}") from None
    if not value > 0:
        raise NodeConfigError(f"privacy-budget must be a positive number (epsilon), got {raw!r}")
    return value


def resolve_node_data(
    node_config: dict[str, Any], run_config: dict[str, Any], run_name: str
) -> NodeData:
    if "data-path" in node_config:
        data_path = Path(str(node_config["data-path"])).expanduser()
        name = str(node_config.get("site-name") or data_path.stem)
        default_out = data_path.resolve().parent / "fedspatial-results" / run_name / name
        output = Path(str(node_config.get("output-path") or default_out)).expanduser()
        policy_path = str(node_config.get(POLICY_NODE_CONFIG_KEY) or "")
        policy = load_policy(policy_path) if policy_path else None
        return NodeData(name, (SiteSource(name, str(data_path)),), output, _budget(node_config.get("privacy-budget")), policy)
    if "partition-id" not in node_config:
        raise NodeConfigError(
            "this SuperNode has no data: start it with "
            "--node-config \"data-path='/path/to/site.h5ad or folder'\""
        )
    manifest_path = str(run_config.get("manifest") or os.environ.get("FEDSPATIAL_MANIFEST", ""))
    if not manifest_path:
        raise NodeConfigError(
            "simulated SuperNode without a federation manifest: pass "
            "--run-config \"manifest='/abs/path/federation.json'\" (written by "
            "`fedspatial make-demo-data`) or set FEDSPATIAL_MANIFEST"
        )
    manifest = read_manifest(manifest_path)
    nodes = manifest["nodes"]
    pid = int(node_config["partition-id"])
    if pid >= len(nodes):
        raise NodeConfigError(
            f"{manifest_path} lists {len(nodes)} sites but the simulation started SuperNode "
            f"{pid}: set num-supernodes to {len(nodes)}"
        )
    node = nodes[pid]
    sources = tuple(SiteSource(s["name"], s["data-path"]) for s in node["sites"])
    results = Path(str(run_config.get("results-dir", "results"))) / run_name
    output = Path(node.get("output-path") or results / "sites" / node["name"])
    # A manifest may set privacy-budget per node or per site; the strictest applies.
    budgets = [_budget(x) for x in (node_config.get("privacy-budget"), node.get("privacy-budget"), *(s.get("privacy-budget") for s in node["sites"]))]
    budget = min((b for b in budgets if b is not None), default=None)
    # Simulation: each site's manifest entry may carry its policy; a node serving several obeys all.
    base = Path(manifest_path).parent
    policies = [policy_from_entry(s["policy"], base) for s in node["sites"] if s.get("policy") is not None]
    if node_config.get(POLICY_NODE_CONFIG_KEY):
        policies.append(load_policy(str(node_config[POLICY_NODE_CONFIG_KEY])))
    return NodeData(node["name"], sources, output, budget, SitePolicy.strictest(policies))
