"""The ``fedspatial`` command line.

``fedspatial simulate CONFIG``    run a local federation (federated / local / centralized)
``fedspatial inspect PATH``       validate one site's data before it joins a federation
``fedspatial make-demo-data DIR`` write the built-in synthetic federation
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("fedspatial")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("flwr").propagate = False  # Flower prints its own log lines


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedspatial.server.simulate import simulate
    from fedspatial.shared.config import ExperimentConfig, load_config

    overrides: dict[str, object] = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        import yaml

        overrides[key] = yaml.safe_load(value)
    if args.resume:
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise SystemExit(f"--resume {run_dir}: no config.yaml there; is it a fedspatial run folder?")
        cfg = load_config(cfg_path, overrides)
        cfg = ExperimentConfig.from_dict(
            {**cfg.to_dict(), "results-dir": str(run_dir.parent), "run-name": run_dir.name}
        )
    else:
        if not args.config:
            raise SystemExit("give a config file (e.g. configs/demo.yaml) or --resume RUN_DIR")
        if args.run_name:
            overrides["run-name"] = args.run_name
        cfg = load_config(args.config, overrides)
    modes = None if args.mode in (None, "all") else [args.mode]
    results = simulate(cfg, modes=modes, resume=bool(args.resume))
    from fedspatial.server.report import comparison_table

    run_dir = Path(cfg.results_dir) / cfg.run_name
    print()
    print(comparison_table(results))
    print(f"Results: {run_dir}/ (summary.md, <mode>/metrics.json, <mode>/loss.png, "
          f"<mode>/sites/<site>/*.h5ad and *_domains.png)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fedspatial.shared.io import inspect_site

    summary, problems = inspect_site(
        args.path, spatial_key=args.spatial_key, label_key=args.label_key
    )
    if summary is not None:
        print(summary.format())
    if problems:
        print(f"\n{len(problems)} problem(s) found in {args.path}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"\n{args.path}: OK, ready to join a federation.")
    return 0


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from fedspatial.server.simulate import synthetic_spec
    from fedspatial.shared.synthetic import write_synthetic_federation

    manifest = write_synthetic_federation(
        args.folder, synthetic_spec(seed=args.seed, scale=args.scale), overwrite=args.overwrite
    )
    print(f"synthetic federation written; manifest: {manifest.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedspatial", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a local federated simulation from a YAML config")
    sim.add_argument("config", nargs="?", help="experiment config (YAML), e.g. configs/demo.yaml")
    sim.add_argument("--mode", choices=["federated", "local", "centralized", "all"], default=None,
                     help="run one mode (default: the config's simulation.modes)")
    sim.add_argument("--run-name", help="results go to <results-dir>/<run-name>/")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config key, e.g. --set training.num-rounds=5 (repeatable)")
    sim.set_defaults(func=_cmd_simulate)

    ins = sub.add_parser("inspect", help="validate a site's .h5ad file or folder and summarize it")
    ins.add_argument("path")
    ins.add_argument("--spatial-key", default="spatial")
    ins.add_argument("--label-key", default="domain")
    ins.set_defaults(func=_cmd_inspect)

    demo = sub.add_parser("make-demo-data", help="write the built-in synthetic federation")
    demo.add_argument("folder", nargs="?", default="data/synthetic")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=float, default=1.0, help="multiply section sizes")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(func=_cmd_make_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from fedspatial.shared.config import ConfigError

    try:
        return int(args.func(args))
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
