"""What the two DPO benchmarks (`dpo_token_overhead.py`, `dpo_memory.py`) share: the command line and its presets,
the random Qwen2-shaped model, the synthetic preference data, the trainer settings, and the measured training run of
one worker."""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

from common import (
    ComponentTimer,
    MemoryProbe,
    add_worker_scope_argument,
    apply_presets,
    default_worker_scope,
    machine_info,
    make_step_timer,
    synthetic_preference_rows,
    write_json,
)


def make_parser(doc: str, configs: dict, default_configs: list[str], batch_help: str, out_help: str):
    """The shared command line; returns `(parser, run_group)` so a benchmark can add its own run flags."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    shape = parser.add_argument_group("shape (defaults depend on --device; see PRESETS)")
    shape.add_argument("--hidden", type=int)
    shape.add_argument("--layers", type=int)
    shape.add_argument("--heads", type=int)
    shape.add_argument("--kv-heads", type=int)
    shape.add_argument("--intermediate", type=int)
    shape.add_argument("--vocab", type=int, help="model vocabulary (LM head width)")
    shape.add_argument("--tokenizer-vocab", type=int, help="BPE tokenizer vocabulary (<= --vocab)")
    shape.add_argument("--seq-len", type=int, help="tokens per sequence (prompt + completion) = max_length")
    shape.add_argument("--prompt-frac", type=float, default=0.25, help="share of --seq-len taken by the prompt")
    shape.add_argument("--batch", type=int, help=batch_help)
    shape.add_argument("--dtype", choices=["float32", "bfloat16"])
    shape.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, help="measured optimizer steps per run")
    run.add_argument("--warmup", type=int, help="unmeasured optimizer steps before them")
    run.add_argument("--rounds", type=int, help="runs per configuration, in alternating order (>= 3)")
    run.add_argument(
        "--sweep",
        help="batch x sequence shapes to run one after the other, e.g. 1x256,2x512 (each\n"
        "overrides --batch/--seq-len; default: the single preset shape)",
    )
    run.add_argument(
        "--components",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="in-loop component timings (loss forward, backward, LM-head/KL kernels) in every\n"
        "measured step; default on for CPU, off for CUDA (they synchronize the device)",
    )
    run.add_argument("--configs", default=",".join(default_configs), help=f"comma-separated subset of {list(configs)}")
    run.add_argument(
        "--threads",
        type=int,
        help="OMP/MKL/torch threads in every run (CPU default 1: on a small shared machine two OpenMP\n"
        "threads slow down erratically whenever another process takes a core)",
    )
    run.add_argument("--logging-steps", type=int, default=1)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--worker-timeout", type=float, default=3600, help="seconds one measured run may take")
    add_worker_scope_argument(run)
    run.add_argument("--out", type=Path, help=out_help)
    run.add_argument("--workdir", type=Path, help="keep model/data/logs here instead of a temporary directory")
    run.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser, run


def resolve_args(parser, args, presets: dict, configs: dict):
    """Fill unset shape/run values from the device preset and validate the configuration list."""
    if args.worker is not None:
        return args
    apply_presets(args, presets)
    args.tokenizer_vocab = min(args.tokenizer_vocab, args.vocab)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in configs]
    if unknown or "stock" not in args.configs:
        parser.error(f"--configs must include 'stock' and name only {list(configs)}; got unknown {unknown}")
    if args.warmup < 1 or args.steps < 2 or args.rounds < 3:
        parser.error("need --warmup >= 1 (optimizer state allocation), --steps >= 2 and --rounds >= 3")
    if args.components is None:
        args.components = args.device == "cpu"
    if args.worker_scope is None:
        args.worker_scope = default_worker_scope(args.device)
    return args


# Qwen2.5-0.5B's context length, raised only for a longer `args.seq_len`: not taken from the shape, so that one saved
# model serves every shape of a sweep and every benchmark of a suite (rotary embeddings are computed per position).
MAX_POSITION_EMBEDDINGS = 32768


def model_cache(workdir: Path) -> Path:
    """Where `save_random_qwen2` keeps built models: `$BENCH_MODEL_CACHE` (shared by the benchmarks of a suite) or a
    folder of the benchmark's own work directory (shared by its shapes)."""
    return Path(os.environ.get("BENCH_MODEL_CACHE") or workdir / "model_cache")


