"""Scale benchmark (issue 17): what one section of many cells costs end to end.

For each size N (``--cells``), one synthetic site holding one section of N cells
(:mod:`fedspatial.shared.data.synthetic`, one site, one section, every domain present)
runs ``fedspatial simulate``'s code path (:func:`fedspatial.simulation.simulate`, Flower's
simulation runtime) in the ``federated`` mode with the demo config and
``--rounds`` rounds, integration report included. Each size runs in its own Python
process, so its peak memory is its own. Measured in that one run:

- ``wall_s``: :func:`simulate` from start to end (training, clustering, the sites'
  outputs and the integration report; the data generation is not counted);
- ``report_s``: the integration report alone (``integration.json``'s ``seconds``, timed
  inside ``simulate``), and ``report_share = report_s / wall_s`` (target <= 0.1);
- ``peak_rss_mib``: the largest peak RSS of one process (``driver_peak_rss_mib``, the
  driver, which also builds the report, or ``site_peak_rss_mib``, the ClientApp process
  serving the site; the data are generated beforehand in another process); ``peak_tree_rss_mib``: the
  largest sum of the RSS of the driver and every process it started (Ray's included),
  sampled every 0.5 s;
- ``cells_per_s = N / wall_s``.

Writes ``benchmarks/results/scale.json`` (``cells`` -> ``"<N>"`` -> the figures above)
and ``scale.md``::

    python benchmarks/scale.py [--cells 50000 200000 500000] [--rounds 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from provenance import provenance  # benchmarks/provenance.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("scale")


class TreeRss:
    """Peak of the summed RSS of this process and all its descendants, sampled."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def generate(n_cells: int, work: Path, seed: int) -> tuple[Path, float]:
    """One site, one section of ``n_cells`` cells, every domain present: its manifest and
    the seconds it took (in the parent process, so no run's memory counts it)."""
    from fedspatial.shared.data.synthetic import SyntheticSpec, write_synthetic_federation

    spec = dataclasses.replace(
        SyntheticSpec(seed=seed), n_sites=1, sections_per_site=(1,),
        spots_per_section=(n_cells, n_cells), absent_domain=False,
    )
    t0 = time.perf_counter()
    manifest = write_synthetic_federation(work / f"data-{n_cells}", spec, overwrite=True)
    return manifest, time.perf_counter() - t0


def one_size(n_cells: int, manifest: Path, rounds: int, work: Path, seed: int) -> dict[str, Any]:
    """One simulated run on the section of ``n_cells`` cells (call in a fresh process)."""
    from fedspatial.shared.config import load_config
    from fedspatial.simulation import simulate

    name = f"cells-{n_cells}"
    shutil.rmtree(work / name, ignore_errors=True)
    cfg = load_config(ROOT / "configs" / "demo.yaml", {
        "run-name": name, "results-dir": str(work), "seed": seed, "data.manifest": str(manifest),
        "simulation.modes": ["federated"], "training.num-rounds": rounds,
    })
    with TreeRss() as tree:
        t0 = time.perf_counter()
        result = simulate(cfg)["federated"]
        wall = time.perf_counter() - t0
    mode = work / name / "federated"
    report = json.loads((mode / "metrics.json").read_text())
    integration = json.loads((mode / "integration.json").read_text())
    site_rss = max(float(s.get("peak_rss_mb", 0.0)) for s in report["sections"].values())
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    report_s = float(integration["seconds"])
    return {
        "wall_s": round(wall, 2),
        "train_cluster_s": round(float(result["wall_s"]), 2),
        "report_s": round(report_s, 2),
        "report_share": round(report_s / wall, 4),
        "report_parts_s": {k: round(v, 2) for k, v in integration.get("seconds_by_part", {}).items()},
        "peak_rss_mib": round(max(site_rss, driver_rss), 1),
        "site_peak_rss_mib": round(site_rss, 1),
        "driver_peak_rss_mib": round(driver_rss, 1),
        "peak_tree_rss_mib": round(tree.peak / 2**20, 1),
        "cells_per_s": round(n_cells / wall, 1),
        "joint_ari": round(float(result["joint_ari"]), 4),
        "sampling": integration.get("sampling", {}),
    }


def markdown(figures: dict[str, Any], command: str) -> str:
    lines = [
        "# Scale: one section of N cells, end to end",
        "",
        f"`{command}` at {figures['commit'][:12]} on {figures['machine']['cpus']} CPUs. One synthetic site "
        f"with one section, `fedspatial simulate` (federated mode, demo config, {figures['config']['rounds']} rounds), "
        "integration report included. Peak RSS: the largest process (driver or site); tree: the driver and "
        "every process it started, summed.",
        "",
        "| cells | wall s | train + cluster s | report s | report share | peak RSS MiB | tree RSS MiB | cells/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, f in figures["cells"].items():
        lines.append(
            f"| {int(n):,} | {f['wall_s']:.1f} | {f['train_cluster_s']:.1f} | {f['report_s']:.1f} | "
            f"{f['report_share']:.3f} | {f['peak_rss_mib']:.0f} | {f['peak_tree_rss_mib']:.0f} | {f['cells_per_s']:.0f} |"
        )
    sizes = sorted(figures["cells"], key=int)
    if len(sizes) > 1:
        lines += ["", "Growth between consecutive sizes (exponent b in cost ~ N^b):", "",
                  "| from | to | wall | report | peak RSS |", "| --- | --- | --- | --- | --- |"]
        for a, b in itertools.pairwise(sizes):
            fa, fb, r = figures["cells"][a], figures["cells"][b], math.log(int(b) / int(a))
            exp = [math.log(max(fb[k], 1e-9) / max(fa[k], 1e-9)) / r for k in ("wall_s", "report_s", "peak_rss_mib")]
            lines.append(f"| {int(a):,} | {int(b):,} | " + " | ".join(f"{e:.2f}" for e in exp) + " |")
    lines += ["", "Report parts (s): " + "; ".join(
        f"{int(n):,}: " + ", ".join(f"{k} {v:.1f}" for k, v in f["report_parts_s"].items())
        for n, f in figures["cells"].items()), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000, 500_000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(HERE / ".work" / "scale"))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--one-size", type=int, default=0, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("flwr").propagate = False
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.one_size:
        child = one_size(args.one_size, Path(args.manifest), args.rounds, work, args.seed)
        Path(args.child_out).write_text(json.dumps(child))
        return 0

    from fedspatial.shared.storage.atomic import write_json_atomic, write_text_atomic

    cells: dict[str, Any] = {}
    for n in args.cells:
        child_out = work / f"cells-{n}.json"
        manifest, generate_s = generate(n, work, args.seed)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one-size", str(n), "--rounds", str(args.rounds),
               "--seed", str(args.seed), "--work", str(work), "--child-out", str(child_out),
               "--manifest", str(manifest)]
        log.info("%d cells: %s", n, " ".join(cmd[1:]))
        subprocess.run(cmd, check=True)
        cells[str(n)] = {**json.loads(child_out.read_text()), "generate_s": round(generate_s, 2)}
        log.info("%d cells: %s", n, cells[str(n)])
    command = " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])
    figures: dict[str, Any] = {"cells": cells}
    figures.update(provenance({"command": command, "cells": args.cells, "rounds": args.rounds, "seed": args.seed}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "scale.json", figures)
    write_text_atomic(out / "scale.md", markdown(figures, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
