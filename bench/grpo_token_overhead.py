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

"Same rollouts": every run replays identical completions through TRL's `rollout_func` hook (token ids drawn once from a
seeded generator per prompt and sample index, variable lengths ending in EOS), so a step is exactly TRL's scoring +
training work plus our shaping; generation time, which would dilute the ratio, is out of the measurement (HAPO's
adaptive-temperature sampler therefore is not timed here). Every configuration runs in worker processes of its own
(`--worker-scope`, `bench/common.py`), in alternating order over `--rounds` rounds; each trains `--warmup` + `--steps`
optimizer steps and reports the measured steps. Ratios are to stock: pooled medians, with the min-max of the per-round
paired ratios. Because a shared machine makes wall and even CPU time of separate processes drift by 10% or more, every
run also records in-loop component timings per measured step (`bench/common.py`; CPU default): the token shaping
(`_shape_token_batch`), `compute_loss` and `backward`, in process CPU time; `1 + shaping / stock step` is the
load-robust overhead of the shaping (it does not see loss-side extras such as SPINE's backward through the entropy,
which the `loss fwd+bwd` ratio does). Memory: CPU `VmHWM` of the worker; CUDA max allocated and reserved. Target: at
most 1.05x for methods without extra models or full-distribution passes.

    python bench/grpo_token_overhead.py                     # CPU defaults, several minutes on 2 cores
    python bench/grpo_token_overhead.py --configs stock,entropy_quantile,hapo --sweep 8x64,8x128
    python bench/grpo_token_overhead.py --device cuda       # Qwen2.5-0.5B shape, bf16, 16 completions of <= 512 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ComponentTimer,
    MemoryProbe,
    WorkerPool,
    add_worker_scope_argument,
    aggregate_runs,
    apply_presets,
    build_word_tokenizer,
    default_worker_scope,
    format_table,
    machine_info,
    make_step_timer,
    measure_rounds,
    parse_sweep,
    pseudo_words,
    ratio_cell,
    start_benchmark,
    worker_env,
    worker_main,
    write_json,
)
from dpo_bench import model_cache, save_random_qwen2  # noqa: E402

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
                prompt_len=32, completion_len=64, batch=8, num_generations=4, warmup=1, steps=3, rounds=3,
                threads=1, dtype="float32"),
    "cuda": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tokenizer_vocab=16384,
                 prompt_len=128, completion_len=512, batch=16, num_generations=4, warmup=2, steps=5, rounds=3,
                 threads=4, dtype="bfloat16"),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    shape = parser.add_argument_group("shape (defaults: PRESETS[--device])")
    shape.add_argument("--dtype", choices=["float32", "bfloat16"])
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "tokenizer-vocab", "prompt-len",
                 "completion-len", "batch", "num-generations"):  # fmt: skip
        shape.add_argument(f"--{name}", type=int)
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, help="measured optimizer steps per run")
    run.add_argument("--warmup", type=int, help="unmeasured optimizer steps before them")
    run.add_argument("--rounds", type=int, help="runs per configuration, in alternating order (>= 3)")
    run.add_argument("--sweep", help="batch x completion-length shapes, e.g. 8x64,8x128 (default: the preset's)")
    run.add_argument(
        "--components",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="in-loop component timings (default on for CPU, off for CUDA: they synchronize)",
    )
    run.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    run.add_argument("--threads", type=int, help="OMP/torch threads in every run (default 1)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--worker-timeout", type=float, default=3600, help="seconds one measured run may take")
    add_worker_scope_argument(run)
    run.add_argument("--out", type=Path, help="JSON path (default bench/results/grpo_token_overhead_<device>.json)")
    run.add_argument("--workdir", type=Path, help="keep model/data/logs here instead of a temporary directory")
    run.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    apply_presets(args, PRESETS)
    if args.components is None:
        args.components = args.device == "cpu"
    if args.worker_scope is None:
        args.worker_scope = default_worker_scope(args.device)
    args.tokenizer_vocab = min(args.tokenizer_vocab, args.vocab)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or "stock" not in args.configs:
        parser.error(f"--configs must include 'stock' and name only {list(CONFIGS)}; got unknown {unknown}")
    if args.warmup < 1 or args.steps < 2 or args.rounds < 3 or args.batch % args.num_generations:
        parser.error("need --warmup >= 1, --steps >= 2, --rounds >= 3 and --batch a multiple of --num-generations")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------------


