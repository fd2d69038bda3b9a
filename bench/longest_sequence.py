"""The longest sequence that fits in a fixed memory budget: TDPO2 against stock DPO at the same batch (issue 13).

Configurations (`dpo_memory.CONFIGS`, built by `dpo_memory.build_trainer`: same model init, data and optimizer):

    stock           trl.DPOTrainer
    tdpo2           TokenDPOTrainer(token_loss_type="tdpo2", token_kernel="torch")   the fused pass (`ops.fused`)
    tdpo2_triton    ... token_kernel="triton"                                        the fused pass in Triton (CUDA)
    tdpo2_twopass   ... token_kernel="trl"                     TRL's log-prob head twice + TRL's chunked divergence

For each configuration: the longest `max_length` (prompt + completion, a multiple of `--granularity`, at most
`--max-length`) at which `--batch` preference pairs per step train for `--steps` optimizer steps (2: the second
step's backward holds the AdamW state, the first's does not) without running out of memory. Each probe is a fresh
worker process (an out-of-memory error poisons a process's allocator).

The memory budget `--memory-cap-gib`:
  * CUDA, a real cap: the worker calls `torch.cuda.set_per_process_memory_fraction(cap / total)`, so the caching
    allocator raises `torch.OutOfMemoryError` past the cap. That error (or a worker that died of it, read from its
    log) means "does not fit"; any other failure is an error that stops that configuration's search and is reported.
  * CPU, an EMULATION: nothing runs out of memory. The worker measures its own peak RSS over construction (`VmHWM`,
    reset after the trainer is built, as in `bench/common.py`) and a probe "fits" when that peak is at most the cap.
    It exercises the search and the workers; the claim itself is the CUDA measurement. The CPU peak varies between
    runs by up to ~0.06 GiB at this size (stock at 512 tokens: 0.456 and 0.521 GiB in two runs), so a CPU answer
    near the cap can move by one granularity step.

Worker layouts (`--worker-scope`, as in `bench/common.py`):
  * "run" (CPU default): every probe in a fresh worker process, the searches below sharing `--parallel` slots.
  * "config" (CUDA default): one kept worker process per configuration, all started at once, each probing its own
    lengths one after the other (a cold search for every configuration, all configurations at the same time, each
    process under its own cap). A run that runs out of memory is caught inside the worker, which drops every
    reference and returns the allocator's blocks before the next probe (as `accelerate.find_executable_batch_size`
    retries in-process); each probe records the CUDA memory still allocated when it started
    (`process.cuda_alloc_at_start_bytes`, 0 unless something leaked). A worker that dies is replaced for the next
    probe. This pays the interpreter and CUDA start-up once per configuration instead of once per probe: on a GPU
    that start-up (~15-20 s) is most of a probe's cost.

Every row is really `max_length` tokens long (rows are built longer and TRL truncates them): the worker records
every collated sequence's token count and fails the probe if any differs from the probed length (padding or short
rows would hide memory growth; equal lengths also keep SDPA on its mask-free causal kernel).

The search (`search_longest`), in units of `--granularity`, assuming that fitting is monotone in the length:
  * stock, cold: lengths double from `--start` until the first failure, then bisect between the longest fit and the
    shortest failure; `--parallel` probes run at once (CUDA: several capped workers share the GPU; their decisions do
    not depend on each other, the cap is per process), which turns bisection into a k-ary split.
  * the other configurations, warm, all at once: the first probes are stock's longest length L and L + granularity
    (equal to stock: two probes), then the step doubles away from L up or down, then bisection.
  * `--budget-s` bounds the whole run (model building included): no probe starts with less time left than the
    quickest probe so far took, a running probe is killed at the deadline, and the bounds found so far are written
    as partial (`complete: false`, `stopped_by: "budget"`). The JSON is also written after stock's search.
Results: per configuration every probe (length, outcome, wall seconds, peak allocated/reserved bytes on CUDA or
`VmHWM` over construction on CPU, the collated sequence lengths), the longest fitting length, the shortest failing
one, and the ratio of the longest fitting length to stock's.

    python bench/longest_sequence.py                                   # CPU emulation, tiny model (~1-2 min)
    python bench/longest_sequence.py --device cuda                     # Qwen2.5-0.5B shape, bf16, grad ckpt, 12 GiB
    python bench/longest_sequence.py --device cuda --batch 1 --memory-cap-gib 8 --granularity 2048 --start 8192 \
        --budget-s 55                                                   # bench/gpu_suite.sh's short form

GPU wall time (estimated, not yet measured): the H200 run of `dpo_memory` at this shape (November, an older commit:
bench/results/dpo_memory_cuda_h200.log) took 9-13 s to construct a trainer the first time in a process, 1.4-4.7 s for
the first step and 0.21-0.25 s per further step of 4 pairs x 1024 tokens; stock's peak was ~1.9 GiB of weights (policy
+ reference) + ~2.8 GiB of gradients and AdamW state + ~0.13 MiB per token. So under a 12 GiB cap stock should fit ~7k
tokens at 4 pairs (~2 s per step), and under gpu_suite.sh's 8 GiB at 1 pair ~11-12k tokens (~0.6 s per step).
Kept workers ("config", the CUDA default): ~15-20 s of start-up, overlapped with the model building, then per probe
~1-2 s to rebuild the trainer plus the steps, slowed ~2x by the other configurations' workers sharing the GPU; a cold
search from 8192 with granularity 2048 takes ~4 probes (8k, 16k, 12k, then 10k or 14k): about 20 + 4 x 10 = 60 s.
With fresh workers ("run"): one round of up to 5 concurrent probes ~25-40 s, stock ~3 rounds, the others 1-2 more if
they equal stock (up to ~4 if not), plus ~30 s of model building: 2.5-4 minutes. `--budget-s` bounds either (CUDA
default 270 s; gpu_suite.sh gives it 55 s and accepts partial bounds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO_ROOT,
    WORKER_SCOPES,
    WorkerPool,
    apply_presets,
    build_word_tokenizer,
    format_table,
    machine_info,
    pseudo_words,
    start_benchmark,
    synthetic_preference_rows,
    worker_env,
    worker_main,
    write_json,
)
from dpo_bench import import_trainers, measured_training, prepare_worker, save_random_qwen2  # noqa: E402
from dpo_memory import CONFIGS as DPO_MEMORY_CONFIGS  # noqa: E402
from dpo_memory import PRESETS as DPO_MEMORY_PRESETS  # noqa: E402
from dpo_memory import build_trainer  # noqa: E402

CONFIGS = {name: DPO_MEMORY_CONFIGS[name] for name in ("stock", "tdpo2", "tdpo2_triton", "tdpo2_twopass")}
DEFAULT_CONFIGS = {"cpu": "stock,tdpo2,tdpo2_twopass", "cuda": "stock,tdpo2,tdpo2_triton,tdpo2_twopass"}

SHAPE_KEYS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tokenizer_vocab", "dtype",
              "gradient_checkpointing")  # fmt: skip
# CUDA: dpo_memory's Qwen2.5-0.5B shape (random weights, bf16, gradient checkpointing) at its 4 pairs per step.
# CPU: a tiny model (1.5M parameters, fp32) at 1 pair per step; its peak RSS over construction grows from ~0.2 to
# ~0.6-1.2 GiB between 256 and 2048 tokens, so the 0.45 GiB emulated cap falls inside the searched range.
PRESETS = {
    "cpu": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=8192, tokenizer_vocab=4096,
                dtype="float32", gradient_checkpointing=False, batch=1, granularity=256, max_length=2048, start=256,
                memory_cap_gib=0.45, threads=1, parallel=1, budget_s=600.0, worker_scope="run"),
    "cuda": dict(**{key: DPO_MEMORY_PRESETS["cuda"][key] for key in (*SHAPE_KEYS, "batch")}, granularity=512,
                 max_length=32768, start=2048, memory_cap_gib=12.0, threads=2, parallel=0, budget_s=270.0,
                 worker_scope="config"),
}  # fmt: skip

# Probe outcomes. "fit": trained `--steps` steps within the cap. Does not fit: "oom" (CUDA: the capped allocator
# raised torch.OutOfMemoryError) or "over_cap" (CPU emulation: peak RSS over construction above the cap). Anything
# else stops that configuration's search: "error" (reported with the worker's log), "timeout" (killed at the budget).
FIT = "fit"
DOES_NOT_FIT = ("oom", "over_cap")
# Markers of an out-of-memory failure in the log of a worker that died without writing its result.
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


# ---------------------------------------------------------------------------------------------------------------------
# The search (pure: unit-tested on synthetic "fits(length)" functions)
# ---------------------------------------------------------------------------------------------------------------------


def gallop_points(anchor: int, max_units: int, *, doubling: bool) -> tuple[list[int], list[int]]:
    """`(upward, downward)` probe sequences from `anchor`, in units, within 1..max_units.

    `doubling` (cold start): lengths double up (anchor, 2 anchor, 4 anchor, ...) and halve down. Otherwise (warm
    start from a known answer): the distance from the anchor doubles (anchor, +1, +3, +7, ... and -1, -3, -7, ...),
    so that "equal to the anchor" costs two probes. Each list ends at its bound (max_units, 1).
    """
    upward, downward = [], []
    step = 0
    while True:
        point = anchor * 2**step if doubling else anchor + 2**step - 1
        upward.append(min(point, max_units))
        if point >= max_units:
            break
        step += 1
    step = 1
    while anchor > 1:
        point = anchor // 2**step if doubling else anchor - (2**step - 1)
        downward.append(max(point, 1))
        if point <= 1:
            break
        step += 1
    return upward, downward


def next_probes(lo: int, hi: int | None, probed: set[int], upward: list[int], downward: list[int],
                width: int) -> list[int]:  # fmt: skip
    """Up to `width` lengths (units) to probe next, given the longest fit `lo` (0: none yet) and the shortest failure
    `hi` (None: none yet); [] when the search is over."""
    if hi is not None and hi - lo <= 1:
        return []  # bracketed (lo == 0, hi == 1: nothing fits)
    if hi is None and upward and lo >= upward[-1]:
        return []  # everything up to the maximum fits
    if not probed:  # first round: the anchor first, then alternately up and down
        order = [upward[0]] + [p for pair in zip(upward[1:], downward) for p in pair]
        order += upward[1 + len(downward):] + downward[len(upward) - 1:]  # fmt: skip
        return list(dict.fromkeys(order))[:width]
    if hi is None:
        return [p for p in upward if p > lo and p not in probed][:width]
    if lo == 0:
        return [p for p in downward if p < hi and p not in probed][:width]
    gap = hi - lo
    count = min(width, gap - 1)
    return sorted({lo + round(i * gap / (count + 1)) for i in range(1, count + 1)})


def search_longest(
    probe: Callable[[list[int]], list[str]], *, max_units: int, width: int = 1, start: int = 1,
    guess: int | None = None, out_of_time: Callable[[], bool] = lambda: False,
) -> dict:  # fmt: skip
    """Longest length n in 1..max_units (units of the granularity) with `probe([n]) == ["fit"]`.

    Assumes fitting is monotone (if n fits, every shorter length fits); a fit above a failure is recorded as
    `monotone: False` and the bounds keep to the failure. `probe(lengths)` runs one round (the lengths may run
    concurrently) and returns one outcome per length: "fit", a `DOES_NOT_FIT` outcome, or anything else (an error),
    which stops the search. `guess` (another configuration's answer) starts warm; otherwise lengths double from
    `start`. `out_of_time()` is asked before every round; when it says so the search stops with partial bounds.

    Returns `longest` (units, 0 if nothing fits), `shortest_failing` (None if none failed), `complete`,
    `stopped_by` (None, "budget" or the stopping outcome), `reached_max`, `monotone`, `rounds` and `outcomes`
    ({units: outcome}, in probing order).
    """
    if guess is not None and guess >= 1:
        upward, downward = gallop_points(min(guess, max_units), max_units, doubling=False)
    else:
        upward, downward = gallop_points(max(1, min(start, max_units)), max_units, doubling=True)
    outcomes: dict[int, str] = {}
    lo, hi, rounds, stopped_by = 0, None, 0, None
    while True:
        lengths = next_probes(lo, hi, set(outcomes), upward, downward, width)
        if not lengths:
            break
        if out_of_time():
            stopped_by = "budget"
            break
        results = probe(lengths)
        rounds += 1
        outcomes.update(zip(lengths, results))
        failures = [n for n, outcome in outcomes.items() if outcome in DOES_NOT_FIT]
        hi = min(failures, default=None)
        lo = max((n for n, outcome in outcomes.items() if outcome == FIT and (hi is None or n < hi)), default=0)
        stops = [outcome for outcome in results if outcome != FIT and outcome not in DOES_NOT_FIT]
        if stops:  # an error is reported as such; a probe killed at the deadline means the budget ran out
            stopped_by = "error" if "error" in stops else "budget" if out_of_time() else stops[0]
            break
    monotone = not any(outcome == FIT and hi is not None and n > hi for n, outcome in outcomes.items())
    return {
        "longest": lo,
        "shortest_failing": hi,
        "complete": stopped_by is None,
        "stopped_by": stopped_by,
        "reached_max": hi is None and lo == max_units,
        "monotone": monotone,
        "rounds": rounds,
        "outcomes": outcomes,
    }


def slot_widths(parallel: int, count: int) -> list[int]:
    """`parallel` concurrent probes shared by `count` searches running together (each at least one)."""
    return [max(1, parallel // count + (i < parallel % count)) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--configs", help=f"comma-separated subset of {list(CONFIGS)} (must include stock)")
    shape = parser.add_argument_group("shape (defaults depend on --device; see PRESETS)")
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tokenizer_vocab"):
        shape.add_argument("--" + key.replace("_", "-"), type=int)
    shape.add_argument("--dtype", choices=["float32", "bfloat16"])
    shape.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    shape.add_argument("--batch", type=int, help="preference pairs per step (2x sequences), the same for every probe")
    shape.add_argument(
        "--prompt-frac", type=float, default=0.25, help="share of each probed length taken by the prompt"
    )
    search = parser.add_argument_group("search")
    search.add_argument(
        "--memory-cap-gib",
        type=float,
        help="CUDA: per-process allocator cap; CPU: emulated cap on peak RSS over construction",
    )
    search.add_argument("--granularity", type=int, help="probed lengths are multiples of this many tokens")
    search.add_argument("--max-length", type=int, help="longest length probed (rounded down to the granularity)")
    search.add_argument("--start", type=int, help="first length of stock's doubling search (tokens)")
    search.add_argument("--steps", type=int, default=2, help="optimizer steps a probe must complete (>= 2)")
    search.add_argument("--parallel", type=int,
                        help="probes running at once (CUDA default 0 = as many capped workers as the GPU holds, at\n"
                        "most 6; CPU default 1)")  # fmt: skip
    search.add_argument("--budget-s", type=float, help="wall-clock bound of the whole run (partial bounds after it)")
    search.add_argument("--probe-timeout", type=float, default=600.0, help="wall-clock bound of one probe")
    search.add_argument("--worker-scope", choices=WORKER_SCOPES,
                        help="'run': every probe in a fresh process (CPU default: one VmHWM per process), searches\n"
                        "sharing --parallel slots; 'config' (CUDA default): one kept process per configuration\n"
                        "probes its lengths in turn, all configurations at once (see the module docstring)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch/OMP threads per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/longest_sequence_<device>.json)")
    parser.add_argument("--workdir", type=Path, help="keep model/data/logs here instead of a temporary directory")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    apply_presets(args, PRESETS)
    args.tokenizer_vocab = min(args.tokenizer_vocab, args.vocab)
    args.configs = [c.strip() for c in (args.configs or DEFAULT_CONFIGS[args.device]).split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or "stock" not in args.configs:
        parser.error(f"--configs must include 'stock' and name only {list(CONFIGS)}; got unknown {unknown}")
    if args.device == "cpu" and "tdpo2_triton" in args.configs:
        parser.error("tdpo2_triton (token_kernel='triton') needs CUDA; drop it from --configs on CPU")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first optimizer step allocates the AdamW state)")
    if args.granularity < 16 or args.max_length < args.granularity:
        parser.error(f"need --granularity >= 16 and --max-length >= --granularity, got {args.granularity} and "
                     f"{args.max_length}")  # fmt: skip
    if args.memory_cap_gib <= 0 or args.budget_s <= 0:
        parser.error("--memory-cap-gib and --budget-s must be positive")
    return args


def auto_parallel(args) -> int:
    """Concurrent capped workers: CUDA, as many as the free GPU memory holds with 1.5 GiB per worker of context and
    slack (at most 6, and at most the CPU cores / --threads); CPU, 1."""
    if args.parallel:
        return args.parallel
    if args.device != "cuda":
        return 1
    import torch

    free, _ = torch.cuda.mem_get_info()
    by_memory = int((free / 2**30 - 2.0) // (args.memory_cap_gib + 1.5))
    by_cpu = max(1, (os.cpu_count() or 1) // args.threads)
    return max(1, min(6, by_memory, by_cpu))


class ProbeRunner:
    """Builds each probed length's rows once and runs probe workers until the deadline: each probe in a fresh process
    (`pools` None), or in its configuration's kept process (`pools`: one `common.WorkerPool` per configuration)."""

    def __init__(self, args, workdir: Path, tokenizer, words: list[str], model_path: str, deadline: float,
                 pools: dict[str, WorkerPool] | None = None):  # fmt: skip
        self.args, self.workdir, self.tokenizer, self.words = args, workdir, tokenizer, words
        self.model_path, self.deadline, self.pools = model_path, deadline, pools
        self.env = worker_env(args.threads)
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(args.parallel)  # at most --parallel workers at once, in all searches
        self.data_paths: dict[int, str] = {}
        self.count = 0
        self.shortest_probe_s = 0.0  # the quickest finished probe so far: no probe starts with less time left

    def out_of_time(self) -> bool:
        return time.monotonic() + self.shortest_probe_s >= self.deadline

    def data_path(self, length: int) -> str:
        """Rows of `length` tokens or more (prompt `--prompt-frac` of it; the collator truncates to `length`)."""
        with self.lock:  # one tokenizer, shared by the probing threads
            if length not in self.data_paths:
                from datasets import Dataset

                prompt_tokens = max(4, int(length * self.args.prompt_frac))
                completion_tokens = length - prompt_tokens + 16 + length // 64  # over-long: truncation makes it exact
                rows = synthetic_preference_rows(self.tokenizer, self.words, self.args.batch * self.args.steps,
                                                 prompt_tokens, completion_tokens, self.args.seed)  # fmt: skip
                path = self.workdir / "data" / str(length)
                Dataset.from_list(rows).save_to_disk(str(path))
                self.data_paths[length] = str(path)
            return self.data_paths[length]

    def probe(self, name: str, length: int) -> dict:
        """One worker for `name` at `length` tokens; its result with `outcome`, `length` and `wall_s`."""
        args = self.args
        with self.lock:
            self.count += 1
            tag = f"{self.count:03d}_{name}_{length}"
        runs = self.workdir / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": name,
            **CONFIGS[name],
            "paths": {"model": self.model_path},
            "data_path": self.data_path(length),
            "seq_len": length,
            "batch": args.batch,
            "warmup": 0,
            "steps": args.steps,
            "logging_steps": 1,
            "seed": args.seed,
            "threads": args.threads,
            "dtype": args.dtype,
            "gradient_checkpointing": args.gradient_checkpointing,
            "device": args.device,
            "components": False,
            "round": 0,
            "cap_bytes": int(args.memory_cap_gib * 2**30),
            "output_dir": str(runs / tag),
            "result_path": str(runs / f"{tag}.json"),
        }
        with self.slots:
            timeout = min(args.probe_timeout, self.deadline - time.monotonic())
            if self.out_of_time():
                timeout = 0  # it could not finish
            started = time.monotonic()
            if self.pools is None:
                result = run_probe(Path(__file__).resolve(), payload, self.env, timeout)
            else:
                result = run_kept_probe(self.pools[name], payload, timeout)
            result.update(length=length, wall_s=round(time.monotonic() - started, 2))
        if result["outcome"] == FIT or result["outcome"] in DOES_NOT_FIT:
            with self.lock:
                self.shortest_probe_s = min(self.shortest_probe_s or math.inf, result["wall_s"])
        shown = {key: result[key] for key in ("peak_gib", "sequence_tokens") if key in result}
        print(f"    {name:14s} {length:6d} tokens: {result['outcome']:8s} {result['wall_s']:6.1f} s {shown}",
              file=sys.stderr)  # fmt: skip
        return result


