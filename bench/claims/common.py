"""What every claims experiment shares: seeds, the 95% confidence interval, and the result file.

A result file (`bench/results/claims/<experiment>.json`) holds the experiment's config, the seeds, per-seed numbers
for every metric, their mean and 95% CI, the claims it tests with a verdict, the package versions and the commit.
Tables and docs are generated from these files only (`python -m bench.claims report`), never edited by hand.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

CLAIMS_DIR = Path(__file__).resolve().parents[1] / "results" / "claims"

# Two-sided 97.5% quantiles of Student's t for n - 1 degrees of freedom (n = 2..30); beyond, the normal 1.96.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045]


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean and the half-width of its 95% t-interval over seeds: `{"mean", "ci95", "n", "values"}`.

    One value has no interval (`ci95` is None); a caller must not call one seed a result.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci needs at least one value.")
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1, "values": values}
    t = _T975[n - 2] if n - 2 < len(_T975) else 1.96
    return {"mean": mean, "ci95": t * statistics.stdev(values) / math.sqrt(n), "n": n, "values": values}


def paired_difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """`mean_ci` of per-seed differences `a - b` (same seeds, same data): the right test for "method beats baseline"."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs as many values on both sides, got {len(a)} and {len(b)}.")
    return mean_ci([x - y for x, y in zip(a, b)])


def verdict(difference: dict[str, Any], expected_sign: int) -> str:
    """`reproduced` when the 95% CI of the paired difference excludes 0 on the claimed side, `not reproduced` when it
    excludes 0 on the other side, else `inconclusive`."""
    if difference["ci95"] is None:
        return "inconclusive"
    low, high = difference["mean"] - difference["ci95"], difference["mean"] + difference["ci95"]
    if expected_sign * low > 0 and expected_sign * high > 0:
        return "reproduced"
    if expected_sign * low < 0 and expected_sign * high < 0:
        return "not reproduced"
    return "inconclusive"


def environment() -> dict[str, Any]:
    """Versions, machine and commit, recorded in every result file."""
    from bench.common import machine_info

    return machine_info("cpu")


def write_result(name: str, result: dict[str, Any], directory: Path = CLAIMS_DIR) -> Path:
    """Write `<directory>/<name>.json` (sorted keys, indented) with the environment added; returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {**result, "environment": environment()}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
