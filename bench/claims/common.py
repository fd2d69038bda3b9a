"""What every claims experiment shares: seeds, the 95% confidence interval, and the result file.

A result file (`bench/results/claims/<experiment>.json`) holds the experiment's config, the seeds, per-seed numbers
for every metric, their mean and 95% CI, the claims it tests with a verdict, the package versions and the commit.
Tables and docs are generated from these files only (`python -m bench.claims report`), never edited by hand.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

CLAIMS_DIR = Path(__file__).resolve().parents[1] / "results" / "claims"

# Two-sided 97.5% quantiles of Student's t for n - 1 degrees of freedom (n = 2..30); beyond, the normal 1.96.
# fmt: off
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045]
# fmt: on


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
    excludes 0 on the other side, else `inconclusive`.

    A zero-width interval (every seed gave the same value: the seeds do not vary what is measured, e.g. a fixed
    evaluation set scored by a deterministic builder) estimates no uncertainty, so it is `inconclusive` too.
    """
    if not has_spread(difference):
        return "inconclusive"
    low, high = difference["mean"] - difference["ci95"], difference["mean"] + difference["ci95"]
    if expected_sign * low > 0 and expected_sign * high > 0:
        return "reproduced"
    if expected_sign * low < 0 and expected_sign * high < 0:
        return "not reproduced"
    return "inconclusive"


def has_spread(interval: dict[str, Any]) -> bool:
    """Whether the per-seed values differ (a CI of width 0 from identical values says nothing about uncertainty)."""
    return interval["ci95"] is not None and len(set(interval["values"])) > 1


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


# What every experiment's `run(quick, seeds)` must return (checked by `validate_result` before anything is written).
RESULT_KEYS = ("experiment", "config", "seeds", "metrics", "claims", "wall_time_s")
CLAIM_KEYS = ("claim", "paper", "setting", "metric", "result", "verdict", "plot")
VERDICTS = ("reproduced", "not reproduced", "inconclusive")


def _check_interval(where: str, value: Any) -> None:
    if not isinstance(value, dict) or not {"mean", "ci95", "n", "values"} <= set(value):
        raise ValueError(f"{where} must be a mean_ci/paired_difference dict with mean, ci95, n, values; got {value!r}.")


def validate_result(result: dict[str, Any]) -> None:
    """Raise ValueError naming the first missing or malformed field of an experiment's result dict.

    Checked: the top-level keys of `RESULT_KEYS`, every metric a `mean_ci` dict, every claim with the keys of
    `CLAIM_KEYS`, a `mean_ci`/`paired_difference` result and a verdict in `VERDICTS`; the whole dict JSON-able.
    """
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        raise ValueError(f"Experiment result lacks {missing}; `run()` must return at least {list(RESULT_KEYS)}.")
    name = result["experiment"]
    if not isinstance(result["seeds"], list) or not result["seeds"]:
        raise ValueError(f"{name}: `seeds` must be a non-empty list, got {result['seeds']!r}.")
    for metric, value in result["metrics"].items():
        _check_interval(f"{name}: metrics[{metric!r}]", value)
    if not result["claims"]:
        raise ValueError(f"{name}: `claims` is empty; an experiment tests at least one claim.")
    for index, claim in enumerate(result["claims"]):
        missing = [key for key in CLAIM_KEYS if key not in claim]
        if missing:
            raise ValueError(f"{name}: claims[{index}] lacks {missing}; each claim needs {list(CLAIM_KEYS)}.")
        _check_interval(f"{name}: claims[{index}]['result']", claim["result"])
        if claim["verdict"] not in VERDICTS:
            raise ValueError(f"{name}: claims[{index}]['verdict'] must be one of {VERDICTS}, got {claim['verdict']!r}.")
    try:
        json.dumps(result)
    except TypeError as error:
        raise ValueError(
            f"{name}: the result is not JSON-able ({error}); return plain lists, floats and strings."
        ) from error


def format_interval(value: dict[str, Any], digits: int = 3) -> str:
    """`0.123 ± 0.045 (n=3)` for a `mean_ci`/`paired_difference` dict; `± n/a` for a single seed or no spread."""
    ci = f"{value['ci95']:.{digits}f}" if has_spread(value) else "n/a"
    note = "" if value["n"] == 1 or has_spread(value) else ", same value every seed"
    return f"{value['mean']:.{digits}f} ± {ci} (n={value['n']}{note})"


SET_ENV = "BENCH_CLAIMS_SET"  # JSON object of config overrides, filled by `python -m bench.claims run --set key=value`


def experiment_config(configs: dict[str, dict[str, Any]], quick: bool) -> dict[str, Any]:
    """A copy of `configs["quick"]` or `configs["full"]` with the `--set key=value` overrides applied.

    Raises ValueError for an override key the config does not have (a typo would otherwise be ignored silently).
    """
    config = dict(configs["quick" if quick else "full"])
    overrides = json.loads(os.environ.get(SET_ENV) or "{}")
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"--set keys {unknown} are not settings of this experiment; valid keys: {sorted(config)}.")
    config.update(overrides)
    return config
