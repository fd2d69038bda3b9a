"""Step time and peak memory of `TokenDPOTrainer` token losses against stock `trl.DPOTrainer`.

Configurations (same model init, same data and data order, same optimizer and schedule):

    stock     trl.DPOTrainer                                     (no per-token columns)
    weighted  TokenDPOTrainer(token_loss_type="weighted")        chosen/rejected_token_weights
    tgdpo     TokenDPOTrainer(token_loss_type="tgdpo")           chosen/rejected_token_rewards (offline rewards)
    cdpo      TokenDPOTrainer(token_loss_type="cdpo")            rejected_token_weights only (cDPO's only_neg default)
    treg      TokenDPOTrainer(token_loss_type="treg")            chosen/rejected_token_rewards (opt-in: --configs)

The parent builds a Qwen2-shaped model with random weights from a config (saved once to a temporary directory), a
byte-level BPE tokenizer trained in memory on pseudo-words, and synthetic preference rows of `--seq-len` tokens, then
runs every configuration in its own fresh subprocess, in alternating order over `--rounds` rounds. Each subprocess
trains `--warmup` + `--steps` optimizer steps and reports the measured steps only.

Measured per configuration:
  * step time: wall time between consecutive optimizer-step ends (batch fetch + collation + forward/backward + optimizer
    + the previous step's logging), split into compute (step begin -> end) and data+log (the rest);
  * step CPU time: the same interval in process CPU time (robust to other load when `--threads 1`);
  * breakdown, after training and outside the timed loop: fetch (Arrow -> Python) and collate time per batch, and
    `compute_loss` / `backward` with the token trainer's reference forward, token loss, token stats and DPO metrics
    timed separately (`--breakdown` repetitions);
  * memory: CPU peak RSS during training (the kernel's high-water mark, reset after model+trainer construction) minus
    the RSS after construction, and the absolute peak; CUDA `torch.cuda.max_memory_allocated()` after a reset, minus
    the allocation after construction, and absolute.
Ratios are to stock DPO: pooled medians over all measured steps of all rounds, plus the per-round paired ratio.

    python bench/dpo_token_overhead.py                      # CPU defaults, a few minutes on 2 cores
    python bench/dpo_token_overhead.py --device cuda        # Qwen2.5-0.5B shape, 1024 tokens, bf16, grad checkpointing
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    build_word_tokenizer,
    format_table,
    machine_info,
    pseudo_words,
    round_orders,
    run_worker,
    summarize,
    worker_env,
    write_json,
)
from dpo_bench import (  # noqa: E402
    make_parser,
    measured_training,
    prepare_worker,
    resolve_args,
    save_random_qwen2,
    synthetic_preference_data,
    training_kwargs,
)

TARGET_RATIO = 1.05

# Configuration -> (token_loss_type, {per-token column: (low, high) of uniform random values}).
CONFIGS = {
    "stock": (None, {}),
    "weighted": ("weighted", {"chosen_token_weights": (0.0, 2.0), "rejected_token_weights": (0.0, 2.0)}),
    "tgdpo": ("tgdpo", {"chosen_token_rewards": (-1.0, 1.0), "rejected_token_rewards": (-1.0, 1.0)}),
    "cdpo": ("cdpo", {"rejected_token_weights": (0.0, 1.0)}),
    "treg": ("treg", {"chosen_token_rewards": (-1.0, 1.0), "rejected_token_rewards": (-1.0, 1.0)}),
}
DEFAULT_CONFIGS = ["stock", "weighted", "tgdpo", "cdpo"]

# Shape presets. CPU: small enough for a few minutes on 2 cores, large enough that the model, not Python, dominates a
# step. CUDA: the shape of Qwen2.5-0.5B (random weights) at 1024 tokens in bf16 with gradient checkpointing.
PRESETS = {
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, vocab=8192, tokenizer_vocab=8192,
                seq_len=384, batch=2, warmup=2, steps=6, rounds=2, dtype="float32", gradient_checkpointing=False,
                threads=1),
    "cuda": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tokenizer_vocab=16384,
                 seq_len=1024, batch=4, warmup=3, steps=15, rounds=2, dtype="bfloat16", gradient_checkpointing=True,
                 threads=4),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser, run = make_parser(__doc__, CONFIGS, DEFAULT_CONFIGS, "preference pairs per step (2x sequences)",
                              "JSON path (default bench/results/dpo_token_overhead_<device>.json)")  # fmt: skip
    run.add_argument("--collate-repeats", type=int, default=3, help="passes over the data for the collation timing")
    run.add_argument("--breakdown", type=int, default=2,
                     help="after training, time compute_loss/backward and the token trainer's parts this many\n"
                          "times per run (0: off)")
    return resolve_args(parser, parser.parse_args(argv), PRESETS, CONFIGS)


# ---------------------------------------------------------------------------------------------------------------------
# Parent: build model and data once, run the workers, aggregate
# ---------------------------------------------------------------------------------------------------------------------


def build_model_and_data(args, workdir: Path) -> dict:
    """Save the model + tokenizer and one dataset per configuration under `workdir`; return row statistics."""
    import torch

    words = pseudo_words(max(2048, args.tokenizer_vocab // 2), args.seed)
    tokenizer = build_word_tokenizer(words, args.tokenizer_vocab, args.seed)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens but --vocab is {args.vocab}")
    model_path = workdir / "model"
    num_params = save_random_qwen2(args, tokenizer, model_path, args.seed)

    base, tokenized, stats = synthetic_preference_data(args, tokenizer, words)
    generator = torch.Generator().manual_seed(args.seed)
    for name in args.configs:
        dataset = base
        for column, (low, high) in CONFIGS[name][1].items():
            side = column.split("_")[0]
            values = [(low + (high - low) * torch.rand(len(ids), generator=generator)).tolist()
                      for ids in tokenized[f"{side}_ids"]]  # fmt: skip
            dataset = dataset.add_column(column, values)
        dataset.save_to_disk(str(workdir / "data" / name))
    return {"model_path": str(model_path), "num_params": num_params, **stats}


def aggregate(args, runs: dict[str, list[dict]]) -> dict:
    """Per-configuration summaries and ratios to stock."""
    cuda = args.device == "cuda"
    per_config = {}
    for name, results in runs.items():
        steps = [s for r in results for s in r["step_s"]]
        entry = {
            "token_loss_type": CONFIGS[name][0],
            "columns": list(CONFIGS[name][1]),
            "step_s": summarize(steps),
            "cpu_step_s": summarize([s for r in results for s in r["cpu_step_s"]]),
            "compute_s": summarize([s for r in results for s in r["compute_s"]]),
            "data_and_log_s": summarize([s for r in results for s in r["data_s"]]),
            "step_s_round_medians": [statistics.median(r["step_s"]) for r in results],
            "cpu_step_s_round_medians": [statistics.median(r["cpu_step_s"]) for r in results],
            "fetch_ms_per_batch": statistics.median(r["fetch_ms_median"] for r in results),
            "collate_ms_per_batch": statistics.median(r["collate_ms_median"] for r in results),
            "construct_s": statistics.median(r["construct_s"] for r in results),
            "breakdown_ms": {
                key: statistics.median(r["breakdown_ms"][key] for r in results)
                for key in results[0].get("breakdown_ms", {})
            },
            "tokens_per_step": results[0]["tokens_per_step"],
            "final_loss": [r["losses"][-1] if r["losses"] else None for r in results],
            "load_avg_1m": [r["load_avg_before"] for r in results],
        }
        if cuda:
            entry["mem_peak_delta_mb"] = statistics.median(r["cuda_peak_delta_bytes"] / 2**20 for r in results)
            entry["mem_peak_abs_mb"] = statistics.median(r["cuda_peak_abs_bytes"] / 2**20 for r in results)
            entry["cuda_reserved_peak_mb"] = statistics.median(r["cuda_reserved_peak_bytes"] / 2**20 for r in results)
        else:
            entry["mem_peak_delta_mb"] = statistics.median(r["rss_peak_delta_bytes"] / 2**20 for r in results)
            entry["mem_peak_abs_mb"] = statistics.median(r["rss_peak_train_bytes"] / 2**20 for r in results)
            entry["rss_after_construct_mb"] = statistics.median(r["rss_after_construct_bytes"] / 2**20 for r in results)
            entry["rss_peak_construct_mb"] = statistics.median(r["rss_peak_construct_bytes"] / 2**20 for r in results)
            entry["peak_reset_ok"] = all(r["peak_reset_ok"] for r in results)
        entry["mem_peak_delta_mb_runs"] = [
            (r["cuda_peak_delta_bytes"] if cuda else r["rss_peak_delta_bytes"]) / 2**20 for r in results
        ]
        per_config[name] = entry

    stock = per_config["stock"]
    for name, entry in per_config.items():
        paired = [a / b for a, b in zip(entry["step_s_round_medians"], stock["step_s_round_medians"])]
        step_ratio = entry["step_s"]["median"] / stock["step_s"]["median"]
        delta_ratio = entry["mem_peak_delta_mb"] / stock["mem_peak_delta_mb"] if stock["mem_peak_delta_mb"] else None
        abs_ratio = entry["mem_peak_abs_mb"] / stock["mem_peak_abs_mb"]
        entry["ratios"] = {
            "step_time": step_ratio,
            "step_time_paired_rounds": paired,
            "step_time_paired_median": statistics.median(paired),
            "step_cpu_time": entry["cpu_step_s"]["median"] / stock["cpu_step_s"]["median"],
            "step_cpu_time_paired_rounds": [
                a / b for a, b in zip(entry["cpu_step_s_round_medians"], stock["cpu_step_s_round_medians"])
            ],
            "compute_time": entry["compute_s"]["median"] / stock["compute_s"]["median"],
            "mem_peak_delta": delta_ratio,
            "mem_peak_abs": abs_ratio,
        }
        entry["within_target"] = {
            "step_time": step_ratio <= TARGET_RATIO,
            "step_cpu_time": entry["ratios"]["step_cpu_time"] <= TARGET_RATIO,
            "mem_peak": (delta_ratio is None or delta_ratio <= TARGET_RATIO) and abs_ratio <= TARGET_RATIO,
        }
    return per_config


def print_table(args, per_config: dict) -> str:
    mem = "GPU alloc" if args.device == "cuda" else "RSS"
    headers = ["config", "step ms", "IQR ms", "x stock", "paired x (min-max)", "CPU step ms", "CPU x",
               f"peak {mem} Δ MB", "x stock", f"peak {mem} MB", "x stock", f"<={TARGET_RATIO}x wall/cpu/mem"]  # fmt: skip
    rows = []
    for name, e in per_config.items():
        r = e["ratios"]
        paired = r["step_time_paired_rounds"]
        ok = e["within_target"]
        rows.append([
            name,
            f"{1e3 * e['step_s']['median']:.1f}",
            f"{1e3 * (e['step_s']['p75'] - e['step_s']['p25']):.1f}",
            f"{r['step_time']:.3f}",
            f"{r['step_time_paired_median']:.3f} ({min(paired):.3f}-{max(paired):.3f})",
            f"{1e3 * e['cpu_step_s']['median']:.1f}",
            f"{r['step_cpu_time']:.3f}",
            f"{e['mem_peak_delta_mb']:.1f}",
            f"{r['mem_peak_delta']:.3f}" if r["mem_peak_delta"] is not None else "-",
            f"{e['mem_peak_abs_mb']:.1f}",
            f"{r['mem_peak_abs']:.3f}",
            "/".join("y" if ok[k] else "N" for k in ("step_time", "step_cpu_time", "mem_peak")),
        ])  # fmt: skip
    table = format_table(headers, rows)

    stock = per_config["stock"]
    clock = "CUDA-synced wall" if args.device == "cuda" else "CPU time"
    headers = ["config", "fetch ms", "collate ms", "Δ fetch+collate", "data+log ms (loop, wall)", "loss fwd ms",
               "backward ms", "ref fwd ms", "token loss ms", "token stats ms", "dpo metrics ms"]  # fmt: skip
    rows = []
    for name, e in per_config.items():
        b = e["breakdown_ms"]
        extra = (e["fetch_ms_per_batch"] + e["collate_ms_per_batch"]
                 - stock["fetch_ms_per_batch"] - stock["collate_ms_per_batch"])  # fmt: skip

        def cell(key):
            return f"{b[key]:.2f}" if key in b else "-"

        rows.append([
            name, f"{e['fetch_ms_per_batch']:.2f}", f"{e['collate_ms_per_batch']:.2f}", f"{extra:+.2f}",
            f"{1e3 * e['data_and_log_s']['median']:.2f}", cell("loss_forward"), cell("backward"),
            cell("_reference_forward"), cell("_token_level_loss"), cell("_log_token_stats"), cell("_log_dpo_metrics"),
        ])  # fmt: skip
    table += (
        f"\n\nPer-step breakdown ({clock}, outside the measured loop; fetch/collate per batch in CPU time; "
        "'token loss' includes 'token stats'):\n" + format_table(headers, rows)
    )
    print(table)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)

    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("dpo_token_overhead: --device cuda requested but CUDA is not available; skipping.", file=sys.stderr)
        return 0

    out = args.out or RESULTS_DIR / f"dpo_token_overhead_{args.device}.json"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpo_token_overhead_"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runs").mkdir(exist_ok=True)
    shape = {key: getattr(args, key) for key in (*PRESETS["cpu"], "prompt_frac", "logging_steps", "seed")}
    print(f"dpo_token_overhead: device={args.device} shape={shape} configs={args.configs} workdir={workdir}",
          file=sys.stderr)  # fmt: skip
    try:
        started = time.time()
        data_info = build_model_and_data(args, workdir)
        print(f"  model {data_info['num_params'] / 1e6:.1f}M params, {data_info['num_rows']} rows of "
              f"~{data_info['mean_sequence_tokens']:.0f} tokens per sequence", file=sys.stderr)  # fmt: skip
        env = worker_env(args.threads)
        script = Path(__file__).resolve()
        runs: dict[str, list[dict]] = {name: [] for name in args.configs}
        orders = round_orders(args.configs, args.rounds)
        for round_index, order in enumerate(orders):
            for name in order:
                payload = {
                    "config": name,
                    "round": round_index,
                    "token_loss_type": CONFIGS[name][0],
                    "model_path": data_info["model_path"],
                    "data_path": str(workdir / "data" / name),
                    "output_dir": str(workdir / "runs" / f"{name}_{round_index}"),
                    "result_path": str(workdir / "runs" / f"{name}_{round_index}.json"),
                    "device": args.device,
                    "dtype": args.dtype,
                    "seq_len": args.seq_len,
                    "batch": args.batch,
                    "warmup": args.warmup,
                    "steps": args.steps,
                    "seed": args.seed,
                    "threads": args.threads,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "logging_steps": args.logging_steps,
                    "collate_repeats": args.collate_repeats,
                    "breakdown": args.breakdown,
                }
                result = run_worker(script, payload, env, timeout=args.worker_timeout)
                runs[name].append(result)
                print(f"  round {round_index} {name:9s} step {1e3 * statistics.median(result['step_s']):8.1f} ms  "
                      f"load {result['load_avg_before']:.2f}", file=sys.stderr)  # fmt: skip
        per_config = aggregate(args, runs)
        table = print_table(args, per_config)
        report = {
            "benchmark": "dpo_token_overhead",
            "description": (
                "TokenDPOTrainer token losses vs stock trl.DPOTrainer: same model init, data, order and optimizer; "
                "each configuration in a fresh subprocess, alternating order over rounds. Step time = interval between "
                "optimizer-step ends after warmup. Memory = peak during training minus after construction (delta) "
                "and absolute (CPU: RSS high-water mark; CUDA: max_memory_allocated)."
            ),
            "target_ratio": TARGET_RATIO,
            "machine": machine_info(args.device),
            "shape": {**shape, "device": args.device, "configs": args.configs, "model": "Qwen2ForCausalLM (random)",
                      "attn_implementation": "sdpa", "optimizer": "adamw_torch", **data_info},  # fmt: skip
            "orders": orders,
            "wall_s": time.time() - started,
            "table": table,
            "configs": per_config,
            "runs": runs,
        }
        report["shape"].pop("model_path", None)
        path = write_json(out, report)
        print(f"wrote {path}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration, one fresh process
# ---------------------------------------------------------------------------------------------------------------------


def build_trainer(p: dict):
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(p["model_path"])
    dataset = datasets.load_from_disk(p["data_path"])
    common = training_kwargs(p)
    if p["token_loss_type"] is None:
        return DPOTrainer(model=p["model_path"], args=DPOConfig(**common), train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    args = TokenDPOConfig(token_loss_type=p["token_loss_type"], **common)
    return TokenDPOTrainer(model=p["model_path"], args=args, train_dataset=dataset, processing_class=tokenizer)


def worker(payload_path: Path) -> int:
    p = json.loads(Path(payload_path).read_text())
    prepare_worker(p)
    trainer, result = measured_training(p, build_trainer)
    cuda = p["device"] == "cuda"
    result.update(breakdown(trainer, p, cuda))
    Path(p["result_path"]).write_text(json.dumps(result))
    return 0


# Methods of TokenDPOTrainer timed in the breakdown (each is called once per step; `_token_level_loss` includes the
# `_log_token_stats` calls).
TOKEN_PARTS = ("_reference_forward", "_token_level_loss", "_log_token_stats", "_log_dpo_metrics")


def breakdown(trainer, p: dict, cuda: bool) -> dict:
    """After training, outside the measured loop: where a step's time goes, per component, in ms.

    Batch fetch (Arrow -> Python rows) and collation over every batch (`--collate-repeats` passes), then `--breakdown`
    repetitions of `compute_loss` + `backward` on the first batch with the token trainer's parts timed by wrapping
    them on the instance. The clock is process CPU time on CPU (robust to other load; single-threaded Python work
    and `--threads` compute) and synchronized wall time on CUDA.
    """
    import torch

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    # The same dataset view and collator the Trainer's DataLoader uses.
    train_dataset = trainer._remove_unused_columns(trainer.train_dataset, description="training")
    size = len(train_dataset)
    batches = [list(range(i, min(i + p["batch"], size))) for i in range(0, size, p["batch"])]
    fetch_ms, collate_ms, tokens = [], [], []
    for _ in range(p["collate_repeats"]):
        for indices in batches:
            t0 = time.process_time()
            examples = train_dataset.__getitems__(indices)
            t1 = time.process_time()
            batch = trainer.data_collator(examples)
            t2 = time.process_time()
            fetch_ms.append(1e3 * (t1 - t0))
            collate_ms.append(1e3 * (t2 - t1))
            tokens.append(int(batch["attention_mask"].sum()))
    out = {
        "fetch_ms_median": statistics.median(fetch_ms),
        "collate_ms_median": statistics.median(collate_ms),
        "tokens_per_step": statistics.median(tokens),
        "batch_keys": sorted(batch),
        "breakdown_clock": "cuda-synchronized wall" if cuda else "process CPU time",
    }
    if p["breakdown"] < 1:
        return out

    parts: dict[str, float] = {}
    if p["token_loss_type"] is not None:
        for name in TOKEN_PARTS:
            method = getattr(trainer, name)

            def timed(*args, _method=method, _name=name, **kwargs):
                t0 = now()
                value = _method(*args, **kwargs)
                parts[_name] = parts.get(_name, 0.0) + now() - t0
                return value

            setattr(trainer, name, timed)
    model = trainer.model
    model.train()
    inputs = trainer._prepare_inputs(trainer.data_collator(train_dataset.__getitems__(batches[0])))
    samples: dict[str, list[float]] = {}
    for _ in range(p["breakdown"]):
        parts.clear()
        t0 = now()
        with trainer.compute_loss_context_manager():  # autocast as in `training_step`
            loss = trainer.compute_loss(model, inputs)
        t1 = now()
        loss.backward()
        t2 = now()
        model.zero_grad(set_to_none=True)
        for key, value in {"loss_forward": t1 - t0, "backward": t2 - t1, **parts}.items():
            samples.setdefault(key, []).append(1e3 * value)
    for name in TOKEN_PARTS:
        trainer.__dict__.pop(name, None)  # drop the instance wrappers
    out["breakdown_ms"] = {key: statistics.median(values) for key, values in samples.items()}
    return out


if __name__ == "__main__":
    sys.exit(main())
