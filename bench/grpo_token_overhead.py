"""Step time and peak memory of `TokenGRPOTrainer` token methods against stock `trl.GRPOTrainer`, on the same rollouts.

Configurations (same model init, prompts, rollouts, data order, optimizer and seed):

    stock             trl.GRPOTrainer
    entropy_quantile  token_selection="entropy_quantile"   (80/20 forking tokens, global quantile)
    entropy_band      token_selection="entropy_band"       (SPINE: forking tokens + entropy-band term)
    ucas              token_advantage="ucas"               (self-certainty from hidden states + fused log-probs)
    hapo              token_advantage="hapo"               (TLGA, redistribution, per-token clip ranges)
    gtpo              token_advantage="gtpo"
    d3s               token_advantage="d3s"
    tempo             token_advantage="tempo"
    tw_grpo           token_advantage="tw_grpo"            (full distributions: an extra vocabulary-tiled head pass;
                                                            reported, not held to the target)

"Same rollouts": every run replays identical completions through TRL's `rollout_func` hook (token ids drawn once from
a seeded generator per prompt and sample index, variable lengths ending in EOS), so a step is exactly TRL's scoring +
training work plus our shaping; generation time, which would dilute the ratio, is out of the measurement (HAPO's
adaptive-temperature sampler therefore is not timed here). Every configuration runs in its own fresh subprocess, in
alternating order over `--rounds` rounds; each trains `--warmup` + `--steps` optimizer steps and reports the measured
steps. Ratios are to stock: pooled medians, and per-round paired medians. Because a shared machine makes wall and even
CPU time of separate processes drift by 10% or more, each token run also measures the process CPU time spent inside
the shaping (`_shape_token_batch`) per step; `1 + shaping / stock step` is the load-robust overhead (it does not see
loss-side extras such as SPINE's backward through the entropy). Target: at most 1.05x for methods without extra models
or full-distribution passes.

    python bench/grpo_token_overhead.py                     # CPU defaults, several minutes on 2 cores
    python bench/grpo_token_overhead.py --configs stock,entropy_quantile,hapo --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
    make_step_timer,
    peak_rss_bytes,
    pseudo_words,
    reset_peak_rss,
    round_orders,
    rss_bytes,
    run_worker,
    summarize,
    worker_env,
    write_json,
)

TARGET_RATIO = 1.05

# Configuration -> TokenGRPOConfig overrides (None: stock trl.GRPOTrainer), and whether the target applies.
CONFIGS = {
    "stock": (None, True),
    "entropy_quantile": ({"token_selection": "entropy_quantile"}, True),
    "entropy_band": ({"token_selection": "entropy_band"}, True),
    "ucas": ({"token_advantage": "ucas"}, True),
    "hapo": ({"token_advantage": "hapo"}, True),
    "gtpo": ({"token_advantage": "gtpo"}, True),
    "d3s": ({"token_advantage": "d3s"}, True),
    "tempo": ({"token_advantage": "tempo"}, True),
    "tw_grpo": ({"token_advantage": "tw_grpo"}, False),
}
DEFAULT_CONFIGS = list(CONFIGS)

PRESETS = {
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, vocab=8192, tokenizer_vocab=8192,
                prompt_len=64, completion_len=128, batch=8, num_generations=4, warmup=2, steps=6, rounds=3,
                threads=1),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    shape = parser.add_argument_group("shape (defaults: PRESETS['cpu'])")
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "tokenizer-vocab", "prompt-len",
                 "completion-len", "batch", "num-generations"):  # fmt: skip
        shape.add_argument(f"--{name}", type=int)
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, help="measured optimizer steps per run")
    run.add_argument("--warmup", type=int, help="unmeasured optimizer steps before them")
    run.add_argument("--rounds", type=int, help="runs per configuration, in alternating order")
    run.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    run.add_argument("--threads", type=int, help="OMP/torch threads in every run (default 1)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--worker-timeout", type=float, default=3600)
    run.add_argument("--out", type=Path, help="JSON path (default bench/results/grpo_token_overhead_cpu.json)")
    run.add_argument("--workdir", type=Path, help="keep model/data/logs here instead of a temporary directory")
    run.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    for key, value in PRESETS["cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tokenizer_vocab = min(args.tokenizer_vocab, args.vocab)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or "stock" not in args.configs:
        parser.error(f"--configs must include 'stock' and name only {list(CONFIGS)}; got unknown {unknown}")
    if args.warmup < 1 or args.steps < 2 or args.batch % args.num_generations:
        parser.error("need --warmup >= 1, --steps >= 2 and --batch a multiple of --num-generations")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------------


def build_model_and_data(args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM

    words = pseudo_words(max(2048, args.tokenizer_vocab // 2), args.seed)
    tokenizer = build_word_tokenizer(words, args.tokenizer_vocab, args.seed)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model_path = workdir / "model"
    model.save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)
    num_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()

    import random

    rng = random.Random(args.seed)
    num_prompts = (args.warmup + args.steps) * args.batch // args.num_generations
    prompts = []
    for index in range(num_prompts):
        text = " ".join(rng.choices(words, k=args.prompt_len))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.prompt_len - 3]
        prompts.append({"prompt": f"Q{index}: " + tokenizer.decode(ids) + "\nA:"})
    Dataset.from_list(prompts).save_to_disk(str(workdir / "data"))
    return {"model_path": str(model_path), "num_params": num_params, "num_prompts": num_prompts,
            "tokenizer_size": len(tokenizer)}  # fmt: skip


def aggregate(runs: dict[str, list[dict]]) -> dict:
    per_config = {}
    for name, results in runs.items():
        per_config[name] = {
            "overrides": CONFIGS[name][0],
            "target_applies": CONFIGS[name][1],
            "step_s": summarize([s for r in results for s in r["step_s"]]),
            "cpu_step_s": summarize([s for r in results for s in r["cpu_step_s"]]),
            "step_s_round_medians": [statistics.median(r["step_s"]) for r in results],
            "cpu_step_s_round_medians": [statistics.median(r["cpu_step_s"]) for r in results],
            "mem_peak_delta_mb": statistics.median(r["rss_peak_delta_bytes"] / 2**20 for r in results),
            "mem_peak_abs_mb": statistics.median(r["rss_peak_train_bytes"] / 2**20 for r in results),
            "final_loss": [r["losses"][-1] if r["losses"] else None for r in results],
            "load_avg_1m": [r["load_avg_before"] for r in results],
            "shaping_cpu_ms_per_step": statistics.median(1e3 * r["shaping_cpu_s_per_step"] for r in results),
        }
    stock = per_config["stock"]
    for entry in per_config.values():
        paired = [a / b for a, b in zip(entry["step_s_round_medians"], stock["step_s_round_medians"])]
        paired_cpu = [a / b for a, b in zip(entry["cpu_step_s_round_medians"], stock["cpu_step_s_round_medians"])]
        entry["ratios"] = {
            "step_time": entry["step_s"]["median"] / stock["step_s"]["median"],
            "step_time_paired_rounds": paired,
            "step_time_paired_median": statistics.median(paired),
            "step_cpu_time": entry["cpu_step_s"]["median"] / stock["cpu_step_s"]["median"],
            "step_cpu_time_paired_median": statistics.median(paired_cpu),
            "mem_peak_abs": entry["mem_peak_abs_mb"] / stock["mem_peak_abs_mb"],
            # Stock's step plus the CPU time measured inside the shaping: insensitive to the machine's other load, but
            # blind to loss-side extras (SPINE's backward through the entropy, CHORD's expert forward).
            "shaping_overhead": 1.0 + entry["shaping_cpu_ms_per_step"] / (1e3 * stock["cpu_step_s"]["median"]),
        }
        entry["within_target"] = {
            "step_time": entry["ratios"]["step_time"] <= TARGET_RATIO,
            "step_cpu_time": entry["ratios"]["step_cpu_time"] <= TARGET_RATIO,
            "shaping_overhead": entry["ratios"]["shaping_overhead"] <= TARGET_RATIO,
        }
    return per_config


def print_table(per_config: dict) -> str:
    headers = ["config", "step ms", "IQR ms", "x stock", "paired x (min-max)", "CPU-time x", "shaping ms", "1+shaping x",
               "peak RSS MB", "x stock", f"<={TARGET_RATIO}x wall/cpu/shaping"]  # fmt: skip
    rows = []
    for name, e in per_config.items():
        r, ok = e["ratios"], e["within_target"]
        paired = r["step_time_paired_rounds"]
        rows.append([
            name, f"{1e3 * e['step_s']['median']:.1f}", f"{1e3 * (e['step_s']['p75'] - e['step_s']['p25']):.1f}",
            f"{r['step_time']:.3f}", f"{r['step_time_paired_median']:.3f} ({min(paired):.3f}-{max(paired):.3f})",
            f"{r['step_cpu_time']:.3f}", f"{e['shaping_cpu_ms_per_step']:.1f}", f"{r['shaping_overhead']:.3f}",
            f"{e['mem_peak_abs_mb']:.1f}", f"{r['mem_peak_abs']:.3f}",
            ("/".join("y" if ok[k] else "N" for k in ("step_time", "step_cpu_time", "shaping_overhead")))
            + ("" if e["target_applies"] else " (n/a)"),
        ])  # fmt: skip
    table = format_table(headers, rows)
    print(table)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    import datasets

    datasets.disable_progress_bars()
    out = args.out or RESULTS_DIR / "grpo_token_overhead_cpu.json"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="grpo_token_overhead_"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runs").mkdir(exist_ok=True)
    shape = {key: getattr(args, key) for key in (*PRESETS["cpu"], "seed")}
    print(f"grpo_token_overhead: shape={shape} configs={args.configs} workdir={workdir}", file=sys.stderr)
    try:
        started = time.time()
        data_info = build_model_and_data(args, workdir)
        env = worker_env(args.threads)
        script = Path(__file__).resolve()
        runs: dict[str, list[dict]] = {name: [] for name in args.configs}
        orders = round_orders(args.configs, args.rounds)
        for round_index, order in enumerate(orders):
            for name in order:
                payload = {
                    "config": name, "round": round_index, "overrides": CONFIGS[name][0],
                    "model_path": data_info["model_path"], "data_path": str(workdir / "data"),
                    "output_dir": str(workdir / "runs" / f"{name}_{round_index}"),
                    "result_path": str(workdir / "runs" / f"{name}_{round_index}.json"),
                    **{key: getattr(args, key) for key in ("completion_len", "batch", "num_generations", "warmup",
                                                            "steps", "seed", "threads")},
                }  # fmt: skip
                result = run_worker(script, payload, env, timeout=args.worker_timeout)
                runs[name].append(result)
                print(f"  round {round_index} {name:17s} step {1e3 * statistics.median(result['step_s']):8.1f} ms  "
                      f"cpu {1e3 * statistics.median(result['cpu_step_s']):8.1f} ms  load {result['load_avg_before']:.2f}",
                      file=sys.stderr)  # fmt: skip
        per_config = aggregate(runs)
        table = print_table(per_config)
        report = {
            "benchmark": "grpo_token_overhead",
            "description": (
                "TokenGRPOTrainer token methods vs stock trl.GRPOTrainer on identical replayed rollouts (rollout_func): "
                "same model init, prompts, completions, data order, optimizer and seed; each configuration in a fresh "
                "subprocess, alternating order over rounds. Step time = interval between optimizer-step ends after "
                "warmup (scoring + loss forward/backward + optimizer + shaping + logging). Memory = CPU RSS "
                "high-water mark during training."
            ),
            "target_ratio": TARGET_RATIO,
            "machine": machine_info("cpu"),
            "shape": {**shape, "configs": args.configs, "model": "Qwen2ForCausalLM (random)", "loss_type": "dapo",
                      "beta": 0.0, "logging_steps": 1, **data_info},  # fmt: skip
            "orders": orders,
            "wall_s": time.time() - started,
            "table": table,
            "configs": per_config,
            "runs": runs,
        }
        report["shape"].pop("model_path", None)
        print(f"wrote {write_json(out, report)}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration, one fresh process
# ---------------------------------------------------------------------------------------------------------------------


def replay_rollout_func(tokenizer, completion_len: int, seed: int):
    """A `rollout_func` returning the same completions for the same prompt in every run: ids drawn from a generator
    seeded by the prompt's index and the sample's index in its group, lengths in [completion_len/2, completion_len],
    ending in EOS."""
    import torch

    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    def rollout(prompts, trainer):
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completions, seen = [], {}
        for prompt in prompts:
            index = int(prompt.split(":", 1)[0][1:])
            sample = seen.get(index, 0)
            seen[index] = sample + 1
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 101 + sample)
            length = int(torch.randint(completion_len // 2, completion_len, (1,), generator=generator))
            ids = allowed[torch.randint(0, len(allowed), (length - 1,), generator=generator)].tolist()
            completions.append(ids + [tokenizer.eos_token_id])
        return {"prompt_ids": prompt_ids, "completion_ids": completions,
                "logprobs": [[0.0] * len(ids) for ids in completions]}  # fmt: skip

    return rollout


def worker(payload_path: Path) -> int:
    p = json.loads(Path(payload_path).read_text())
    import torch

    torch.set_num_threads(p["threads"])
    import datasets
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig
    from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(p["model_path"])
    dataset = datasets.load_from_disk(p["data_path"])

    def reward(completion_ids, **kwargs):
        return [(sum(ids) % 97) / 97 for ids in completion_ids]

    common = dict(
        output_dir=p["output_dir"], per_device_train_batch_size=p["batch"], num_generations=p["num_generations"],
        max_completion_length=p["completion_len"], max_steps=p["warmup"] + p["steps"], learning_rate=1e-5,
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
        dataloader_pin_memory=False, disable_tqdm=True, seed=p["seed"], use_cpu=True, shuffle_dataset=False,
    )  # fmt: skip
    if p["overrides"] is None:
        trainer_cls, args = GRPOTrainer, GRPOConfig(**common)
    else:
        trainer_cls, args = TokenGRPOTrainer, TokenGRPOConfig(**common, **p["overrides"])
    timer = make_step_timer()
    construct_start = time.perf_counter()
    trainer = trainer_cls(model=p["model_path"], reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer],
                          rollout_func=replay_rollout_func(tokenizer, p["completion_len"], p["seed"]))  # fmt: skip
    construct_s = time.perf_counter() - construct_start
    # Load-robust view of the overhead: process CPU time spent inside the token shaping itself, per optimizer step.
    shaping = {"cpu_s": 0.0, "calls": 0}
    if hasattr(trainer, "_shape_token_batch"):
        shape_batch = trainer._shape_token_batch

        def timed_shape(*shape_args, **shape_kwargs):
            started = time.process_time()
            try:
                return shape_batch(*shape_args, **shape_kwargs)
            finally:
                shaping["cpu_s"] += time.process_time() - started
                shaping["calls"] += 1

        trainer._shape_token_batch = timed_shape
    gc.collect()
    rss_after_construct = rss_bytes()
    peak_reset_ok = reset_peak_rss()
    load_avg = os.getloadavg()[0]
    trainer.train()
    result = {
        "config": p["config"],
        "round": p["round"],
        "step_s": timer.step_times(p["warmup"]),
        "cpu_step_s": timer.cpu_step_times(p["warmup"]),
        "construct_s": construct_s,
        "rss_after_construct_bytes": rss_after_construct,
        "rss_peak_train_bytes": peak_rss_bytes(),
        "rss_peak_delta_bytes": peak_rss_bytes() - rss_after_construct,
        "peak_reset_ok": peak_reset_ok,
        "load_avg_before": load_avg,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "shaping_cpu_s_per_step": shaping["cpu_s"] / max(1, p["warmup"] + p["steps"]),
    }
    Path(p["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
