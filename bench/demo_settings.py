"""Choose the demo jobs' learning rates on the validation problems, never on the test problems they report.

Each of `trl-tokenlevel dpo`, `grpo` and `sft` (the built-in jobs on SmolLM2-135M-Instruct) runs with every learning
rate of a small grid and several seeds, measuring greedy accuracy on the 48 valid-split "Larger of a and b" problems
(`--heldout_split valid`: hash-disjoint from the training rows and from the 48 test problems the jobs report). The
chosen rate is the one with the highest mean validation accuracy after training (ties: the smaller rate, the gentler
change); the jobs' defaults are then set to it by hand and the JSON records what was chosen and from what.

```bash
HF_HUB_OFFLINE=1 python -m bench.demo_settings                       # all three jobs (about an hour on 2 cores)
HF_HUB_OFFLINE=1 python -m bench.demo_settings --jobs dpo --seeds 0 1 2 --learning_rates 5e-5 1.5e-4 5e-4
```

Writes `bench/results/demo_settings.json` and the table `bench/results/demo_settings.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ACCURACY = re.compile(r"Validation greedy accuracy (before|after) training \((\d+) problems\): ([\d.]+)%")
# Job-specific flags of a selection run: no heatmap (it scores test pairs).
EXTRA_FLAGS = {"dpo": ["--heatmap_examples", "0"], "grpo": [], "sft": []}


def run_job(job: str, learning_rate: float, seed: int) -> dict:
    """One built-in job run with validation accuracy: `{"before", "after", "n", "wall_s"}`."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "trl_tokenlevel.cli", job, "--heldout_split", "valid", "--output_dir", out,
                   "--learning_rate", str(learning_rate), "--seed", str(seed), *EXTRA_FLAGS[job]]  # fmt: skip
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    found = {when: (int(n), float(value) / 100) for when, n, value in ACCURACY.findall(completed.stdout)}
    return {"before": found["before"][1], "after": found["after"][1], "n": found["after"][0], "wall_s": wall}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def choose(runs: list[dict]) -> float:
    """The learning rate with the highest mean validation accuracy after training; ties go to the smaller rate."""
    by_rate: dict[float, list[float]] = {}
    for run in runs:
        by_rate.setdefault(run["learning_rate"], []).append(run["after"])
    return max(sorted(by_rate), key=lambda rate: statistics.fmean(by_rate[rate]))


def table(results: dict) -> str:
    lines = [
        "| job | learning rate | validation accuracy after (mean ± 95% CI) | before | seeds | wall per run (s) | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for job, result in results["jobs"].items():
        rates = sorted({run["learning_rate"] for run in result["runs"]})
        for rate in rates:
            runs = [run for run in result["runs"] if run["learning_rate"] == rate]
            mean, half = mean_ci([run["after"] for run in runs])
            wall = statistics.fmean(run["wall_s"] for run in runs)
            chosen = "yes" if rate == result["chosen_learning_rate"] else ""
            lines.append(f"| {job} | {rate:g} | {mean:.1%} ± {half:.1%} | {runs[0]['before']:.1%} | {len(runs)} | "
                         f"{wall:.0f} | {chosen} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=["dpo", "grpo", "sft"], choices=["dpo", "grpo", "sft"])
    parser.add_argument("--learning_rates", nargs="+", type=float, default=[5e-5, 1.5e-4, 5e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=RESULTS / "demo_settings.json")
    args = parser.parse_args(argv)

    from bench.common import machine_info

    results = json.loads(args.output.read_text()) if args.output.exists() else {"jobs": {}}
    results["environment"] = machine_info("cpu")
    for job in args.jobs:
        runs = []
        for rate in args.learning_rates:
            for seed in args.seeds:
                run = {"learning_rate": rate, "seed": seed, **run_job(job, rate, seed)}
                print(json.dumps({"job": job, **run}), flush=True)
                runs.append(run)
        results["jobs"][job] = {"runs": runs, "chosen_learning_rate": choose(runs)}
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
