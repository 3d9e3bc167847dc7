"""Cost of DP-SGD per step: each engine timed in its own process (issue 13).

``dp_overhead`` = seconds per DP-SGD step / seconds per non-private step, same model
(the per-cell autoencoder, the default under local DP), batch size, data and thread
count. Each engine lives in its own subprocess (one engine's allocations, hooks or
thread pools never slow another's); the parent asks them for one round at a time, in
turn, so that the load of a shared machine drifts over all engines alike. After a
warm-up round, every round's steps are timed end to end (the time from one step's end
to the next: sampling, gather, forward, backward, clipping, noise, update); the figure
is the median over all timed steps. Per-round setup (hooks, buffers) is reported
apart. The non-private baseline is ``train_epochs``, the loop users get.

    python benchmarks/dp_timing.py [--features 300 3000] [--repeats 7] [--threads 1]

Importable: ``from dp_timing import dp_timing`` (benchmarks/ on ``sys.path``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

ENGINES = ("non-private", "ghost", "opacus-ghost", "hooks", "functorch")
"""``ghost``: the default (``privacy.grad-sample-mode``), single-pass ghost clipping for this
model; ``opacus-ghost``: Opacus's ghost clipping (two backward passes); ``hooks`` /
``functorch``: Opacus's per-sample gradients."""
ROOT = Path(__file__).resolve().parents[1]


def dp_timing(
    n_features: int = 300,
    *,
    engines: tuple[str, ...] = ENGINES,
    n_cells: int = 2048,
    hidden_dim: int = 128,
    latent_dim: int = 32,
    batch_size: int = 128,
    repeats: int = 7,
    threads: int = 1,
) -> dict[str, Any]:
    """Seconds per step of each engine, each in its own subprocess, and their ratios.

    Parameters
    ----------
    n_features
        Input features of the autoencoder (300: the demo; 3000: DLPFC).
    engines
        Names from :data:`ENGINES`; ``"non-private"`` is always measured (the denominator).
    n_cells
        Cells of the synthetic site (random standardized features); a round is
        ``n_cells / batch_size`` steps.
    repeats
        Timed rounds per engine, after one warm-up round, interleaved across engines.
    threads
        ``torch.set_num_threads`` (and OMP/MKL threads) in every subprocess.

    Returns
    -------
    ``{"dp_overhead": ghost / non-private, "by_engine": {engine: ratio},
    "step_seconds": {engine: median seconds per step}, "setup": {...}}`` (the settings,
    steps timed and median per-round setup seconds of each engine).
    """
    names = ["non-private", *(e for e in engines if e != "non-private")]
    setup: dict[str, Any] = {
        "model": "CellAutoencoder", "n_features": n_features, "hidden_dim": hidden_dim, "latent_dim": latent_dim,
        "batch_size": batch_size, "n_cells": n_cells, "threads": threads, "repeats": repeats,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    workers = {
        name: subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--setup", json.dumps(setup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        for name in names
    }
    steps: dict[str, list[float]] = {name: [] for name in names}
    round_setup: dict[str, list[float]] = {name: [] for name in names}
    try:
        for name, proc in workers.items():  # imports done, data built: nothing else runs
            if _ask(proc, None)["ready"] != name:
                raise RuntimeError(f"worker {name} did not start")
        for r in range(repeats + 1):
            order = names[r % len(names):] + names[: r % len(names)]  # no engine always first
            for name in order:
                out = _ask(workers[name], r)
                if r:  # round 0 warms up (allocator, kernels, lazy imports)
                    steps[name] += out["step_seconds"]
                    round_setup[name].append(out["setup_seconds"])
    finally:
        for proc in workers.values():
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=30)
    step_seconds = {name: statistics.median(v) for name, v in steps.items()}
    base = step_seconds["non-private"]
    by_engine = {name: step_seconds[name] / base for name in names if name != "non-private"}
    import torch

    setup.update({
        "steps_timed": {k: len(v) for k, v in steps.items()},
        "round_setup_seconds": {k: statistics.median(v) for k, v in round_setup.items()},
        "torch": torch.__version__, "cpus": os.cpu_count(),
    })
    return {"dp_overhead": by_engine.get("ghost", float("nan")), "by_engine": by_engine, "step_seconds": step_seconds, "setup": setup}


