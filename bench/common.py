"""Shared helpers for the benchmarks in `bench/`.

Every benchmark follows the same pattern: the parent process builds a model (random weights from a config, saved to a
temporary directory) and a dataset once, then measures each configuration in worker processes of its own (so peak
memory is per configuration and no allocator or compile state is shared between configurations), in alternating order
over at least three rounds (to cancel drift), excluding warm-up steps, and writes one JSON file under `bench/results/`
with the commit, the package versions and the device (after every round, so a benchmark stopped by a timeout keeps
the rounds it finished: `"complete": false`). Nothing here touches the network.

Worker layout (`WorkerPool`, `--worker-scope`):
- `run` (CPU default): a fresh process per measured run (one configuration, one round, one shape). The CPU peak is
  the process's own `VmHWM`, which is only clean in a process that measured nothing before.
- `config` (CUDA default): one fresh process per configuration, all started together when the benchmark starts and
  each kept for all its rounds and shapes (runs in the same order as with `run`: shape by shape, alternating rounds).
  Every run rebuilds the trainer from the saved checkpoint (fresh weights and optimizer state); between runs the
  worker drops every reference, frees the caching allocator's blocks and cuBLAS's workspaces (`serve`), and
  `MemoryProbe` resets the peaks after construction, so allocated and reserved peaks are those of the run. Why: at
  the Qwen2.5-0.5B shape a worker's start (imports, CUDA context, first construction) costs ~15-20 s (estimated
  from the H200 runs in `results/`), more than its measured steps; the GPU suite starts 14 workers instead of 60.
  Limits: later rounds of a configuration see run-to-run variation and drift, not process-start variation; their
  warm-up steps are warmer than the first run's (alike for every configuration; excluded anyway); a reserved peak
  could include blocks an earlier run still holds (each result's `process.cuda_alloc_at_start_bytes`, the bytes
  allocated when the run started, is 0 unless something leaked); on CPU, `VmHWM` after a reset still includes the
  heap an earlier run left, so CPU memory needs `run`.

Measurement rules shared by every script:
- CPU peak memory is the kernel's high-water mark of the measuring process itself (`VmHWM` in `/proc/self/status`,
  reset after construction by `clear_refs`), read inside the worker. (`ru_maxrss` of a fresh subprocess also counts
  the parent's peak, inherited at fork, so small shapes would all report the same value.)
- GPU peak memory: both `max_memory_allocated` and `max_memory_reserved` after a reset.
- Bytes are stored as bytes and reported in GiB (2**30) or MiB (2**20), named as such.
- Ratios to the baseline come with their spread: per-round paired ratios (median, min, max).
- In-loop component timings (`ComponentTimer`) add up the time spent inside named functions during the measured
  steps (process CPU time on CPU), which is far less sensitive to a shared machine than end-to-end step times.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import random
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------------
# Environment and machine description
# ---------------------------------------------------------------------------------------------------------------------


def worker_env(threads: int) -> dict[str, str]:
    """Environment of a measured subprocess: fixed thread counts, offline, quiet."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TRL_EXPERIMENTAL_SILENCE="1",
        TQDM_DISABLE="1",
        WANDB_DISABLED="true",
        TOKENIZERS_PARALLELISM="false",
        PYTHONHASHSEED="0",
    )
    # The package is imported from this checkout even when it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict[str, Any]:
    """Hardware and library versions, recorded in every result file."""
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg_1m_at_start": os.getloadavg()[0],
        "mem_total_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "device": device,
    }
    for name in ("peft", "numpy", "triton"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    try:
        import trl_tokenlevel

        info["trl_tokenlevel"] = getattr(trl_tokenlevel, "__version__", "unknown")
    except ImportError:
        pass
    info["git_commit"] = _git_commit()
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    """HEAD of the checkout (read-only), plus a marker when the working tree has changes; `BENCH_GIT_COMMIT` when the
    benchmark runs from an exported copy of a commit (no `.git`)."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10)  # fmt: skip
        if head.returncode != 0:
            return None
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Memory probes (Linux). Peak RSS is the kernel's high-water mark; it can be reset so that the peak of a phase
# (training) is measured apart from the construction peak (model loading, dataset tokenization).
# ---------------------------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size."""
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: best effort
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return kb * 1024


def peak_rss_bytes() -> int:
    """Peak RSS of this process since its start or the last `reset_peak_rss()`: `VmHWM` of `/proc/self/status`.

    Not `ru_maxrss`: after fork + exec the kernel carries the parent's high-water mark into the child's `ru_maxrss`, so
    a worker started by a large parent would report the parent's peak.
    """
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: best effort
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024
    return kb * 1024


def reset_peak_rss() -> bool:
    """Reset `VmHWM` to the current RSS (`echo 5 > /proc/self/clear_refs`); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def release_free_heap() -> None:
    """Return glibc's free heap pages to the OS (`malloc_trim(0)`), so that a following RSS peak counts new memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak memory of one phase (training), measured inside the process that runs it.

    `start()` after construction; `result()` at the end returns bytes: CPU `rss_before`, `rss_peak` (VmHWM since the
    reset) and `rss_peak_delta`; on CUDA also `cuda_alloc_before/peak/peak_delta` (`max_memory_allocated`) and
    `cuda_reserved_before/peak` (`max_memory_reserved`, what the caching allocator took from the device).
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self) -> None:
        gc.collect()
        release_free_heap()
        self.rss_before = rss_bytes()
        self.reset_ok = reset_peak_rss()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.alloc_before = torch.cuda.memory_allocated()
            self.reserved_before = torch.cuda.memory_reserved()

    def result(self) -> dict[str, Any]:
        peak = peak_rss_bytes()
        out = {"rss_before_bytes": self.rss_before, "rss_peak_bytes": peak, "rss_peak_delta_bytes": peak - self.rss_before,
               "peak_reset_ok": self.reset_ok, "cpu_peak_source": "VmHWM of the worker (/proc/self/status)"}  # fmt: skip
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            out.update(
                cuda_alloc_before_bytes=self.alloc_before,
                cuda_alloc_peak_bytes=torch.cuda.max_memory_allocated(),
                cuda_alloc_peak_delta_bytes=torch.cuda.max_memory_allocated() - self.alloc_before,
                cuda_reserved_before_bytes=self.reserved_before,
                cuda_reserved_peak_bytes=torch.cuda.max_memory_reserved(),
            )
        return out


