"""The benchmark harness's worker layouts (`bench/common.py`: `WorkerPool`, `serve`; `bench/dpo_bench.py`: `run_sweep`).

A stand-in worker script (no torch: each run writes a result computed from its payload, plus its pid) lets these tests
check the orchestration itself in a second or two: both `--worker-scope` layouts give the same JSON, `config` keeps one
process per configuration across rounds and shapes and `run` starts one per run, failures and time limits end the
worker with its log, and a parent stopped by SIGTERM or SIGKILL (the suite's `timeout`) leaves no worker behind. The real
benchmarks run end to end in `DEVICE=cpu bash bench/gpu_suite.sh` and in the slow test at the end.
"""

import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import dpo_bench  # noqa: E402

FAKE_WORKER = f"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {str(BENCH)!r})
from common import worker_main

def measure(path):
    p = json.loads(Path(path).read_text())
    if p.get("fail"):
        raise RuntimeError("the measured run broke")
    time.sleep(p.get("sleep", 0))
    tokens = p["batch"] * p["seq_len"]
    result = {{"config": p["config"], "round": p["round"], "load_avg_before": 0.0, "pid": os.getpid(),
              "times": {{"step_s": [1e-3 * tokens * (2 if p["config"] == "slow" else 1)] * 2, "cpu_step_s": [0.5, 0.7]}},
              "memory": {{"rss_peak_bytes": 1000 * tokens, "rss_peak_delta_bytes": 10 * tokens}}}}
    Path(p["result_path"]).write_text(json.dumps(result))
    return 0

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[2], measure, warm_up=lambda: print("warming up")))
"""


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return path


def sweep_args(scope: str) -> Namespace:
    return Namespace(sweep="1x8,2x8", batch=1, seq_len=8, rounds=3, configs=["stock", "slow"], threads=1,
                     worker_scope=scope, worker_timeout=60, device="cpu", dtype="float32", warmup=1, steps=2, seed=0,
                     gradient_checkpointing=False, logging_steps=1, components=False, breakdown=0)  # fmt: skip


def run_fake_sweep(script: Path, workdir: Path, scope: str):
    progress = []

    def build(args, shape_dir):
        return {"num_params": 1, "mean_sequence_tokens": args.seq_len}

    def on_round(shapes):
        progress.append([shape["rounds_done"] for shape in shapes])

    configs, no_payload = {"stock": {}, "slow": {}}, lambda name, data, shape_dir: {}
    shapes = dpo_bench.run_sweep(sweep_args(scope), script, workdir, configs, build, no_payload, on_round=on_round)
    return shapes, progress


def without_process(shapes):
    """The sweep's JSON minus what depends on the layout (pids, the run's index in its process)."""
    shapes = json.loads(json.dumps(shapes))
    for shape in shapes:
        for runs in shape["runs"].values():
            for run in runs:
                run.pop("process")
                run.pop("pid")
    return shapes


def test_both_worker_scopes_give_the_same_json(fake_script, tmp_path):
    by_scope = {scope: run_fake_sweep(fake_script, tmp_path / scope, scope) for scope in common.WORKER_SCOPES}
    (run_shapes, run_progress), (config_shapes, config_progress) = by_scope["run"], by_scope["config"]
    assert without_process(run_shapes) == without_process(config_shapes)
    # Written after every round, each shape's rounds in turn.
    assert run_progress == config_progress == [[1], [2], [3], [3, 1], [3, 2], [3, 3]]
    for shapes in (run_shapes, config_shapes):
        assert [s["shape"] for s in shapes] == [{"batch": 1, "seq_len": 8}, {"batch": 2, "seq_len": 8}]
        for shape in shapes:
            assert shape["rounds_done"] == 3 and [len(order) for order in shape["orders"]] == [2, 2, 2]
            slow = shape["configs"]["slow"]
            assert slow["rounds"] == 3 and slow["ratios"]["step_s"]["pooled"] == pytest.approx(2.0)
            assert slow["ratios"]["step_s"]["paired_rounds"] == pytest.approx([2.0, 2.0, 2.0])

    def pids(shapes, config):
        return [run["process"]["pid"] for shape in shapes for run in shape["runs"][config]]

    # run: a fresh process per run (3 rounds x 2 shapes per configuration).
    assert len(set(pids(run_shapes, "stock") + pids(run_shapes, "slow"))) == 12
    # config: one process per configuration for all its rounds and shapes, never shared between configurations.
    stock, slow = set(pids(config_shapes, "stock")), set(pids(config_shapes, "slow"))
    assert len(stock) == len(slow) == 1 and stock != slow
    for config in ("stock", "slow"):
        runs = [run for shape in config_shapes for run in shape["runs"][config]]
        assert [run["process"]["run_index"] for run in runs] == list(range(6))
        assert all(run["process"]["pid"] == run["pid"] for run in runs)  # the pool's pid is the measuring process
        assert all(run["process"]["cuda_alloc_at_start_bytes"] == 0 for run in runs)
    # The kept workers ended with the sweep, and their warm-up output went to the log, not into the replies.
    assert not any(alive(pid) for pid in stock | slow)
    assert "warming up" in (tmp_path / "config" / "stock.worker.log").read_text()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(")")[-1].split()[0] != "Z"


def pool_payload(tmp_path: Path, config: str, index: int, **extra) -> dict:
    return {"config": config, "round": 0, "batch": 1, "seq_len": 4,
            "result_path": str(tmp_path / f"{config}_{index}.json"), **extra}  # fmt: skip


@pytest.mark.parametrize("scope", common.WORKER_SCOPES)
def test_a_failing_run_raises_with_the_log_tail(fake_script, tmp_path, scope):
    with common.WorkerPool(fake_script, common.worker_env(1), scope, timeout=60) as pool:
        pool.run(pool_payload(tmp_path, "stock", 0))
        with pytest.raises(RuntimeError, match=r"(?s)worker stock failed.*the measured run broke"):
            pool.run(pool_payload(tmp_path, "stock", 1, fail=True))
        assert pool.workers == {}  # the broken worker is gone; a later run of the configuration starts a new one
        assert pool.run(pool_payload(tmp_path, "stock", 2))["config"] == "stock"


@pytest.mark.parametrize("scope", common.WORKER_SCOPES)
def test_a_run_over_the_time_limit_is_killed(fake_script, tmp_path, scope):
    with common.WorkerPool(fake_script, common.worker_env(1), scope, timeout=3) as pool:
        pool.run(pool_payload(tmp_path, "stock", 0))  # the kept worker's start-up is not part of the next run's limit
        started = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            pool.run(pool_payload(tmp_path, "stock", 1, sleep=60))
        assert time.monotonic() - started < 20


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_parent_leaves_no_worker_behind(fake_script, tmp_path, stop):
    """The suite's `timeout` sends SIGTERM (the parent ends its workers), then SIGKILL (they die with the parent):
    either way the benchmark keeps what it wrote and no worker outlives it."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(BENCH)!r})
