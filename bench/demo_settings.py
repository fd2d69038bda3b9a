"""The demo jobs' settings, chosen on validation problems, and the jobs measured as shipped on the test problems.

`select`: each of `trl-tokenlevel dpo`, `grpo` and `sft` (the built-in jobs on SmolLM2-135M-Instruct) runs with every
learning rate of a small grid and several seeds, measuring greedy accuracy on the 48 valid-split "Larger of a and b"
problems (`--heldout_split valid`: hash-disjoint from the training rows and from the 48 test problems the jobs report).
The chosen rate is the one with the highest mean *balanced* validation accuracy after training: the mean of the
accuracies on problems whose larger number comes first and second. (The base model favours one position, and the valid
and test sets hold different shares of each, so plain accuracy would reward a mere shift of that bias.) Ties go to the
smaller rate. The jobs' defaults are then set to it by hand; the JSON records what was chosen and from what.

`measure`: each job as a user runs it (`trl-tokenlevel dpo` with no flags but the output folder), once, after the
choice: wall time of the whole command (start-up, model load, both accuracy measurements, training, heatmap), the CPU
time of the process, the held-out test accuracy before and after, and for DPO the first-wrong-token fraction of the
heatmap. Run it on an otherwise idle machine: wall time is what a user waits.

```bash
HF_HUB_OFFLINE=1 python -m bench.demo_settings select          # 27 runs, about 40 minutes on 2 idle cores
HF_HUB_OFFLINE=1 python -m bench.demo_settings select --jobs dpo --seeds 0 1 2 --learning_rates 5e-5 1.5e-4 5e-4
HF_HUB_OFFLINE=1 python -m bench.demo_settings measure         # about 6 minutes
python -m bench.demo_settings report                           # both tables again, from the JSON files
```

`select` writes `bench/results/demo_settings.json` and `.md`; `measure` writes `bench/results/demo_jobs.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.claims.common import mean_ci

RESULTS = Path(__file__).parent / "results"
ACCURACY = re.compile(r"(Validation|Held-out) greedy accuracy (before|after) training \((\d+) problems\): ([\d.]+)%")
BY_POSITION = re.compile(
    r"larger number first: ([\d.]+)% of (\d+), second: ([\d.]+)% of (\d+); balanced accuracy ([\d.]+)%"
)
FIRST_WRONG = re.compile(r"first wrong token: (\d+)/(\d+) held-out rejected answers \(\d+%; a random token would hit "
                         r"(\d+)%\)")  # fmt: skip
# The token method each demo job runs (for the tables).
METHODS = {"dpo": "TDPO2 (LoRA)", "grpo": "80/20 entropy-selected GRPO (LoRA)", "sft": "One-Token Rollout (LoRA)"}
# Job-specific flags of a selection run: no heatmap (it scores test pairs).
SELECTION_FLAGS = {"dpo": ["--heatmap_examples", "0"], "grpo": [], "sft": []}


def run_job(job: str, flags: list[str]) -> dict:
    """One built-in job run: `{"before", "after", "n", "wall_s", "cpu_s"}` (+ the heatmap's first-wrong fraction)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "trl_tokenlevel.cli", job, "--output_dir", out, *flags]
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    found = {when: (int(n), round(float(value) / 100, 4)) for _, when, n, value in ACCURACY.findall(completed.stdout)}
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    result = {"before": found["before"][1], "after": found["after"][1], "n": found["after"][0],
              "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}  # fmt: skip
    for when, (first, n_first, second, n_second, balanced) in zip(
        ("before", "after"), BY_POSITION.findall(completed.stdout)
    ):
        result[f"balanced_{when}"] = round(float(balanced) / 100, 4)
        result[f"by_position_{when}"] = {"first": round(float(first) / 100, 4), "n_first": int(n_first),
                                         "second": round(float(second) / 100, 4), "n_second": int(n_second)}  # fmt: skip
    first_wrong = FIRST_WRONG.search(completed.stdout)
    if first_wrong:
        hits, total, chance = map(int, first_wrong.groups())
        result["first_wrong"] = {
            "hits": hits,
            "total": total,
            "fraction": round(hits / total, 4),
            "chance": chance / 100,
        }
    return result


def choose(runs: list[dict]) -> float:
    """The learning rate with the highest mean balanced validation accuracy after training (the mean of the accuracies
    on problems whose larger number comes first and second: a mere shift of the model's position bias does not win);
    ties go to the smaller rate."""
    by_rate: dict[float, list[float]] = {}
    for run in runs:
        by_rate.setdefault(run["learning_rate"], []).append(run["balanced_after"])
    return max(sorted(by_rate), key=lambda rate: statistics.fmean(by_rate[rate]))


def _interval(values: list[float]) -> str:
    interval = mean_ci(values)
    half = float("nan") if interval["ci95"] is None else interval["ci95"]  # one seed: no interval
    return f"{interval['mean']:.1%} ± {half:.1%}"


def selection_table(results: dict) -> str:
    lines = [
        "| job | learning rate | balanced validation accuracy after (mean ± 95% CI) | before | overall after | "
        "overall before | seeds | wall per run (s) | chosen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for job, result in results["jobs"].items():
        for rate in sorted({run["learning_rate"] for run in result["runs"]}):
            runs = [run for run in result["runs"] if run["learning_rate"] == rate]
            wall = statistics.fmean(run["wall_s"] for run in runs)
            chosen = "yes" if rate == result["chosen_learning_rate"] else ""
            lines.append(
                f"| {job} | {rate:g} | {_interval([run['balanced_after'] for run in runs])} | "
                f"{runs[0]['balanced_before']:.1%} | {_interval([run['after'] for run in runs])} | "
                f"{runs[0]['before']:.1%} | {len(runs)} | {wall:.0f} | {chosen} |"
            )
    return "\n".join(lines) + "\n"


def measured_table(results: dict) -> str:
    lines = [
        "| command | method | wall time | CPU time | held-out accuracy before → after (48 test problems) | balanced "
        "accuracy before → after | first wrong token holds the most negative reward |",
        "|---|---|---|---|---|---|---|",
    ]
    for job, run in results["jobs"].items():
        wrong = run.get("first_wrong")
        where = (
            f"{wrong['hits']}/{wrong['total']} ({wrong['fraction']:.0%}; chance {wrong['chance']:.0%})"
            if wrong
            else "-"
        )
        minutes, seconds = divmod(round(run["wall_s"]), 60)
        lines.append(f"| `trl-tokenlevel {job}` | {METHODS[job]} | {minutes} min {seconds:02d} s | {run['cpu_s']:.0f} s | "
                     f"{run['before']:.1%} → {run['after']:.1%} | {run['balanced_before']:.1%} → "
                     f"{run['balanced_after']:.1%} | {where} |")  # fmt: skip
    env = results["environment"]
    lines.append(f"\n{env['cpu_model']} ({env['cpu_count']} cores, 1-min load {env['load_avg_1m_at_start']:.1f} at "
                 f"start), commit `{env['git_commit']}`, {env['date']}; one run each.")  # fmt: skip
    return "\n".join(lines) + "\n"


def select(args) -> None:
    from bench.common import machine_info

    results = json.loads(args.output.read_text()) if args.output.exists() else {"jobs": {}}
    results["environment"] = machine_info("cpu")
    for job in args.jobs:
        runs = []
        for rate in args.learning_rates:
            for seed in args.seeds:
                flags = ["--heldout_split", "valid", "--learning_rate", str(rate), "--seed", str(seed)]
                run = {"learning_rate": rate, "seed": seed, **run_job(job, flags + SELECTION_FLAGS[job])}
                print(json.dumps({"job": job, **run}), flush=True)
                runs.append(run)
        results["jobs"][job] = {"runs": runs, "chosen_learning_rate": choose(runs)}
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(selection_table(results))
    print(selection_table(results))


def measure(args) -> None:
    from bench.common import machine_info

    results = {"environment": machine_info("cpu"), "jobs": {}}
    for job in args.jobs:
        results["jobs"][job] = run_job(job, [])
        print(json.dumps({"job": job, **results["jobs"][job]}), flush=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(measured_table(results))
    print(measured_table(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    selection = commands.add_parser("select", help="Choose learning rates on validation problems.")
    selection.add_argument("--learning_rates", nargs="+", type=float, default=[5e-5, 1.5e-4, 5e-4])
    selection.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    selection.add_argument("--output", type=Path, default=RESULTS / "demo_settings.json")
    measurement = commands.add_parser("measure", help="Run each job as shipped; held-out test numbers and wall time.")
    measurement.add_argument("--output", type=Path, default=RESULTS / "demo_jobs.json")
    for command in (selection, measurement):
        command.add_argument("--jobs", nargs="+", default=["dpo", "grpo", "sft"], choices=["dpo", "grpo", "sft"])
    commands.add_parser("report", help="Regenerate both tables from the JSON files.")
    args = parser.parse_args(argv)
    if args.command == "report":
        report()
    else:
        (select if args.command == "select" else measure)(args)


def report() -> None:
    """Regenerate `demo_settings.md` and `demo_jobs.md` from their JSON files."""
    for name, make_table in (("demo_settings", selection_table), ("demo_jobs", measured_table)):
        path = RESULTS / f"{name}.json"
        if path.exists():
            path.with_suffix(".md").write_text(make_table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