# Memory keys reported per configuration: (result key, label). CPU keys are always there, CUDA keys on CUDA.
CPU_MEMORY_KEYS = (("rss_peak_bytes", "peak RSS"), ("rss_peak_delta_bytes", "peak RSS over construction"))
CUDA_MEMORY_KEYS = (
    ("cuda_alloc_peak_bytes", "peak allocated"),
    ("cuda_alloc_peak_delta_bytes", "peak allocated over construction"),
    ("cuda_reserved_peak_bytes", "peak reserved"),
)


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def mib(num_bytes: float) -> float:
    return num_bytes / 2**20


# ---------------------------------------------------------------------------------------------------------------------
# Step timing
# ---------------------------------------------------------------------------------------------------------------------


def make_step_timer(cuda: bool = False):
    """A `TrainerCallback` recording clock marks at each optimizer step's begin and end.

    `step_times()` are end-to-end intervals between consecutive step ends: they include fetching and collating the batch,
    forward/backward, the optimizer step and the previous step's logging, i.e. everything a user pays per step.
    `compute_times()` (begin -> end) and `data_times()` (previous end -> begin: logging plus batch fetch and collation;
    the Trainer fetches a step's batches before `on_step_begin`) split it. `cpu_step_times()` is the same interval in
    process CPU time (all threads): with one thread it is much less sensitive than wall time to other processes on a
    shared machine. On CUDA the marks synchronize the device (so CPU time there includes the wait).
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []
            self.train_begin: float | None = None
            self.cpu_train_begin: float | None = None

        def _now(self) -> float:
            if cuda:
                import torch

                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = self._now()
            self.cpu_train_begin = time.process_time()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(self._now())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(self._now())
            self.cpu_ends.append(time.process_time())

        @staticmethod
        def _intervals(marks: list[float], skip: int) -> list[float]:
            return [b - a for a, b in zip(marks[:-1], marks[1:])][skip:]

        def step_times(self, skip: int) -> list[float]:
            return self._intervals([self.train_begin, *self.ends], skip)

        def cpu_step_times(self, skip: int) -> list[float]:
            return self._intervals([self.cpu_train_begin, *self.cpu_ends], skip)

        def compute_times(self, skip: int) -> list[float]:
            return [e - b for b, e in zip(self.begins, self.ends)][skip:]

        def data_times(self, skip: int) -> list[float]:
            marks = [self.train_begin, *self.ends]
            return [b - e for e, b in zip(marks[:-1], self.begins)][skip:]

    return StepTimer()


class ComponentTimer:
    """In-loop component timings: time spent inside named functions during each optimizer step.

    `wrap(name, owner, attribute)` replaces `owner.attribute` (a function, a bound method, or the `forward`/`backward`
    staticmethod of an `autograd.Function`, which autograd looks up on the class at call time) with a timed version;
    times of all wrapped callables with the same name add up. It is also a `TrainerCallback`: each optimizer step's
    totals are recorded at the step's end, so `per_step(skip)` excludes the warm-up steps. The clock is process CPU
    time (all threads) on CPU, and wall time after `cuda.synchronize()` on CUDA (which adds synchronizations: use it
    on CUDA only where step times are not the measurement). A nested call of the same component counts once.
    """

    def __init__(self, cuda: bool = False):
        from transformers import TrainerCallback

        self.cuda = cuda
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._active: set[str] = set()
        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.current = {}

            def on_step_end(self, args, state, control, **kwargs):
                timer.steps.append(dict(timer.current))

        self.callback = _Callback()
        self._wrapped: list[tuple[Any, str, Any]] = []

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def wrap(self, name: str, owner: Any, attribute: str) -> None:
        raw = owner.__dict__.get(attribute, None) if isinstance(owner, type) else None
        function = raw.__func__ if isinstance(raw, staticmethod) else getattr(owner, attribute)
        self._wrapped.append((owner, attribute, raw if isinstance(raw, staticmethod) else function))
        timer = self

        def timed(*args, **kwargs):
            if name in timer._active:  # a nested call of the same component is already being timed
                return function(*args, **kwargs)
            timer._active.add(name)
            started = timer._now()
            try:
                return function(*args, **kwargs)
            finally:
                timer.current[name] = timer.current.get(name, 0.0) + timer._now() - started
                timer._active.discard(name)

        setattr(owner, attribute, staticmethod(timed) if isinstance(raw, staticmethod) else timed)

    def restore(self) -> None:
        """Put back what `wrap` replaced (a worker that measures several runs wraps classes and modules again)."""
        for owner, attribute, original in reversed(self._wrapped):
            setattr(owner, attribute, original)
        self._wrapped.clear()

    def per_step(self, skip: int) -> dict[str, list[float]]:
        """`{name: [seconds per measured step]}` (0 for steps where a component did not run)."""
        steps = self.steps[skip:]
        names = sorted({name for step in steps for name in step})
        return {name: [step.get(name, 0.0) for step in steps] for name in names}


# ---------------------------------------------------------------------------------------------------------------------
# Statistics, ordering, subprocesses
# ---------------------------------------------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, float]:
    """Median and spread (quartiles, min, max, relative IQR) of a sample."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    median = statistics.median(ordered)
    return {
        "n": len(ordered),
        "median": median,
        "p25": q1,
        "p75": q3,
        "min": ordered[0],
        "max": ordered[-1],
        "rel_iqr": (q3 - q1) / median if median else 0.0,
    }


