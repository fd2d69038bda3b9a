"""`python -m bench.claims run <experiment...> [--quick] [--seeds 0 1 2]` and `python -m bench.claims report`."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: list[str] | None = None) -> int:
    from bench.claims.common import SET_ENV
    from bench.claims.suite import available_experiments, report, run_experiment

    parser = argparse.ArgumentParser(prog="python -m bench.claims", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run experiments and write bench/results/claims/<name>.json and PNGs")
    run.add_argument("experiments", nargs="+", help=f"experiment names or 'all'; available: {available_experiments()}")
    run.add_argument("--quick", action="store_true", help="tiny CI form, written under bench/results/claims/quick/")
    run.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    run.add_argument("--out", default=None, help="output folder (default: bench/results/claims[/quick])")
    run.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config values (VALUE parsed as JSON, else a string), e.g. --set steps=200 device=cuda",
    )
    run.add_argument("--no-report", action="store_true", help="do not regenerate the tables after a full run")
    commands.add_parser("report", help="regenerate claims_table.md and bench/README.md from the JSON files")
    args = parser.parse_args(argv)

    if args.command == "report":
        print(f"wrote {report()}")
        return 0
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if overrides:
        if args.out is None:
            parser.error("--set changes the published setting: write the run to its own folder with --out DIR.")
        os.environ[SET_ENV] = json.dumps(overrides)
    names = available_experiments() if args.experiments == ["all"] else args.experiments
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    for name in names:
        path = run_experiment(name, quick=args.quick, seeds=seeds, out_dir=args.out)
        print(f"wrote {path}", flush=True)
    if not args.quick and args.out is None and not args.no_report:
        print(f"wrote {report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
