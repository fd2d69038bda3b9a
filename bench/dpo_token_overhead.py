"""Step time and peak memory of `TokenDPOTrainer` token-scalar losses against stock `trl.DPOTrainer`.

Configurations (same model init, same data and data order, same optimizer and schedule):

    stock     trl.DPOTrainer                                     (no per-token columns)
    weighted  TokenDPOTrainer(token_loss_type="weighted")        chosen/rejected_token_weights
    tgdpo     TokenDPOTrainer(token_loss_type="tgdpo")           chosen/rejected_token_rewards (offline rewards)
    cdpo      TokenDPOTrainer(token_loss_type="cdpo")            rejected_token_weights only (cDPO's only_neg default)
    treg      TokenDPOTrainer(token_loss_type="treg")            chosen/rejected_token_rewards (opt-in: --configs)

The parent builds a Qwen2-shaped model with random weights from a config, a byte-level BPE tokenizer trained in memory
on pseudo-words, and synthetic preference rows, once per shape (`--sweep BATCHxLEN,...`), then runs every configuration
in worker processes of its own (`--worker-scope`, `bench/common.py`), in alternating order over `--rounds` (>= 3)
rounds; each trains `--warmup` + `--steps` optimizer steps and reports the measured steps only.

Measured per configuration (`bench/common.py` rules): in-loop component timings of every measured step (CPU default:
`compute_loss` + `backward`, and the LM-head kernels, in process CPU time), the wall and CPU-time interval between
optimizer-step ends, peak memory (CPU: `VmHWM` of the worker; CUDA: max allocated and reserved), and after training
a breakdown: batch fetch and collation per batch, and `compute_loss` / `backward` with the token trainer's reference
forward, token loss, token stats and DPO metrics timed separately (`--breakdown` repetitions). Ratios to stock come
with the min-max of the per-round paired ratios. Target: <= 1.05x stock.

    python bench/dpo_token_overhead.py                      # CPU defaults, a few minutes on 2 cores
    python bench/dpo_token_overhead.py --sweep 1x256,2x512  # batch x sequence sweep
    python bench/dpo_token_overhead.py --device cuda        # Qwen2.5-0.5B shape, 1024 tokens, bf16, grad checkpointing
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    build_word_tokenizer,
    format_table,
    pseudo_words,
    start_benchmark,
    worker_main,
)
from dpo_bench import (  # noqa: E402
    import_trainers,
    main_table,
    make_parser,
    measured_training,
    model_cache,
    prepare_worker,
    resolve_args,
    save_random_qwen2,
    sweep_and_write,
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
                seq_len=128, batch=2, warmup=1, steps=4, rounds=3, dtype="float32", gradient_checkpointing=False,
                threads=1),
    "cuda": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tokenizer_vocab=16384,
                 seq_len=1024, batch=4, warmup=2, steps=6, rounds=3, dtype="bfloat16", gradient_checkpointing=True,
                 threads=4),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser, run = make_parser(__doc__, CONFIGS, DEFAULT_CONFIGS, "preference pairs per step (2x sequences)",
                              "JSON path (default bench/results/dpo_token_overhead_<device>.json)")  # fmt: skip
    run.add_argument("--collate-repeats", type=int, default=3, help="passes over the data for the collation timing")
    run.add_argument(
        "--breakdown",
        type=int,
        default=1,
        help="after training, time compute_loss/backward and the token trainer's parts this many\n"
        "times per run (0: off)",
    )
    return resolve_args(parser, parser.parse_args(argv), PRESETS, CONFIGS)


# ---------------------------------------------------------------------------------------------------------------------
# Parent: build model and data once per shape, run the workers, print the tables
# ---------------------------------------------------------------------------------------------------------------------


def build_model_and_data(args, workdir: Path) -> dict:
    """Save the model + tokenizer and one dataset per configuration under `workdir`; return row statistics."""
    import torch

    words = pseudo_words(max(2048, args.tokenizer_vocab // 2), args.seed)
    tokenizer = build_word_tokenizer(words, args.tokenizer_vocab, args.seed)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens but --vocab is {args.vocab}")
    model_path = workdir / "model"
    num_params = save_random_qwen2(args, tokenizer, model_path, args.seed, model_cache(workdir.parent))

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


def targets(args) -> dict:
    time_key = "step_s" if args.device == "cuda" else "cpu_step_s"
    memory_key = "cuda_alloc_peak_bytes" if args.device == "cuda" else "rss_peak_bytes"
    return {name: {time_key: TARGET_RATIO, memory_key: TARGET_RATIO} for name in CONFIGS if name != "stock"}


BREAKDOWN_LABELS = {"fetch_ms": "fetch ms", "collate_ms": "collate ms", "loss_forward": "loss fwd ms",
                    "backward": "backward ms", "_reference_forward": "ref fwd ms", "_token_level_loss": "token loss ms",
                    "_log_token_stats": "token stats ms", "_log_dpo_metrics": "dpo metrics ms"}  # fmt: skip


def print_tables(args, shape_result: dict) -> str:
    per_config, shape = shape_result["configs"], shape_result["shape"]
    table = f"batch {shape['batch']} x {shape['seq_len']} tokens:\n" + main_table(
        per_config, args.device == "cuda", targets(args)
    )
    clock = "CUDA-synced wall" if args.device == "cuda" else "CPU time"
    rows = [[name, *(f"{e['breakdown'][key]:.2f}" if key in e.get("breakdown", {}) else "-" for key in BREAKDOWN_LABELS)]
            for name, e in per_config.items()]  # fmt: skip
    table += (
        f"\n\nPer-step breakdown ({clock}, outside the measured loop; fetch/collate per batch in CPU time; "
        "'token loss' includes 'token stats'):\n" + format_table(["config", *BREAKDOWN_LABELS.values()], rows)
    )
    print(table)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker, worker, import_trainers)
    started_paths = start_benchmark("dpo_token_overhead", args)
    if started_paths is None:
        return 0
    out, workdir = started_paths
    settings = {key: getattr(args, key) for key in (*PRESETS["cpu"], "prompt_frac", "logging_steps", "seed", "sweep",
                                                     "components", "breakdown", "collate_repeats", "configs",
                                                     "device", "worker_scope")}  # fmt: skip
    print(f"dpo_token_overhead: {settings} workdir={workdir}", file=sys.stderr)
    try:

        def payload_for(name, data_info, shape_dir):
            return {"model_path": data_info["model_path"], "data_path": str(shape_dir / "data" / name),
                    "collate_repeats": args.collate_repeats}  # fmt: skip

        configs = {name: {"token_loss_type": CONFIGS[name][0]} for name in CONFIGS}

        sweep_and_write(
            args,
            Path(__file__).resolve(),
            workdir,
            configs,
            build_model_and_data,
            payload_for,
            out,
            benchmark="dpo_token_overhead",
            description=(
                "TokenDPOTrainer token-scalar losses vs stock trl.DPOTrainer: same model init, data, order and "
                "optimizer; each configuration in worker processes of its own (settings.worker_scope), "
                "alternating order over rounds, warm-up steps excluded. Times per measured step; memory per run "
                "(CPU: VmHWM of the worker; CUDA: max allocated and reserved)."
            ),
            targets=targets(args),
            settings=settings,
            print_tables=print_tables,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one run of one configuration (a kept worker measures run after run: `common.serve`)
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
    result["breakdown"] = breakdown(trainer, p, p["device"] == "cuda")
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
        "fetch_ms": statistics.median(fetch_ms),
        "collate_ms": statistics.median(collate_ms),
        "tokens_per_step": statistics.median(tokens),
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
    out.update({key: statistics.median(values) for key, values in samples.items()})
    return out


if __name__ == "__main__":
    sys.exit(main())