def aggregate_runs(runs: dict[str, list[dict]], baseline: str = "stock") -> dict[str, dict]:
    """Per configuration: every time series pooled over rounds (median, quartiles) with its per-round medians, every
    memory value (median, min, max over rounds), and ratios to `baseline` with their spread.

    A run result holds `times` (`{key: [seconds per measured step]}`), `memory` (`MemoryProbe.result()`) and
    `load_avg_before`; `runs[name][i]` is round i (every round runs every configuration, so rounds pair up).
    Time ratios: `pooled` (ratio of pooled medians) and the per-round paired ratios (`paired_median`, `paired_min`,
    `paired_max`); memory ratios: ratio of medians and per-round ratios.
    """
    per_config: dict[str, dict] = {}
    for name, results in runs.items():
        keys = sorted({key for r in results for key in r["times"]})
        times = {}
        for key in keys:
            pooled = [v for r in results for v in r["times"].get(key, [])]
            times[key] = {**summarize(pooled),
                          "round_medians": [statistics.median(r["times"][key]) if r["times"].get(key) else 0.0
                                            for r in results]}  # fmt: skip
        memory = {}
        for key in results[0]["memory"]:
            if key.endswith("_bytes"):
                values = [r["memory"][key] for r in results]
                memory[key] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                               "runs": values}  # fmt: skip
        per_config[name] = {"times": times, "memory": memory, "load_avg_1m": [r["load_avg_before"] for r in results],
                            "rounds": len(results)}  # fmt: skip
    base = per_config[baseline]
    for entry in per_config.values():
        ratios: dict[str, dict] = {}
        for key, series in entry["times"].items():
            reference = base["times"].get(key)
            if not reference or not reference["median"]:
                continue
            paired = [a / b for a, b in zip(series["round_medians"], reference["round_medians"]) if b]
            ratios[key] = {"pooled": series["median"] / reference["median"], **_spread(paired)}
        for key, values in entry["memory"].items():
            reference = base["memory"].get(key)
            if not reference or not reference["median"]:
                continue
            paired = [a / b for a, b in zip(values["runs"], reference["runs"]) if b]
            ratios[key] = {"pooled": values["median"] / reference["median"], **_spread(paired)}
        entry["ratios"] = ratios
    return per_config