import common
common.exit_on_sigterm()
tmp = Path({str(tmp_path)!r})
with common.WorkerPool(Path({str(fake_script)!r}), common.worker_env(1), "config") as pool:
    result = pool.run({{"config": "stock", "round": 0, "batch": 1, "seq_len": 4, "result_path": str(tmp / "a.json")}})
    (tmp / "pid").write_text(str(result["pid"]))
    pool.run({{"config": "stock", "round": 1, "batch": 1, "seq_len": 4, "sleep": 600,
              "result_path": str(tmp / "b.json")}})
""")
    proc = subprocess.Popen([sys.executable, str(driver)])
    deadline = time.monotonic() + 60
    while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_pid = int((tmp_path / "pid").read_text())
    time.sleep(0.3)  # the worker is inside its 600 s run
    proc.send_signal(stop)
    assert proc.wait(timeout=30) == (128 + stop if stop == signal.SIGTERM else -stop)
    deadline = time.monotonic() + 10
    while alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker_pid)
    assert json.loads((tmp_path / "a.json").read_text())["pid"] == worker_pid


def test_component_timer_restores_what_it_wrapped():
    """A kept worker measures several runs: each run's timer must put back the class and module attributes."""

    class Kernel:
        @staticmethod
        def forward(x):
            return x + 1

        def method(self, x):
            return 2 * x

    original_static, original_method = Kernel.__dict__["forward"], Kernel.method
    timer = common.ComponentTimer()
    timer.wrap("head", Kernel, "forward")
    timer.wrap("loss", Kernel, "method")
    timer.current = {}
    assert Kernel.forward(1) == 2 and Kernel().method(3) == 6
    assert set(timer.current) == {"head", "loss"}
    timer.restore()
    assert Kernel.__dict__["forward"] is original_static and Kernel.method is original_method