def _ask(proc: subprocess.Popen[str], round_seed: int | None) -> dict[str, Any]:
    """Send one request line (None: just read the greeting) and read the JSON answer line."""
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None and stdout is not None
    if round_seed is not None:
        stdin.write(f"{round_seed}\n")
        stdin.flush()
    line = stdout.readline()
    if not line:
        raise RuntimeError(f"timing worker exited with {proc.wait()}")
    answer: dict[str, Any] = json.loads(line)
    return answer


def _worker(engine: str, setup: dict[str, Any], requests: IO[str], answers: IO[str]) -> None:
    """Runs in the subprocess: one training round per request line (its seed), timed per step."""
    import torch

    torch.set_num_threads(setup["threads"])
    from fedspatial.shared.models import CellAutoencoder
    from fedspatial.shared.privacy.dp import NodeBound, dp_train_epochs, plan_round
    from fedspatial.shared.training.loop import GraphData, per_cell_data, train_epochs

    n, f, b = setup["n_cells"], setup["n_features"], setup["batch_size"]
    x = torch.randn(n, f, generator=torch.Generator().manual_seed(0))
    data = per_cell_data(GraphData(x, torch.zeros(n, 0, dtype=torch.int64)))
    plan = plan_round(n, batch_size=b, epochs=1, max_grad_norm=1.0, bound=NodeBound(0), node_noise_multiplier=1.0)
    answers.write(json.dumps({"ready": engine}) + "\n")
    answers.flush()
    for line in requests:
        seed = int(line)
        torch.manual_seed(seed)
        model = CellAutoencoder(f, setup["hidden_dim"], setup["latent_dim"])
        ends: list[float] = []
        start = time.perf_counter()
        if engine == "non-private":
            train_epochs(model, data, epochs=1, batch_size=b, lr=1e-3, seed=seed, on_step=lambda _: ends.append(time.perf_counter()))  # noqa: B023
        else:
            dp_train_epochs(
                model, data, plan, lr=1e-3, grad_sample_mode=engine, seed=seed,
                on_step=lambda _: ends.append(time.perf_counter()),  # noqa: B023
            )
        step_seconds = [end - prev for prev, end in itertools.pairwise(ends)]
        setup_seconds = ends[0] - start - statistics.median(step_seconds)
        answers.write(json.dumps({"step_seconds": step_seconds, "setup_seconds": setup_seconds}) + "\n")
        answers.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, nargs="+", default=[300, 3000])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, json.loads(args.setup), sys.stdin, sys.stdout)
        return 0
    t0 = time.perf_counter()
    for f in args.features:
        # Opacus's per-sample engines take ~0.1-1 s a step at 3000 features: only the
        # ghost engines there, to keep the whole measurement near a minute.
        engines = tuple(args.engines) if f <= 1000 else tuple(e for e in args.engines if "ghost" in e or e == "non-private")
        res = dp_timing(f, engines=engines, repeats=args.repeats, threads=args.threads)
        lines = [f"{f} features, batch {res['setup']['batch_size']}, {args.threads} thread(s): dp_overhead (ghost) {res['dp_overhead']:.2f}"]
        lines += [
            f"  {name:12s} {1e3 * s:8.2f} ms/step" + (f"  x{res['by_engine'][name]:.2f}" if name in res["by_engine"] else "")
            + f"  (setup {1e3 * res['setup']['round_setup_seconds'][name]:.1f} ms/round)"
            for name, s in res["step_seconds"].items()
        ]
        sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.write(f"whole measurement {time.perf_counter() - t0:.0f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
