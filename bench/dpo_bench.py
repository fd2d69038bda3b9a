"""What the two DPO benchmarks (`dpo_token_overhead.py`, `dpo_memory.py`) share: the command line and its presets,
the random Qwen2-shaped model, the synthetic preference data, the trainer settings, and the measured training run of
one worker."""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

from common import (
    make_step_timer,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    synthetic_preference_rows,
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
    run.add_argument("--rounds", type=int, help="runs per configuration, in alternating order")
    run.add_argument("--configs", default=",".join(default_configs), help=f"comma-separated subset of {list(configs)}")
    run.add_argument("--threads", type=int,
                     help="OMP/MKL/torch threads in every run (CPU default 1: on a small shared machine two OpenMP\n"
                          "threads slow down erratically whenever another process takes a core)")
    run.add_argument("--logging-steps", type=int, default=1)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--worker-timeout", type=float, default=3600)
    run.add_argument("--out", type=Path, help=out_help)
    run.add_argument("--workdir", type=Path, help="keep model/data/logs here instead of a temporary directory")
    run.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser, run


def resolve_args(parser, args, presets: dict, configs: dict):
    """Fill unset shape/run values from the device preset and validate the configuration list."""
    if args.worker is not None:
        return args
    for key, value in presets[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tokenizer_vocab = min(args.tokenizer_vocab, args.vocab)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in configs]
    if unknown or "stock" not in args.configs:
        parser.error(f"--configs must include 'stock' and name only {list(configs)}; got unknown {unknown}")
    if args.warmup < 1 or args.steps < 2:
        parser.error("need --warmup >= 1 (optimizer state allocation) and --steps >= 2")
    return args


def save_random_qwen2(args, tokenizer, path: Path, seed: int) -> int:
    """A Qwen2-shaped causal LM with random weights (tied embeddings, as Qwen2.5-0.5B) saved with the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    num_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return num_params


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


def prepare_worker(p: dict) -> None:
    """Thread count and quiet, cache-free `datasets` in a worker process."""
    import datasets
    import torch

    torch.set_num_threads(p["threads"])
    datasets.disable_caching()  # every run tokenizes from scratch, no cache files shared between runs
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def measured_training(p: dict, build_trainer):
    """Build the trainer, reset the memory peaks, train with a step timer; return `(trainer, result)`.

    Step times are intervals between optimizer-step ends after `p["warmup"]` steps. Memory: CPU peak RSS during
    training minus RSS after construction (and absolute); CUDA `max_memory_allocated` after a reset (and absolute).
    """
    import torch

    cuda = p["device"] == "cuda"
    load_avg_before = os.getloadavg()[0]
    started = time.perf_counter()
    trainer = build_trainer(p)
    construct_s = time.perf_counter() - started

    gc.collect()
    rss_after_construct = rss_bytes()
    rss_peak_construct = peak_rss_bytes()
    peak_reset_ok = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cuda_after_construct = torch.cuda.memory_allocated()

    timer = make_step_timer(cuda)
    trainer.add_callback(timer)
    trainer.train()

    result = {
        "config": p["config"],
        "round": p["round"],
        "construct_s": construct_s,
        "step_s": timer.step_times(p["warmup"]),
        "cpu_step_s": timer.cpu_step_times(p["warmup"]),
        "compute_s": timer.compute_times(p["warmup"]),
        "data_s": timer.data_times(p["warmup"]),
        "warmup_step_s": timer.step_times(0)[: p["warmup"]],
        "rss_after_construct_bytes": rss_after_construct,
        "rss_peak_construct_bytes": rss_peak_construct,
        "rss_peak_train_bytes": peak_rss_bytes(),
        "peak_reset_ok": peak_reset_ok,
        "load_avg_before": load_avg_before,
        "load_avg_after": os.getloadavg()[0],
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "logged_metrics": sorted({k for e in trainer.state.log_history for k in e}),
    }
    result["rss_peak_delta_bytes"] = result["rss_peak_train_bytes"] - rss_after_construct
    if cuda:
        result["cuda_after_construct_bytes"] = cuda_after_construct
        result["cuda_peak_abs_bytes"] = torch.cuda.max_memory_allocated()
        result["cuda_peak_delta_bytes"] = result["cuda_peak_abs_bytes"] - cuda_after_construct
        result["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
    if len(result["step_s"]) != p["steps"]:
        raise RuntimeError(f"expected {p['steps']} measured steps, got {len(result['step_s'])}")
    return trainer, result