def save_random_qwen2(args, tokenizer, path: Path, seed: int, cache: Path | None = None) -> int:
    """A Qwen2-shaped causal LM with random weights (tied embeddings, as Qwen2.5-0.5B) saved with the tokenizer.

    With `cache`, a model of the same config and seed built before (by another shape or benchmark) is linked instead
    of built again: random initialization and saving take ~8 s at the Qwen2.5-0.5B shape.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(MAX_POSITION_EMBEDDINGS, getattr(args, "seq_len", 0)),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    key = hashlib.sha256(f"{config.to_json_string()}|{seed}|{args.dtype}".encode()).hexdigest()[:16]
    built = cache / key if cache is not None else None
    if built is None or not (built / "num_params").exists():
        built = built or path
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(built)
        (built / "num_params").write_text(str(sum(p.numel() for p in model.parameters())))
        del model
        gc.collect()
    if built != path:
        path.mkdir(parents=True, exist_ok=True)
        for file in built.iterdir():
            if file.name != "num_params":
                (path / file.name).unlink(missing_ok=True)
                (path / file.name).symlink_to(file.resolve())
    tokenizer.save_pretrained(path)
    return int((built / "num_params").read_text())


def synthetic_preference_data(args, tokenizer, words):
    """`(dataset, tokenized, stats)`: enough pairs for warmup + measured steps, sequences of about `--seq-len`."""
    from datasets import Dataset

    from trl_tokenlevel.data import tokenize_preference_dataset

    num_rows = args.batch * (args.warmup + args.steps)
    prompt_tokens = max(4, int(args.seq_len * args.prompt_frac))
    completion_tokens = args.seq_len - prompt_tokens - 1  # TRL appends EOS
    rows = synthetic_preference_rows(tokenizer, words, num_rows, prompt_tokens, completion_tokens, args.seed)
    dataset = Dataset.from_list(rows)
    tokenized = tokenize_preference_dataset(dataset, tokenizer)
    lengths = [
        min(len(p) + len(c), args.seq_len)
        for p, cs in zip(tokenized["prompt_ids"], zip(tokenized["chosen_ids"], tokenized["rejected_ids"]))
        for c in cs
    ]
    stats = {
        "num_rows": num_rows,
        "tokenizer_size": len(tokenizer),
        "mean_sequence_tokens": statistics.mean(lengths),
        "mean_prompt_tokens": statistics.mean(len(p) for p in tokenized["prompt_ids"]),
    }
    return dataset, tokenized, stats


def training_kwargs(p: dict) -> dict:
    """The DPOConfig fields every configuration shares (stock and token trainers alike)."""
    cuda = p["device"] == "cuda"
    return dict(
        output_dir=p["output_dir"],
        per_device_train_batch_size=p["batch"],
        gradient_accumulation_steps=1,
        max_steps=p["warmup"] + p["steps"],
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_steps=p["logging_steps"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=p["seed"],
        data_seed=p["seed"],
        max_length=p["seq_len"],
        bf16=p["dtype"] == "bfloat16",
        gradient_checkpointing=p["gradient_checkpointing"],
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        use_cpu=not cuda,
        model_init_kwargs={"dtype": p["dtype"], "attn_implementation": "sdpa"},
    )


def import_trainers() -> None:
    """What a kept DPO worker imports before its first run (`common.serve`'s warm-up)."""
    import datasets  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer  # noqa: F401


def prepare_worker(p: dict) -> None:
    """Thread count and quiet, cache-free `datasets` in a worker process."""
    import datasets
    import torch

    torch.set_num_threads(p["threads"])
    datasets.disable_caching()  # every run tokenizes from scratch, no cache files shared between runs
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


# In-loop component names -> table labels. "head" is every LM-head pass over the vocabulary, forward and backward:
# TRL's fused log-prob kernel (policy and reference), TRL's chunked divergence, our chunked KL / TVD and the fused pass.
COMPONENT_LABELS = {
    "fwd_bwd": "loss fwd+bwd",
    "head": "LM-head/KL kernels",
    "loss_fwd": "loss fwd",
    "backward": "backward",
}


def wrap_dpo_components(timer: ComponentTimer, trainer) -> None:
    import trl.kernels.chunked_divergence as trl_divergence
    import trl.kernels.chunked_logprob as trl_logprob

    from trl_tokenlevel.ops import chunked, fused
    from trl_tokenlevel.trainers import token_dpo_trainer

    timer.wrap("loss_fwd", trainer, "compute_loss")
    timer.wrap("backward", trainer.accelerator, "backward")
    functions = [trl_logprob.ChunkedLogProbFunction, trl_divergence.ChunkedDivergenceFunction,
                 chunked._ChunkedKLFunction, fused._FusedFunction]  # fmt: skip
    try:  # token_kernel="triton": the fused pass's Triton backend (needs the triton package)
        from trl_tokenlevel.ops.fused_triton import TritonFusedFunction

        functions.append(TritonFusedFunction)
    except ImportError:
        pass
    for function in functions:
        timer.wrap("head", function, "forward")
        timer.wrap("head", function, "backward")
    timer.wrap("head", token_dpo_trainer, "chunked_total_variation")


def measured_training(p: dict, build_trainer):
    """Build the trainer, reset the memory peaks, train with a step timer; return `(trainer, result)`.

    `result["times"]`: per measured step (after `p["warmup"]` steps) the wall interval between optimizer-step ends
    (`step_s`), the same in process CPU time (`cpu_step_s`), its compute and data parts, and with `p["components"]`
    the in-loop components (`COMPONENT_LABELS`). `result["memory"]`: `MemoryProbe` (VmHWM of this worker; CUDA
    allocated and reserved peaks).
    """
    cuda = p["device"] == "cuda"
    load_avg_before = os.getloadavg()[0]
    started = time.perf_counter()
    trainer = build_trainer(p)
    construct_s = time.perf_counter() - started

    timer = make_step_timer(cuda)
    trainer.add_callback(timer)
    components = None
    if p["components"]:
        components = ComponentTimer(cuda)
        wrap_dpo_components(components, trainer)
        trainer.add_callback(components.callback)
    probe = MemoryProbe(cuda)
    probe.start()
    trainer.train()
    memory = probe.result()
    if components is not None:
        components.restore()

    times = {
        "step_s": timer.step_times(p["warmup"]),
        "cpu_step_s": timer.cpu_step_times(p["warmup"]),
        "compute_s": timer.compute_times(p["warmup"]),
        "data_s": timer.data_times(p["warmup"]),
    }
    if components is not None:
        parts = components.per_step(p["warmup"])
        steps = len(times["step_s"])
        for name in ("loss_fwd", "backward", "head"):
            times[name] = parts.get(name, [0.0] * steps)
        times["fwd_bwd"] = [a + b for a, b in zip(times["loss_fwd"], times["backward"])]
    result = {
        "config": p["config"],
        "round": p["round"],
        "construct_s": construct_s,
        "times": times,
        "memory": memory,
        "warmup_step_s": timer.step_times(0)[: p["warmup"]],
        "load_avg_before": load_avg_before,
        "load_avg_after": os.getloadavg()[0],
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "logged_metrics": sorted({k for e in trainer.state.log_history for k in e}),
    }
    if len(times["step_s"]) != p["steps"]:
        raise RuntimeError(f"expected {p['steps']} measured steps, got {len(times['step_s'])}")
    return trainer, result


# ---------------------------------------------------------------------------------------------------------------------
# Parent: one measured sweep (every shape, every round, every configuration in its own workers) and the main table
# ---------------------------------------------------------------------------------------------------------------------

PAYLOAD_KEYS = ("device", "dtype", "seq_len", "batch", "warmup", "steps", "seed", "threads", "gradient_checkpointing",
                "logging_steps", "components", "breakdown")  # fmt: skip


def with_breakdown_medians(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """`common.aggregate_runs`, plus each configuration's after-training breakdown (if any): medians over rounds."""
    from common import aggregate_runs

    summary = aggregate_runs(runs)
    for name, results in runs.items():
        if results and results[0].get("breakdown"):
            keys = results[0]["breakdown"]
            summary[name]["breakdown"] = {key: statistics.median(r["breakdown"][key] for r in results) for key in keys}
    return summary


def run_sweep(args, script: Path, workdir: Path, configs: dict, build_model_and_data, payload_for,
              on_round=None) -> list[dict]:  # fmt: skip
    """For each `--sweep` shape: build model and data, run `--rounds` rounds of every configuration in alternating
    order (in `--worker-scope` workers: `common.WorkerPool`), aggregate. Returns one entry per shape: shape, data
    statistics, orders, per-configuration summaries (`common.aggregate_runs`), the raw runs and `rounds_done`.
    `on_round(shapes)` is called after every round with the entries so far (the last one possibly partial)."""
    from common import WorkerPool, measure_rounds, parse_sweep, worker_env

    shapes = []
    pool = WorkerPool(script, worker_env(args.threads), args.worker_scope, args.worker_timeout, args.device == "cuda")
    with pool:
        pool.start(args.configs, workdir)  # kept workers start up while the model and data are built
        for batch, seq_len in parse_sweep(args.sweep, (args.batch, args.seq_len)):
            args.batch, args.seq_len = batch, seq_len
            shape_dir = workdir / f"b{batch}_l{seq_len}"
            (shape_dir / "runs").mkdir(parents=True, exist_ok=True)
            data_info = build_model_and_data(args, shape_dir)
            print(f"  shape batch={batch} seq_len={seq_len}: model {data_info['num_params'] / 1e6:.1f}M params, "
                  f"~{data_info['mean_sequence_tokens']:.0f} tokens per sequence", file=sys.stderr)  # fmt: skip
            entry = {"shape": {"batch": batch, "seq_len": seq_len},
                     "data": {k: v for k, v in data_info.items() if k not in ("paths", "model_path")}}  # fmt: skip
            shapes.append(entry)

            def payload(name, round_index, data_info=data_info, shape_dir=shape_dir):
                return {
                    "config": name,
                    **configs[name],
                    **payload_for(name, data_info, shape_dir),
                    **{key: getattr(args, key) for key in PAYLOAD_KEYS},
                    "round": round_index,
                    "output_dir": str(shape_dir / "runs" / f"{name}_{round_index}"),
                    "result_path": str(shape_dir / "runs" / f"{name}_{round_index}.json"),
                }

            measure_rounds(pool, entry, args.configs, args.rounds, payload,
                           on_round=None if on_round is None else lambda: on_round(shapes),
                           summarize=with_breakdown_medians)  # fmt: skip
    return shapes


TARGET_LABELS = {"step_s": "wall", "cpu_step_s": "cpu", "rss_peak_bytes": "rss", "cuda_alloc_peak_bytes": "alloc"}


def sweep_and_write(
    args,
    script: Path,
    workdir: Path,
    configs: dict,
    build_model_and_data,
    payload_for,
    out: Path,
    benchmark: str,
    description: str,
    targets: dict,
    settings: dict,
    print_tables,
) -> Path:
    """`run_sweep`, writing the benchmark's JSON after every round (`complete: false`) and once more at the end."""
    started, machine = time.time(), machine_info(args.device)

    def report(shapes, complete):
        return {
            "benchmark": benchmark,
            "description": description,
            "targets": targets,
            "machine": machine,
            "settings": {
                **settings,
                "model": "Qwen2ForCausalLM (random)",
                "attn_implementation": "sdpa",
                "optimizer": "adamw_torch",
            },  # fmt: skip
            "wall_s": time.time() - started,
            "complete": complete,
            "tables": [print_tables(args, shape) for shape in shapes] if complete else [],
            "shapes": shapes,
        }

    shapes = run_sweep(args, script, workdir, configs, build_model_and_data, payload_for,
                       on_round=lambda shapes: write_json(out, report(shapes, complete=False)))  # fmt: skip
    path = write_json(out, report(shapes, complete=True))
    print(f"wrote {path}", file=sys.stderr)
    return path


def main_table(per_config: dict, cuda: bool, targets: dict | None = None) -> str:
    """Times (ms, medians over all measured steps of all rounds) and memory (GiB, medians over rounds), each with its
    ratio to stock and the min-max of the per-round paired ratios. `targets`: config -> {ratio key: bound}."""
    from common import format_table, ratio_cell

    first = next(iter(per_config.values()))
    time_keys = [("step_s", "step ms"), ("cpu_step_s", "CPU step ms")]
    time_keys += [(key, f"{COMPONENT_LABELS[key]} ms") for key in ("fwd_bwd", "head") if key in first["times"]]
    memory_keys = [("rss_peak_bytes", "peak RSS GiB"), ("rss_peak_delta_bytes", "RSS over constr. GiB")]
    if cuda:
        memory_keys = [("cuda_alloc_peak_bytes", "peak alloc GiB"), ("cuda_alloc_peak_delta_bytes",
                       "alloc over constr. GiB"), ("cuda_reserved_peak_bytes", "peak reserved GiB")]  # fmt: skip
    headers = ["config"]
    for _, label in (*time_keys, *memory_keys):
        headers += [label, "x stock (rounds)"]
    if targets:
        headers.append("targets")
    rows = []
    for name, entry in per_config.items():
        row = [name]
        for key, _ in time_keys:
            series = entry["times"].get(key)
            row += [f"{1e3 * series['median']:.1f}" if series else "-", ratio_cell(entry["ratios"].get(key))]
        for key, _ in memory_keys:
            values = entry["memory"].get(key)
            row += [f"{values['median'] / 2**30:.3f}" if values else "-", ratio_cell(entry["ratios"].get(key))]
        if targets:
            checks = []
            for key, bound in (targets.get(name) or {}).items():
                ratio = entry["ratios"].get(key)
                ok = ratio is not None and ratio["pooled"] <= bound
                checks.append(f"{TARGET_LABELS.get(key, key)}<={bound}x:{'y' if ok else 'N'}")
            row.append(" ".join(checks) or "-")
        rows.append(row)
    return format_table(headers, rows)