def build_model_and_data(args, workdir: Path) -> dict:
    from datasets import Dataset

    words = pseudo_words(max(2048, args.tokenizer_vocab // 2), args.seed)
    tokenizer = build_word_tokenizer(words, args.tokenizer_vocab, args.seed)
    model_path = workdir / "model"
    num_params = save_random_qwen2(args, tokenizer, model_path, args.seed, model_cache(workdir.parent))

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


def shaping_overhead(per_config: dict) -> None:
    """`1 + shaping CPU per step / stock CPU step`: the load-robust overhead of the shaping alone."""
    stock = per_config["stock"]["times"]["cpu_step_s"]["median"]
    for entry in per_config.values():
        shaping = entry["times"].get("shaping")
        entry["shaping_overhead"] = 1.0 + shaping["median"] / stock if shaping else None


def print_table(args, shape_result: dict) -> str:
    per_config, shape = shape_result["configs"], shape_result["shape"]
    cuda = args.device == "cuda"
    time_keys = [("step_s", "step ms"), ("cpu_step_s", "CPU step ms")]
    if args.components:
        time_keys.append(("fwd_bwd", "loss fwd+bwd ms"))
    memory_keys = [("cuda_alloc_peak_bytes", "peak alloc GiB"), ("cuda_reserved_peak_bytes", "peak reserved GiB")] \
        if cuda else [("rss_peak_bytes", "peak RSS GiB"), ("rss_peak_delta_bytes", "RSS over constr. GiB")]  # fmt: skip
    headers = ["config"]
    for _, label in (*time_keys, *memory_keys):
        headers += [label, "x stock (rounds)"]
    headers += ["shaping ms", "1+shaping x", f"<={TARGET_RATIO}x"]
    rows = []
    for name, e in per_config.items():
        row = [name]
        for key, _ in time_keys:
            series = e["times"].get(key)
            row += [f"{1e3 * series['median']:.1f}" if series else "-", ratio_cell(e["ratios"].get(key))]
        for key, _ in memory_keys:
            row += [f"{e['memory'][key]['median'] / 2**30:.3f}", ratio_cell(e["ratios"].get(key))]
        shaping = e["times"].get("shaping")
        row += [f"{1e3 * shaping['median']:.1f}" if shaping else "-",
                f"{e['shaping_overhead']:.3f}" if e["shaping_overhead"] else "-"]  # fmt: skip
        time_key = "step_s" if cuda else "cpu_step_s"
        ok = e["ratios"][time_key]["pooled"] <= TARGET_RATIO
        row.append(("y" if ok else "N") + ("" if CONFIGS[name][1] else " (n/a)"))
        rows.append(row)
    table = f"batch {shape['batch']} x completions <= {shape['completion_len']} tokens:\n" + format_table(headers, rows)
    print(table)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker, worker, import_trainers)
    started_paths = start_benchmark("grpo_token_overhead", args)
    if started_paths is None:
        return 0
    out, workdir = started_paths
    settings = {
        key: getattr(args, key)
        for key in (*PRESETS["cpu"], "seed", "sweep", "components", "configs", "device", "worker_scope")
    }
    print(f"grpo_token_overhead: {settings} workdir={workdir}", file=sys.stderr)
    try:
        started = time.time()
        machine = machine_info(args.device)
        script = Path(__file__).resolve()

        def report(shapes, complete):
            return {
                "benchmark": "grpo_token_overhead",
                "description": (
                    "TokenGRPOTrainer token methods vs stock trl.GRPOTrainer on identical replayed rollouts "
                    "(rollout_func): same model init, prompts, completions, data order, optimizer and seed; each "
                    "configuration in worker processes of its own (settings.worker_scope), alternating order over "
                    "rounds, warm-up steps excluded. Step time = interval between optimizer-step ends (scoring + loss "
                    "forward/backward + optimizer + shaping + logging); in-loop components per step; memory: CPU "
                    "VmHWM of the worker, CUDA max allocated and reserved."
                ),
                "target_ratio": TARGET_RATIO,
                "machine": machine,
                "settings": {
                    **settings,
                    "model": "Qwen2ForCausalLM (random)",
                    "loss_type": "dapo",
                    "beta": 0.0,
                    "logging_steps": 1,
                },  # fmt: skip
                "wall_s": time.time() - started,
                "complete": complete,
                "tables": [shape["table"] for shape in shapes if "table" in shape],
                "shapes": shapes,
            }

        shapes = []
        pool = WorkerPool(
            script, worker_env(args.threads), args.worker_scope, args.worker_timeout, args.device == "cuda"
        )
        with pool:
            pool.start(args.configs, workdir)  # kept workers start up while the model and data are built
            for batch, completion_len in parse_sweep(args.sweep, (args.batch, args.completion_len)):
                args.batch, args.completion_len = batch, completion_len
                shape_dir = workdir / f"b{batch}_c{completion_len}"
                (shape_dir / "runs").mkdir(parents=True, exist_ok=True)
                data_info = build_model_and_data(args, shape_dir)
                shape_result = {"shape": {"batch": batch, "completion_len": completion_len},
                                "data": {k: v for k, v in data_info.items() if k != "model_path"}}  # fmt: skip
                shapes.append(shape_result)

                def payload(name, round_index, data_info=data_info, shape_dir=shape_dir):
                    return {
                        "config": name, "round": round_index, "overrides": CONFIGS[name][0],
                        "model_path": data_info["model_path"], "data_path": str(shape_dir / "data"),
                        "output_dir": str(shape_dir / "runs" / f"{name}_{round_index}"),
                        "result_path": str(shape_dir / "runs" / f"{name}_{round_index}.json"),
                        **{key: getattr(args, key) for key in ("completion_len", "batch", "num_generations", "warmup",
                                                                "steps", "seed", "threads", "device", "dtype",
                                                                "components")},
                    }  # fmt: skip

                def summarize(runs):
                    summary = aggregate_runs(runs)
                    shaping_overhead(summary)
                    return summary

                measure_rounds(pool, shape_result, args.configs, args.rounds, payload,
                               on_round=lambda: write_json(out, report(shapes, complete=False)),
                               summarize=summarize)  # fmt: skip
                shape_result["table"] = print_table(args, shape_result)
        print(f"wrote {write_json(out, report(shapes, complete=True))}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one run of one configuration (a kept worker measures run after run: `common.serve`)
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


def import_trainers() -> None:
    """What a kept worker imports before its first run (`common.serve`'s warm-up)."""
    import datasets  # noqa: F401
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401

    from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer  # noqa: F401


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

    cuda = p["device"] == "cuda"
    common = dict(
        output_dir=p["output_dir"], per_device_train_batch_size=p["batch"], num_generations=p["num_generations"],
        max_completion_length=p["completion_len"], max_steps=p["warmup"] + p["steps"], learning_rate=1e-5,
        logging_steps=1, save_strategy="no", report_to="none", bf16=p["dtype"] == "bfloat16",
        gradient_checkpointing=cuda, dataloader_pin_memory=cuda, disable_tqdm=True, seed=p["seed"], use_cpu=not cuda,
        shuffle_dataset=False, model_init_kwargs={"dtype": p["dtype"]},
    )  # fmt: skip
    if p["overrides"] is None:
        trainer_cls, args = GRPOTrainer, GRPOConfig(**common)
    else:
        trainer_cls, args = TokenGRPOTrainer, TokenGRPOConfig(**common, **p["overrides"])
    timer = make_step_timer(cuda)
    construct_start = time.perf_counter()
    trainer = trainer_cls(model=p["model_path"], reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer],
                          rollout_func=replay_rollout_func(tokenizer, p["completion_len"], p["seed"]))  # fmt: skip
    construct_s = time.perf_counter() - construct_start
    components = None
    if p["components"]:
        components = ComponentTimer(cuda)
        components.wrap("loss_fwd", trainer, "compute_loss")
        components.wrap("backward", trainer.accelerator, "backward")
        if hasattr(trainer, "_shape_token_batch"):
            components.wrap("shaping", trainer, "_shape_token_batch")
        trainer.add_callback(components.callback)
    probe = MemoryProbe(cuda)
    probe.start()
    load_avg = os.getloadavg()[0]
    trainer.train()
    times = {"step_s": timer.step_times(p["warmup"]), "cpu_step_s": timer.cpu_step_times(p["warmup"])}
    if components is not None:
        parts = components.per_step(p["warmup"])
        for name in ("loss_fwd", "backward", "shaping"):
            if name in parts:
                times[name] = parts[name]
        times["fwd_bwd"] = [a + b for a, b in zip(times["loss_fwd"], times["backward"])]
    result = {
        "config": p["config"],
        "round": p["round"],
        "times": times,
        "memory": probe.result(),
        "construct_s": construct_s,
        "load_avg_before": load_avg,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    Path(p["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