def run_probe(script: Path, payload: dict, env: dict, timeout: float) -> dict:
    """Run one probe worker; classify a worker that wrote no result from its exit and log ("oom" / "error" /
    "timeout"), keeping the log's tail."""
    result_path = Path(payload["result_path"])
    payload_path = result_path.with_suffix(".payload.json")
    payload_path.write_text(json.dumps(payload))
    log_path = result_path.with_suffix(".log")
    if timeout <= 0:
        return {"outcome": "timeout", "error": "no time left in --budget-s"}
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, str(script), "--worker", str(payload_path)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO_ROOT)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"outcome": "timeout", "error": f"killed after {timeout:.0f} s", "log_tail": _tail(log_path)}
    if proc.returncode == 0 and result_path.exists():
        return json.loads(result_path.read_text())
    return classify_failed_worker(proc.returncode, _tail(log_path))


def run_kept_probe(pool: WorkerPool, payload: dict, timeout: float) -> dict:
    """Run one probe in its configuration's kept process. An out-of-memory error inside the run is caught there and
    reported as "oom" (the process frees everything and stays); a process that dies or overruns is classified as
    `run_probe` does, and the pool starts a fresh one for the next probe."""
    if timeout <= 0:
        return {"outcome": "timeout", "error": "no time left in --budget-s"}
    pool.timeout = timeout
    try:
        return pool.run(payload)
    except subprocess.TimeoutExpired as error:
        return {"outcome": "timeout", "error": f"killed after {timeout:.0f} s", "log_tail": str(error.output)[-3000:]}
    except RuntimeError as error:  # the process exited without a result; the message ends with its log's tail
        return classify_failed_worker(None, str(error)[-3000:])