def _spread(paired: list[float]) -> dict[str, float]:
    if not paired:
        return {}
    return {"paired_median": statistics.median(paired), "paired_min": min(paired), "paired_max": max(paired),
            "paired_rounds": paired}  # fmt: skip


def ratio_cell(ratio: dict | None) -> str:
    """`1.234x (1.20-1.26)`: the pooled ratio and the min-max of the per-round paired ratios."""
    if not ratio:
        return "-"
    if "paired_min" not in ratio or ratio["paired_min"] == ratio["paired_max"]:
        return f"{ratio['pooled']:.3f}x"
    return f"{ratio['pooled']:.3f}x ({ratio['paired_min']:.2f}-{ratio['paired_max']:.2f})"


def apply_presets(args, presets: dict[str, dict]) -> None:
    """Fill every argument left unset (None) on the command line from the device's preset."""
    for key, value in presets[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def parse_sweep(spec: str | None, default: tuple[int, int]) -> list[tuple[int, int]]:
    """`"2x256,4x512"` -> `[(2, 256), (4, 512)]` (batch x sequence); `None` -> `[default]`."""
    if not spec:
        return [default]
    shapes = []
    for item in spec.split(","):
        try:
            batch, length = (int(part) for part in item.lower().split("x"))
        except ValueError:
            message = f"--sweep expects BATCHxLENGTH items separated by commas (e.g. 2x256,4x512), got {item!r}"
            raise SystemExit(message) from None
        shapes.append((batch, length))
    return shapes


def round_orders(configs: list[str], rounds: int) -> list[list[str]]:
    """Configuration order per round: rotate by one each round and reverse every other round (ABCD, DCBA-like)."""
    orders = []
    for r in range(rounds):
        shift = r % len(configs)
        order = configs[shift:] + configs[:shift]
        orders.append(order[::-1] if r % 2 else order)
    return orders


def measure_rounds(pool, entry: dict, configs: list[str], rounds: int, payload_for, on_round=None,
                   summarize=aggregate_runs) -> None:  # fmt: skip
    """Measure one shape into `entry`: `rounds` rounds of every configuration in alternating order (`round_orders`),
    each run `pool.run(payload_for(name, round_index))`, one line printed per run. `entry` gets `orders` and `runs`
    (`runs[name][i]` is round i) and, after every round, `configs` = `summarize(runs)` and `rounds_done`; then
    `on_round()`, if given, is called (e.g. to write the partial JSON)."""
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    orders = round_orders(configs, rounds)
    entry.update(orders=orders, configs={}, runs=runs, rounds_done=0)
    for round_index, order in enumerate(orders):
        for name in order:
            result = pool.run(payload_for(name, round_index))
            runs[name].append(result)
            times, memory = result["times"], result.get("memory", {})
            peak = memory.get("cuda_alloc_peak_bytes", memory.get("rss_peak_bytes"))
            print(f"    round {round_index} {name:20s} step {1e3 * statistics.median(times['step_s']):8.1f} ms  cpu "
                  f"{1e3 * statistics.median(times['cpu_step_s']):8.1f} ms"
                  + ("" if peak is None else f"  peak {peak / 2**30:.3f} GiB")
                  + f"  load {result['load_avg_before']:.2f}", file=sys.stderr)  # fmt: skip
        entry["configs"] = summarize(runs)
        entry["rounds_done"] = round_index + 1
        if on_round is not None:
            on_round()


WORKER_SCOPES = ("run", "config")


def default_worker_scope(device: str) -> str:
    """`config` on CUDA (process starts dominate a GPU suite), `run` on CPU (one VmHWM per process)."""
    return "config" if device == "cuda" else "run"


def add_worker_scope_argument(parser) -> None:
    parser.add_argument(
        "--worker-scope",
        choices=WORKER_SCOPES,
        help="'run': a fresh worker process per measured run (configuration x round x shape); 'config': one fresh\n"
        "process per configuration that measures all its rounds and shapes in turn (default: config on\n"
        "CUDA, run on CPU; see bench/common.py)",
    )


class WorkerPool:
    """Measured runs in worker processes: `run(payload)` returns the result dict the worker wrote to
    `payload['result_path']`, with `process` added (the worker's pid, the index of the run in that process, and the
    CUDA memory still allocated when the run started: 0 unless an earlier run leaked).

    `scope="run"`: every run starts a fresh interpreter (`script --worker PAYLOAD.json`; output in
    `<result_path>.log`). `scope="config"`: each configuration gets one interpreter (`script --worker -`, `serve()`),
    kept for all its runs (rounds, shapes), which it receives as payload paths on stdin (output in
    `<config>.worker.log`). `start(configs)` launches them all at once, so that their imports and CUDA start-up
    overlap each other and the parent's model building; the first run waits until all are ready; idle workers wait
    blocked on stdin; one run at a time in the whole pool. No two configurations ever share a process. Workers die
    with the parent (`PR_SET_PDEATHSIG`), and `close()` ends them, so a benchmark stopped by a timeout leaves none.
    """

    def __init__(self, script: Path, env: dict[str, str], scope: str = "run", timeout: float | None = None,
                 cuda: bool = False):  # fmt: skip
        if scope not in WORKER_SCOPES:
            raise ValueError(f"scope must be one of {WORKER_SCOPES}, got {scope!r}")
        self.script, self.scope, self.timeout = script, scope, timeout
        self.env = {**env, "BENCH_WORKER_CUDA": "1" if cuda else "0", "BENCH_PARENT_PID": str(os.getpid())}
        self.workers: dict[str, dict[str, Any]] = {}  # config -> {"proc", "log", "runs", "ready"}

    def _popen(self, target: str, log, stdin=None, stdout=None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(self.script), "--worker", target], env=self.env, stdin=stdin,
                                stdout=stdout or log, stderr=log, cwd=REPO_ROOT, text=True)  # fmt: skip

    def start(self, configs: list[str], log_dir: Path) -> None:
        """Launch the kept workers of `configs` now (scope `config`; a no-op for `run`)."""
        if self.scope != "config":
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        for config in configs:
            if config not in self.workers:
                log = open(log_dir / f"{config}.worker.log", "w")  # noqa: SIM115 (closed in close())
                proc = self._popen("-", log, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                self.workers[config] = {"proc": proc, "log": log, "runs": 0, "ready": False}

    def run(self, payload: dict[str, Any]) -> dict:
        result_path = Path(payload["result_path"])
        payload_path = result_path.with_suffix(".payload.json")
        payload_path.write_text(json.dumps(payload))
        if self.scope == "run":
            process = self._run_fresh(payload, payload_path, result_path)
        else:
            process = self._run_kept(payload["config"], payload_path, result_path)
        result = json.loads(result_path.read_text())
        result["process"] = process
        return result

    def _run_fresh(self, payload: dict, payload_path: Path, result_path: Path) -> dict:
        log_path = result_path.with_suffix(".log")
        with open(log_path, "w") as log:
            proc = self._popen(str(payload_path), log)
            try:
                returncode = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        if returncode != 0 or not result_path.exists():
            raise RuntimeError(f"worker {payload.get('config')} failed (exit {returncode}); log tail:\n"
                               f"{log_path.read_text()[-4000:]}")  # fmt: skip
        return {"pid": proc.pid, "run_index": 0, "cuda_alloc_at_start_bytes": 0}

    def _run_kept(self, config: str, payload_path: Path, result_path: Path) -> dict:
        self.start([config], result_path.parent)
        for name, other in list(self.workers.items()):  # no worker may be starting up while a run is measured
            if not other["ready"]:
                self._reply(name)
                other["ready"] = True
        worker = self.workers[config]
        worker["proc"].stdin.write(f"{payload_path}\n")
        worker["proc"].stdin.flush()
        reply = self._reply(config)
        worker["runs"] += 1
        return {"pid": worker["proc"].pid, "run_index": worker["runs"] - 1, **reply}

    def _reply(self, config: str) -> dict:
        """The worker's next reply line; on timeout or exit, kill it and raise with its log's tail."""
        worker = self.workers[config]
        proc = worker["proc"]
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
        line = proc.stdout.readline() if ready else None
        if line:
            return json.loads(line)
        proc.kill()
        proc.wait()
        worker["log"].close()
        del self.workers[config]
        tail = Path(worker["log"].name).read_text()[-4000:]
        if line is None:
            raise subprocess.TimeoutExpired(proc.args, self.timeout, output=tail)
        raise RuntimeError(f"worker {config} failed (exit {proc.returncode}); log tail:\n{tail}")

    def close(self, kill: bool = False) -> None:
        """End the kept workers: close their stdin (they exit), or kill them (`kill`, or after 30 s)."""
        for worker in self.workers.values():
            proc = worker["proc"]
            if kill:
                proc.kill()
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            worker["log"].close()
        self.workers.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None)