@pytest.mark.slow
def test_dpo_memory_both_scopes_end_to_end(tmp_path):
    """The real benchmark at a tiny shape: the same JSON layout from both scopes (about a minute on 2 cores)."""
    shape = ["--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "32", "--vocab",
             "512", "--tokenizer-vocab", "512", "--rounds", "3", "--warmup", "1", "--steps", "2", "--breakdown", "0",
             "--configs", "stock,tdpo2"]  # fmt: skip
    reports = {}
    for scope, sweep in (("config", "1x16,1x24"), ("run", "1x16")):
        out = tmp_path / f"{scope}.json"
        command = [sys.executable, str(BENCH / "dpo_memory.py"), *shape, "--sweep", sweep, "--worker-scope", scope,
                   "--out", str(out)]  # fmt: skip
        env = {**common.worker_env(1), "BENCH_MODEL_CACHE": str(tmp_path / "models")}
        subprocess.run(command, check=True, env=env, cwd=BENCH.parent, timeout=600, capture_output=True)
        reports[scope] = json.loads(out.read_text())
    config, run = reports["config"], reports["run"]
    assert config["complete"] and run["complete"] and config["settings"]["worker_scope"] == "config"
    assert len(config["shapes"]) == 2 and len(run["shapes"]) == 1

    def layout(value):
        if isinstance(value, dict):
            return {key: layout(item) for key, item in value.items()}
        if isinstance(value, list):
            return [layout(value[0])] if value else []
        return type(value).__name__

    assert layout(config["shapes"][0]) == layout(run["shapes"][0])
    assert config["shapes"][0]["data"] == run["shapes"][0]["data"]
    stock = config["shapes"][0]["runs"]["stock"] + config["shapes"][1]["runs"]["stock"]
    assert len({r["process"]["pid"] for r in stock}) == 1
    assert len({r["process"]["pid"] for r in run["shapes"][0]["runs"]["stock"]}) == 3


def test_make_tables_states_each_target_verdict(tmp_path):
    """The issue 13 target table: a bound met by the pooled ratio and by every round, by the pooled ratio only, not
    met; a longest-sequence ratio from partial bounds is marked as such."""
    import make_tables

    def ratio(pooled, high):
        return {"pooled": pooled, "paired_min": pooled - 0.1, "paired_max": high, "paired_rounds": [pooled, high]}

    memory = {
        "benchmark": "dpo_memory",
        "machine": {"device": "cuda"},
        "targets": {"tdpo2": {"step_s": 1.10, "cuda_alloc_peak_bytes": 1.05}, "aligndistil": {"step_s": 1.25}},
        "shapes": [{"shape": {"batch": 1, "seq_len": 1024}, "configs": {
            "tdpo2": {"ratios": {"step_s": ratio(1.02, 1.08), "cuda_alloc_peak_bytes": ratio(1.04, 1.07)}},
            "aligndistil": {"ratios": {"step_s": ratio(1.30, 1.40)}},
        }}],
    }  # fmt: skip
    longest = {
        "benchmark": "longest_sequence",
        "machine": {"device": "cuda"},
        "settings": {"batch": 1},
        "configs": {"stock": {"x_stock": 1.0}, "tdpo2": {"x_stock": 1.0, "ratio_exact": False}},
    }
    (tmp_path / "dpo_memory_cuda.json").write_text(json.dumps(memory))
    (tmp_path / "longest_sequence_cuda.json").write_text(json.dumps(longest))
    rows = [line for line in make_tables.targets_section(tmp_path) if line.startswith("| `")]
    verdicts = {(row.split(" | ")[3], row.split(" | ")[4]): row.rsplit(" | ", 1)[1].rstrip(" |") for row in rows}
    assert verdicts == {
        ("`tdpo2`", "step time"): "met, every round",
        ("`tdpo2`", "peak allocated"): "met (pooled)",
        ("`aligndistil`", "step time"): "**not met**",
        ("`tdpo2`", "longest fitting length"): "met (partial bounds)",
    }


def test_make_tables_auto_evidence_pairs_rounds_with_two_pass(tmp_path):
    """`auto` evidence: per-round fused/two-pass step-time ratios (paired by round) and the memory ratio; a backend
    slower in any round, or heavier, does not meet the rule."""
    import make_tables

    def entry(rounds, memory):
        return {"times": {"step_s": {"round_medians": rounds}}, "memory": {"cuda_alloc_peak_bytes": {"median": memory}}}

    report = {
        "benchmark": "dpo_memory",
        "machine": {"device": "cuda"},
        "shapes": [{"shape": {"batch": 2, "seq_len": 1024}, "configs": {
            "stock": entry([1.0, 1.0, 1.0], 10.0),
            "tdpo2_twopass": entry([2.0, 2.0, 2.0], 12.0),
            "tdpo2": entry([1.8, 1.9, 1.6], 11.0),
            "tdpo2_triton": entry([1.5, 2.1, 1.5], 11.0),
        }}],
    }  # fmt: skip
    (tmp_path / "dpo_memory_cuda_variants.json").write_text(json.dumps(report))
    rows = [line for line in make_tables.auto_section(tmp_path) if line.startswith("| `")]
    cells = {row.split(" | ")[3]: row.strip("| ").split(" | ")[4:] for row in rows}
    assert cells == {
        "`torch`": ["0.90 / 0.95 / 0.80", "0.92", "faster in every round, no more memory"],
        "`triton`": ["0.75 / 1.05 / 0.75", "0.92", "**no**"],
    }