def classify_failed_worker(returncode: int | None, log_tail: str) -> dict:
    """A worker that exited without a result: "oom" if its log shows an out-of-memory error, else "error"."""
    outcome = "oom" if any(marker in log_tail for marker in OOM_MARKERS) else "error"
    return {"outcome": outcome, "exit_code": returncode, "error": f"worker exited {returncode}", "log_tail": log_tail}


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return ""


def build_model(args, workdir: Path):
    """The random Qwen2 model (positions up to --max-length) and its tokenizer, saved once; `(tokenizer, words, path,
    num_params)`."""
    words = pseudo_words(max(2048, args.tokenizer_vocab // 2), args.seed)
    tokenizer = build_word_tokenizer(words, args.tokenizer_vocab, args.seed)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens but --vocab is {args.vocab}")
    args.seq_len = args.max_length  # save_random_qwen2 sizes max_position_embeddings from it
    path = workdir / "model"
    num_params = save_random_qwen2(args, tokenizer, path, args.seed)
    return tokenizer, words, str(path), num_params


def search_config(runner: ProbeRunner, name: str, width: int, guess: int | None, records: list) -> dict:
    """One configuration's search; every probe's record is appended to `records` as it finishes."""
    args = runner.args

    def probe(units: list[int]) -> list[str]:
        with ThreadPoolExecutor(max_workers=len(units)) as pool:
            results = list(pool.map(lambda n: runner.probe(name, n * args.granularity), units))
        records.extend(results)
        return [r["outcome"] for r in results]

    return search_longest(probe, max_units=args.max_length // args.granularity, width=width,
                          start=max(1, args.start // args.granularity), guess=guess,
                          out_of_time=runner.out_of_time)  # fmt: skip


def summarize_config(search: dict, records: list, granularity: int) -> dict:
    longest = search["longest"] * granularity
    failing = search["shortest_failing"]
    at_longest = next((r for r in records if r["length"] == longest and r["outcome"] == FIT), {})
    return {
        "longest_fitting": longest,
        "shortest_failing": None if failing is None else failing * granularity,
        "complete": search["complete"],
        "stopped_by": search["stopped_by"],
        "reached_max": search["reached_max"],
        "monotone": search["monotone"],
        "rounds": search["rounds"],
        "peak_gib_at_longest": at_longest.get("peak_gib"),
        "probes": sorted(records, key=lambda r: r["length"]),
    }


def add_ratios(configs: dict) -> None:
    """`x_stock`: longest fitting length over stock's (None if stock fits nothing); `ratio_exact` when both searches
    finished, else the ratio is between partial bounds."""
    stock = configs["stock"]
    for entry in configs.values():
        known = entry["complete"] or entry["longest_fitting"]  # a partial search that found no fit says nothing
        entry["x_stock"] = (
            entry["longest_fitting"] / stock["longest_fitting"] if stock["longest_fitting"] and known else None
        )
        entry["ratio_exact"] = entry["complete"] and stock["complete"]


def text_table(configs: dict) -> str:
    headers = ["config", "longest fit", "x stock", "first failure", "peak GiB at longest", "probes", "rounds", "status"]
    rows = []
    for name, e in configs.items():
        status = "complete" if e["complete"] else f"partial ({e['stopped_by']})"
        if e["reached_max"]:
            status += ", fits up to --max-length"
        ratio = "-" if e["x_stock"] is None else f"{e['x_stock']:.3f}" + ("" if e["ratio_exact"] else " (partial)")
        peak = "-" if e["peak_gib_at_longest"] is None else f"{e['peak_gib_at_longest']:.3f}"
        rows.append([name, e["longest_fitting"], ratio, e["shortest_failing"] or "-", peak, len(e["probes"]),
                     e["rounds"], status])  # fmt: skip
    return format_table(headers, rows)


def write_report(out: Path, report: dict, searches: dict, records: dict, args, started: float) -> dict:
    """Summarize the searches done so far into `report` and write it; a configuration not searched yet is absent
    and the report says `complete: false`."""
    configs = {name: summarize_config(searches[name], records[name], args.granularity) for name in searches}
    add_ratios(configs)
    done = len(configs) == len(args.configs) and all(e["complete"] for e in configs.values())
    report.update(wall_s=round(time.monotonic() - started, 1), complete=done, table=text_table(configs),
                  configs=configs)  # fmt: skip
    write_json(out, report)
    return configs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker, worker, import_trainers)
    started = time.monotonic()
    deadline = started + args.budget_s
    started_paths = start_benchmark("longest_sequence", args)
    if started_paths is None:
        return 0
    out, workdir = started_paths
    kept = args.worker_scope == "config"
    args.parallel = len(args.configs) if kept else auto_parallel(args)
    settings = {key: getattr(args, key) for key in (*SHAPE_KEYS, "batch", "prompt_frac", "steps", "granularity",
                "max_length", "start", "memory_cap_gib", "parallel", "budget_s", "probe_timeout", "threads", "seed",
                "configs", "device", "worker_scope")}  # fmt: skip
    cap = (f"real: torch.cuda.set_per_process_memory_fraction({args.memory_cap_gib} GiB / device memory) per worker"
           if args.device == "cuda" else f"EMULATED: a probe fits when its peak RSS over construction (VmHWM of "
           f"the worker) is at most {args.memory_cap_gib} GiB; nothing runs out of memory on CPU")  # fmt: skip
    print(f"longest_sequence: {settings} workdir={workdir}", file=sys.stderr)
    report = {
        "benchmark": "longest_sequence",
        "description": (
            "Longest max_length (prompt + completion, a multiple of the granularity) at which each configuration "
            f"trains {args.steps} optimizer steps of {args.batch} preference pairs within the memory cap. "
            + (
                "One kept worker per configuration probes its lengths in turn (doubling, then bisection), all "
                "configurations at once; an out-of-memory run is caught and freed in-process."
                if kept
                else "Every probe in a fresh worker; stock DPO searched first (doubling, then bisection), the token "
                "losses warm-started from stock's answer."
            )
            + " Ratio = longest fitting length / stock's."
        ),
        "memory_cap": cap,
        "emulated": args.device != "cuda",
        "machine": machine_info(args.device),
        "settings": {
            **settings,
            "model": "Qwen2ForCausalLM (random)",
            "attn_implementation": "sdpa",
            "optimizer": "adamw_torch",
        },
    }
    pools = None
    if kept:  # started now, so that their imports and CUDA start-up overlap the model building
        script, env = Path(__file__).resolve(), worker_env(args.threads)
        pools = {name: WorkerPool(script, env, "config", args.probe_timeout, args.device == "cuda")
                 for name in args.configs}  # fmt: skip
        for name, pool in pools.items():
            pool.start([name], workdir / "runs")
    try:
        tokenizer, words, model_path, num_params = build_model(args, workdir)
        report["settings"]["num_params"] = num_params
        print(f"  model {num_params / 1e6:.1f}M params; {args.parallel} probe(s) at once", file=sys.stderr)
        runner = ProbeRunner(args, workdir, tokenizer, words, model_path, deadline, pools)
        records = {name: [] for name in args.configs}
        if kept:  # every configuration's own cold search, one probe at a time each, all at once
            with ThreadPoolExecutor(max_workers=len(args.configs)) as executor:
                futures = {name: executor.submit(search_config, runner, name, 1, None, records[name])
                           for name in args.configs}  # fmt: skip
                searches = {name: future.result() for name, future in futures.items()}
        else:
            searches = {"stock": search_config(runner, "stock", args.parallel, None, records["stock"])}
            write_report(out, report, searches, records, args, started)  # stock's answer survives an outer kill
            stock = searches["stock"]
            guess = stock["longest"] if stock["complete"] and stock["longest"] else None
            others = [name for name in args.configs if name != "stock"]
            if others:
                widths = slot_widths(args.parallel, len(others))
                with ThreadPoolExecutor(max_workers=len(others)) as executor:
                    futures = {name: executor.submit(search_config, runner, name, width, guess, records[name])
                               for name, width in zip(others, widths)}  # fmt: skip
                    searches.update({name: future.result() for name, future in futures.items()})
        configs = write_report(out, report, searches, records, args, started)
    finally:
        for pool in (pools or {}).values():
            pool.close()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    kind = "CUDA cap" if args.device == "cuda" else "CPU emulation"
    print(f"\nlongest sequence within {args.memory_cap_gib} GiB ({kind}), {args.batch} pair(s) per step, {args.steps} "
          f"steps:\n{report['table']}\nwrote {out}")  # fmt: skip
    failed = any(e["stopped_by"] not in (None, "budget") for e in configs.values())
    if failed:
        print("longest_sequence: a probe failed with an error other than out-of-memory (see 'probes' in the JSON)",
              file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration at one length, in a fresh process
# ---------------------------------------------------------------------------------------------------------------------


def is_out_of_memory(error: BaseException | None) -> bool:
    """torch's out-of-memory error (or a RuntimeError naming one), also as the cause of another exception."""
    import torch

    while error is not None:
        if isinstance(error, torch.OutOfMemoryError) or (
            isinstance(error, RuntimeError) and any(marker in str(error) for marker in OOM_MARKERS)
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def record_sequence_lengths(trainer, lengths: list[int]) -> None:
    """Wrap the trainer's collator to record every collated sequence's token count (attention mask sums)."""
    collate = trainer.data_collator

    def recording(examples):
        batch = collate(examples)
        lengths.extend(int(n) for n in batch["attention_mask"].sum(dim=1))
        return batch

    trainer.data_collator = recording


def worker(payload_path: Path) -> int:
    p = json.loads(Path(payload_path).read_text())
    prepare_worker(p)
    import torch

    cuda = p["device"] == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        if p["cap_bytes"] > total:
            raise SystemExit(
                f"--memory-cap-gib {p['cap_bytes'] / 2**30:.1f} exceeds the device's {total / 2**30:.1f} GiB"
            )
        torch.cuda.set_per_process_memory_fraction(p["cap_bytes"] / total, 0)
    lengths: list[int] = []

    def build(payload):
        trainer = build_trainer(payload)
        record_sequence_lengths(trainer, lengths)
        return trainer

    try:
        _, result = measured_training(p, build)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        result = {"outcome": "oom", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        if cuda:
            result["memory"] = {"cuda_alloc_peak_bytes": torch.cuda.max_memory_allocated(),
                                "cuda_reserved_peak_bytes": torch.cuda.max_memory_reserved()}  # fmt: skip
    else:
        result = {"memory": result["memory"], "losses": result["losses"], "step_s": result["times"]["step_s"]}
        if not lengths or min(lengths) != p["seq_len"] or max(lengths) != p["seq_len"]:
            raise RuntimeError(f"collated sequences of {min(lengths, default=0)}-{max(lengths, default=0)} tokens, "
                               f"expected exactly {p['seq_len']}: the rows are too short for this length")  # fmt: skip
        if cuda:  # the cap is enforced by the allocator: finishing the steps is fitting
            result["outcome"] = FIT
        elif not result["memory"]["peak_reset_ok"]:
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): the CPU emulation needs the peak over "
                               "construction")  # fmt: skip
        else:
            result["outcome"] = FIT if result["memory"]["rss_peak_delta_bytes"] <= p["cap_bytes"] else "over_cap"
    peak_key = "cuda_reserved_peak_bytes" if cuda else "rss_peak_delta_bytes"
    if peak_key in result.get("memory", {}):
        result["peak_gib"] = round(result["memory"][peak_key] / 2**30, 4)
        result["peak_measure"] = "CUDA max_memory_reserved" if cuda else "VmHWM over construction"
    if lengths:
        result["sequence_tokens"] = {"min": min(lengths), "max": max(lengths), "count": len(lengths)}
    Path(p["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