def _die_with_parent() -> None:
    """In a worker started by a `WorkerPool` (Linux): get SIGKILL when the parent dies, whatever kills it."""
    parent = os.environ.get("BENCH_PARENT_PID")
    if parent is None:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the prctl
        os._exit(1)


def start_benchmark(name: str, args) -> tuple[Path, Path] | None:
    """The parent's start shared by the benchmarks: SIGTERM runs `finally` blocks (`exit_on_sigterm`); `--device cuda`
    without CUDA skips the benchmark (None); progress bars off; the JSON path (`--out`, else
    `bench/results/<name>_<device>.json`) and the working folder (`--workdir`, else a fresh temporary one)."""
    exit_on_sigterm()
    import datasets
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: --device cuda requested but CUDA is not available; skipping.", file=sys.stderr)
        return None
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"{name}_"))
    workdir.mkdir(parents=True, exist_ok=True)
    return args.out or RESULTS_DIR / f"{name}_{args.device}.json", workdir


def exit_on_sigterm() -> None:
    """Turn SIGTERM (what `timeout` sends) into `SystemExit`, so that `finally` and `with` blocks end the workers."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def worker_main(target: str | Path, measure, warm_up=None) -> int:
    """Entry of a worker process: `--worker PAYLOAD.json` measures one run; `--worker -` serves runs (`serve`)."""
    _die_with_parent()
    if str(target) != "-":
        return measure(Path(target))
    return serve(measure, warm_up)


def serve(measure, warm_up=None) -> int:
    """Measure the runs whose payload paths arrive on stdin, one at a time, in this one process.

    First `warm_up()` (the imports a run needs) and, when the pool asks for it (`BENCH_WORKER_CUDA=1`), the CUDA
    context, then one reply line: ready. Before and after each run: drop every reference (`gc.collect()`), return
    the caching allocator's free blocks and cuBLAS's workspaces to the device; then one JSON reply line with the CUDA
    memory still allocated when the run started. Replies go to the original stdout; anything else the process prints
    goes to stderr (the log). Each run builds its trainer from the saved checkpoint again (fresh weights and optimizer
    state), and `MemoryProbe.start()` resets the peaks after construction, as in a fresh process.
    """
    sys.stdout.flush()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library output goes to the log, never into the reply channel
    if warm_up is not None:
        warm_up()
    if os.environ.get("BENCH_WORKER_CUDA") == "1":
        import torch

        torch.cuda.init()
        torch.cuda.synchronize()  # creates the context; allocates nothing
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        left = _release_cuda_memory()
        measure(Path(line.strip()))
        _release_cuda_memory()
        replies.write(json.dumps({"cuda_alloc_at_start_bytes": left}) + "\n")
    return 0


def _release_cuda_memory() -> int:
    """Free what earlier runs left (objects, cached blocks, cuBLAS workspaces); return the bytes still allocated."""
    gc.collect()
    if "torch" not in sys.modules:
        return 0
    import torch

    if not torch.cuda.is_initialized():
        return 0
    torch.cuda.synchronize()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data: pseudo-words, a byte-level BPE tokenizer trained on them in memory, rows of controlled token length
# ---------------------------------------------------------------------------------------------------------------------


def pseudo_words(count: int, seed: int) -> list[str]:
    """`count` distinct lowercase pseudo-words of 3-8 letters."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 8))))
    return sorted(words)


