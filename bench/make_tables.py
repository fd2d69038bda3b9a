"""Generate the benchmark tables of the docs from the JSON results in `bench/results/`.

    python bench/make_tables.py                       # writes docs/benchmarks.md
    python bench/make_tables.py --results DIR --out FILE

Every `<benchmark>_<device>*.json` under the results folder (subfolders included, e.g. `gpu/` from
`bench/gpu_suite.sh`) written by the bench scripts (`dpo_memory`, `dpo_token_overhead`,
`grpo_token_overhead`, `sft_token_overhead`) becomes one section per measured shape: time per measured step and peak
memory per configuration, each with its ratio to stock and, in parentheses, the min-max of the per-round paired
ratios; the device, commit, versions, rounds and load average come from the JSON. Files written by the harness
before the fused full-distribution pass (no `shapes` key) are listed as legacy tables with their own ratio columns.
`longest_sequence_*.json` (`bench/longest_sequence.py`) becomes one table of the longest fitting length per
configuration and its ratio to stock. Nothing here measures anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BENCHMARKS = ("dpo_memory", "dpo_token_overhead", "grpo_token_overhead", "sft_token_overhead")

# (key in `times` or `memory`, column label, scale, format): times in ms, memory in GiB.
TIME_COLUMNS = (
    ("fwd_bwd", "loss fwd+bwd ms (in-loop)", 1e3, ".1f"),
    ("head", "LM-head/KL kernels ms (in-loop)", 1e3, ".1f"),
    ("cpu_step_s", "CPU step ms", 1e3, ".1f"),
    ("step_s", "step ms", 1e3, ".1f"),
)
MEMORY_COLUMNS = {
    "cpu": (("rss_peak_bytes", "peak RSS GiB"), ("rss_peak_delta_bytes", "RSS over construction GiB")),
    "cuda": (
        ("cuda_alloc_peak_bytes", "peak allocated GiB"),
        ("cuda_alloc_peak_delta_bytes", "allocated over construction GiB"),
        ("cuda_reserved_peak_bytes", "peak reserved GiB"),
    ),
}


def _ratio(ratio: dict | None) -> str:
    if not ratio:
        return ""
    text = f"{ratio['pooled']:.2f}x"
    if "paired_min" in ratio and len(ratio.get("paired_rounds", [])) > 1:
        text += f" ({ratio['paired_min']:.2f}-{ratio['paired_max']:.2f})"
    return text


def _cell(value: str, ratio: dict | None, is_baseline: bool) -> str:
    return value if is_baseline or not ratio else f"{value} · {_ratio(ratio)}"


def _provenance(report: dict) -> str:
    machine, settings = report.get("machine", {}), report.get("settings", {})
    device = machine.get("gpu") or f"{machine.get('cpu_model', '?')} ({machine.get('sched_affinity', '?')} cores)"
    loads = [load for shape in report.get("shapes", []) for e in shape["configs"].values() for load in e["load_avg_1m"]]
    load = f", 1-min load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    rounds = {e["rounds"] for shape in report.get("shapes", []) for e in shape["configs"].values()}
    return (
        f"{device}; commit `{machine.get('git_commit')}`, {machine.get('date')}; torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}, trl {machine.get('trl')}; {settings.get('dtype', '')} "
        f"{', '.join(f'{r} rounds' for r in sorted(rounds))}{load}"
        + ("; stopped before the end (time limit): partial" if report.get("complete") is False else "")
    )


def shape_table(shape: dict, device: str) -> str:
    configs = shape["configs"]
    first = next(iter(configs.values()))
    time_columns = [c for c in TIME_COLUMNS if c[0] in first["times"]]
    if device == "cuda":  # on a dedicated GPU the wall step time is the measurement; lead with it
        time_columns = sorted(time_columns, key=lambda c: c[0] != "step_s")
    memory_columns = [c for c in MEMORY_COLUMNS[device] if c[0] in first["memory"]]
    headers = ["config", *(label for _, label, _, _ in time_columns), *(label for _, label in memory_columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, entry in configs.items():
        cells = [f"`{name}`"]
        for key, _, scale, spec in time_columns:
            series = entry["times"].get(key)
            value = format(series["median"] * scale, spec) if series else "-"
            cells.append(_cell(value, entry["ratios"].get(key), name == "stock"))
        for key, _ in memory_columns:
            value = f"{entry['memory'][key]['median'] / 2**30:.3f}"
            cells.append(_cell(value, entry["ratios"].get(key), name == "stock"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shape_title(shape: dict) -> str:
    title = ", ".join(f"{key} {value}" for key, value in shape["shape"].items())
    rounds, planned = shape.get("rounds_done"), len(shape.get("orders", []))
    if rounds is not None and rounds < planned:  # the benchmark was stopped (suite time limit) after these rounds
        title += f" (partial: {rounds} of {planned} rounds)"
    return title


def legacy_table(report: dict) -> str:
    """Results of the harness before issue 13 (pooled medians, MB = MiB, no in-loop components)."""
    lines = ["| config | step time x stock | CPU time x stock | peak memory x stock | peak over construction x stock |",
             "|---|---|---|---|---|"]  # fmt: skip

    def cell(value):
        return "-" if value is None else f"{value:.2f}x"

    for name, entry in report.get("configs", {}).items():
        r = entry.get("ratios", {})
        keys = ("step_time", "step_cpu_time", "mem_peak_abs", "mem_peak_delta")
        lines.append(f"| `{name}` | " + " | ".join(cell(r.get(key)) for key in keys) + " |")
    return "\n".join(lines)


def longest_sequence_section(report: dict) -> list[str]:
    """`bench/longest_sequence.py`: the longest fitting length per configuration, its ratio to stock, the first
    failing length and the probes, under a real (CUDA) or emulated (CPU) memory cap."""
    machine, settings = report.get("machine", {}), report.get("settings", {})
    device = machine.get("gpu") or f"{machine.get('cpu_model', '?')} ({machine.get('sched_affinity', '?')} cores)"
    lines = [
        f"{device}; commit `{machine.get('git_commit')}`, {machine.get('date')}; torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}, trl {machine.get('trl')}; {settings.get('dtype')}, "
        f"{settings.get('batch')} pair(s) per step, {settings.get('steps')} optimizer steps per probe, lengths in "
        f"multiples of {settings.get('granularity')} up to {settings.get('max_length')}; memory cap: "
        f"{report.get('memory_cap')}.",
        "",
        "| config | longest fitting length | x stock | first failing length | peak GiB at the longest | probes "
        "| status |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in report.get("configs", {}).items():
        ratio = "-" if entry["x_stock"] is None else f"{entry['x_stock']:.3f}x"
        if entry["x_stock"] is not None and not entry["ratio_exact"]:
            ratio += " (partial)"
        status = "complete" if entry["complete"] else f"partial: {entry['stopped_by']}"
        if entry["reached_max"]:
            status += ", fits up to the maximum"
        peak = entry.get("peak_gib_at_longest")
        cells = [f"`{name}`", str(entry["longest_fitting"]), ratio, str(entry["shortest_failing"] or "-"),
                 "-" if peak is None else f"{peak:.3f}", str(len(entry["probes"])), status]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


TARGET_LABELS = {
    "cpu_step_s": "CPU time per step",
    "fwd_bwd": "CPU time of compute_loss + backward (in-loop)",
    "step_s": "step time",
    "rss_peak_bytes": "peak RSS (VmHWM)",
    "cuda_alloc_peak_bytes": "peak allocated",
}


def targets_section(results_dir: Path) -> list[str]:
    """Issue 13's targets, as each `dpo_memory` JSON states them (`targets`: {config: {ratio key: bound}}), against
    the measured ratio to stock: "met" when the pooled ratio is within the bound, "every round" when each round's
    paired ratio is too; and the longest-sequence target (TDPO2's longest fitting length equals stock's)."""
    rows = []
    for path in sorted(results_dir.rglob("dpo_memory_*.json")):
        report = json.loads(path.read_text())
        device = report.get("machine", {}).get("device", "cpu")
        for shape in report.get("shapes", []):
            for config, bounds in report.get("targets", {}).items():
                ratios = shape["configs"].get(config, {}).get("ratios", {})
                for key, bound in bounds.items():
                    ratio = ratios.get(key)
                    if ratio is None:
                        continue
                    met = ratio["pooled"] <= bound
                    every = ratio.get("paired_max", ratio["pooled"]) <= bound
                    verdict = ("met, every round" if every else "met (pooled)") if met else "**not met**"
                    rows.append([f"`{_shown(path)}`", device, shape_title(shape), f"`{config}`", TARGET_LABELS[key],
                                 f"<= {bound:.2f}x", _ratio(ratio), verdict])  # fmt: skip
    for path in sorted(results_dir.rglob("longest_sequence_*.json")):
        report = json.loads(path.read_text())
        device = report.get("machine", {}).get("device", "cpu") + (", emulated" if report.get("emulated") else "")
        for config, entry in report.get("configs", {}).items():
            if config == "stock" or entry.get("x_stock") is None:
                continue
            exact = entry.get("ratio_exact")
            verdict = ("met" if entry["x_stock"] >= 1 else "**not met**") + ("" if exact else " (partial bounds)")
            rows.append([f"`{_shown(path)}`", device, f"batch {report['settings']['batch']}", f"`{config}`",
                         "longest fitting length", ">= 1.00x", f"{entry['x_stock']:.2f}x", verdict])  # fmt: skip
    if not rows:
        return []
    headers = ["results", "device", "shape", "config", "quantity", "target (x stock)", "measured", "verdict"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [
        "## Issue 13 targets",
        "",
        "Each target as its result file states it, against the measured ratio to stock DPO (pooled median, per-round",
        "paired min-max in parentheses). CPU results come from a shared 2-core machine; the GPU targets need a GPU run",
        "(`bash bench/gpu_suite.sh`), and a CPU longest-sequence result is an emulation, not evidence for the GPU target.",
        "",
        *lines,
        "",
    ]


AUTO_CANDIDATES = {"tdpo2": "torch", "tdpo2_triton": "triton"}


def auto_section(results_dir: Path) -> list[str]:
    """The evidence for `token_kernel="auto"`: in every `dpo_memory` shape that measured the two-pass TDPO2 beside a
    fused one, the fused/two-pass step-time ratio of each round (paired by round) and of the memory medians. The rule
    (bench/README.md): auto may pick a fused backend on a device only if it is faster in every round at every shape
    and uses no more peak memory."""
    rows = []
    for path in sorted(results_dir.rglob("dpo_memory_*.json")):
        report = json.loads(path.read_text())
        device = report.get("machine", {}).get("device", "cpu")
        time_key, memory_key = (
            ("step_s", "cuda_alloc_peak_bytes") if device == "cuda" else ("cpu_step_s", "rss_peak_bytes")
        )
        for shape in report.get("shapes", []):
            configs = shape["configs"]
            if "tdpo2_twopass" not in configs:
                continue
            base = configs["tdpo2_twopass"]
            for config, backend in AUTO_CANDIDATES.items():
                if config not in configs:
                    continue
                entry = configs[config]
                rounds = [a / b for a, b in zip(entry["times"][time_key]["round_medians"],
                                                base["times"][time_key]["round_medians"])]  # fmt: skip
                memory = entry["memory"][memory_key]["median"] / base["memory"][memory_key]["median"]
                ok = all(r <= 1 for r in rounds) and memory <= 1
                rows.append([f"`{_shown(path)}`", device, shape_title(shape), f"`{backend}`",
                             " / ".join(f"{r:.2f}" for r in rounds), f"{memory:.2f}",
                             "faster in every round, no more memory" if ok else "**no**"])  # fmt: skip
    if not rows:
        return []
    headers = ["results", "device", "shape", "fused backend", "step time / two-pass, per round", "peak memory / two-pass",
               "meets the rule for auto"]  # fmt: skip
    return [
        '## Evidence for `token_kernel="auto"`',
        "",
        "`auto` runs the fused pass in torch on CPU and TRL's two-pass path on CUDA. It may switch a device to a fused",
        "backend only when that backend is faster than two-pass in every round at every shape, with no more peak memory",
        "(CUDA: allocated; CPU: VmHWM). Ratios of TDPO2 with that backend to TDPO2 two-pass, measured in the same run.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def render(results_dir: Path) -> str:
    out = [
        "# Benchmark tables",
        "",
        "Generated by `python bench/make_tables.py` from `bench/results/*.json`; do not edit by hand. Each cell is the",
        "median (times: over every measured step of every round; memory: over rounds) and, for token methods, its",
        "ratio to stock with the min-max of the per-round paired ratios in parentheses. 'in-loop' columns add up the",
        "process CPU time spent in `compute_loss` + `backward`, or in the LM-head/KL kernels alone, during the measured",
        "steps: on a shared CPU they are the trustworthy ratios. CPU memory is the worker's own `VmHWM`; GPU memory is",
        "`max_memory_allocated` / `max_memory_reserved`. GiB = 2^30 bytes. How each benchmark works: `bench/README.md`.",
        "",
        *targets_section(results_dir),
        *auto_section(results_dir),
    ]
    for benchmark in BENCHMARKS:
        for path in sorted(results_dir.rglob(f"{benchmark}_*.json")):
            report = json.loads(path.read_text())
            if report.get("benchmark") != benchmark:
                continue
            device = report.get("machine", {}).get("device", "cpu")
            out.append(f"## `{benchmark}` ({device}) — `{_shown(path)}`")
            out.append("")
            if "shapes" not in report:
                machine = report.get("machine", {})
                rounds = min((len(runs) for runs in report.get("runs", {}).values()), default=0)
                device_name = machine.get("gpu") or machine.get("cpu_model")
                out.append(
                    f"Legacy harness (before issue 13: pooled medians, {rounds} round(s), CPU memory from ru_maxrss; "
                    f"full-distribution losses on the two-pass path): {device_name}, {machine.get('date')}."
                )
                out += ["", legacy_table(report), ""]
                continue
            out += [_provenance(report), ""]
            for shape in report["shapes"]:
                if shape["configs"]:  # empty: stopped before its first round ended
                    out += [f"**{shape_title(shape)}**", "", shape_table(shape, device), ""]
    for path in sorted(results_dir.rglob("longest_sequence_*.json")):
        report = json.loads(path.read_text())
        if report.get("benchmark") == "longest_sequence":
            device = report.get("machine", {}).get("device", "cpu") + (
                ", emulated cap" if report.get("emulated") else ""
            )
            out += [f"## `longest_sequence` ({device}) — `{_shown(path)}`", ""] + longest_sequence_section(report)
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