def build_word_tokenizer(words: list[str], vocab_size: int, seed: int):
    """A byte-level BPE tokenizer (`trl_tokenlevel.tiny.build_tiny_tokenizer`) trained on sentences of `words`."""
    from trl_tokenlevel.tiny import build_tiny_tokenizer

    rng = random.Random(seed)
    corpus = [" ".join(rng.choices(words, k=64)) for _ in range(max(200, 4 * len(words) // 64))]
    return build_tiny_tokenizer(corpus, vocab_size=vocab_size)


def synthetic_preference_rows(
    tokenizer, words: list[str], num_rows: int, prompt_tokens: int, completion_tokens: int, seed: int,
    edit_rate: float = 0.05,
) -> list[dict[str, str]]:  # fmt: skip
    """Rows `{prompt, chosen, rejected}` with about `prompt_tokens` / `completion_tokens` tokens each.

    The rejected completion is the chosen one with a fraction `edit_rate` of its words replaced (like the built-in tiny
    dataset, where chosen and rejected differ in a few tokens), then topped up or cut to the same token budget.
    Token counts are exact up to the last word (byte-level pre-tokenization splits at spaces); callers truncate with
    `max_length`.
    """
    rng = random.Random(seed)
    cost = {}

    def tokens_of(word: str) -> int:
        if word not in cost:
            cost[word] = len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        return cost[word]

    def fill(budget: int, start: list[str] | None = None) -> list[str]:
        out, used = [], 0
        for word in start or []:
            if used + tokens_of(word) > budget:
                return out
            out.append(word)
            used += tokens_of(word)
        while used < budget:
            word = rng.choice(words)
            out.append(word)
            used += tokens_of(word)
        return out

    rows = []
    for _ in range(num_rows):
        prompt = fill(max(prompt_tokens - 3, 1))  # "Q:" and "\nA:" take a few tokens
        chosen = fill(completion_tokens)
        rejected = [rng.choice(words) if rng.random() < edit_rate else word for word in chosen]
        rejected = fill(completion_tokens, start=rejected)
        rows.append({
            "prompt": "Q: " + " ".join(prompt) + "\nA:",
            "chosen": " " + " ".join(chosen),
            "rejected": " " + " ".join(rejected),
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path
