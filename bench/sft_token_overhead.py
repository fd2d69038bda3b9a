"""Step time and peak memory of token-level SFT (OTR, ssToken) against stock `trl.SFTTrainer`.

One Qwen2-shaped model (random weights from a config) and one synthetic prompt-completion dataset are built once per
shape (`--sweep BATCHxLENGTH,...`); each configuration then trains the same steps on the same data in worker processes
of its own (`--worker-scope`, `bench/common.py`), in alternating order over `--rounds` (>= 3) rounds, warm-up steps
excluded. Every configuration uses eager attention (ssToken's attention score needs it), so the stock baseline runs the
same model. Measured (`bench/common.py` rules): in-loop component timings per measured step (CPU default: `compute_loss`
+ `backward` in process CPU time), the wall and CPU-time interval between optimizer-step ends, and peak memory (CPU:
`VmHWM` of the worker; CUDA: max allocated and reserved). Results, with machine, commit and library versions, go to
`bench/results/sft_token_overhead_<device>.json`; ratios are against `stock`, with the min-max of per-round ratios.

```bash
python bench/sft_token_overhead.py                          # CPU, the "small" preset
python bench/sft_token_overhead.py --sweep 2x128,4x256      # batch x (prompt + completion) tokens
python bench/sft_token_overhead.py --device cuda --preset qwen0.5b
```
Targets: OTR <= 1.3x stock step time and <= 1.1x stock peak memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    ComponentTimer,
    MemoryProbe,
    WorkerPool,
    add_worker_scope_argument,
    build_word_tokenizer,
    default_worker_scope,
    exit_on_sigterm,
    format_table,
    machine_info,
    make_step_timer,
    measure_rounds,
    parse_sweep,
    pseudo_words,
    ratio_cell,
    worker_env,
    worker_main,
    write_json,
)

# Config name -> TokenSFTConfig overrides (None: stock SFTTrainer with SFTConfig).
CONFIGS = {
    "stock": None,
    "otr": {"token_loss_type": "otr"},  # paper defaults: K = 256 samples at kappa = 1.3, Monte-Carlo
    "otr_expected": {"token_loss_type": "otr", "otr_estimator": "expected"},
    "sstoken": {"token_selection": "sstoken", "sstoken_history_decay": 1.0},  # frozen history model, gamma = 0.5
    "sstoken_ema": {"token_selection": "sstoken", "sstoken_history_decay": 0.9},  # the default
}
TARGETS = {"otr": {"time": 1.3, "memory": 1.1}}
PRESETS = {
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=4096, batch=4, prompt=32,
                  completion=96, dtype="float32", gradient_checkpointing=False),
    "medium": dict(hidden=1024, layers=8, heads=8, kv_heads=4, intermediate=2048, vocab=32768, batch=8, prompt=128,
                   completion=384, dtype="float32", gradient_checkpointing=False),
    # Qwen2.5-0.5B's shape (random weights); the tokenizer covers the first 16384 ids of the 151936-wide head.
    "qwen0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, batch=8, prompt=128,
                     completion=896, dtype="bfloat16", gradient_checkpointing=True),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Parent: build model and data once per shape, run each configuration in a subprocess
# ---------------------------------------------------------------------------------------------------------------------


def build_assets(preset: dict, workdir: Path, num_rows: int, seed: int = 0) -> tuple[str, str]:
    import random

    from dpo_bench import model_cache, save_random_qwen2

    words = pseudo_words(4000, seed)
    tokenizer = build_word_tokenizer(words, vocab_size=min(preset["vocab"], 16384), seed=seed)
    shape = SimpleNamespace(**preset, seq_len=preset["prompt"] + preset["completion"])
    model_dir = workdir / "model"
    save_random_qwen2(shape, tokenizer, model_dir, seed, model_cache(workdir.parent))

    rng = random.Random(seed)

    def text(num_tokens: int) -> str:
        # About one token per pseudo-word pair at this vocabulary size; `max_length` trims the rest.
        return " ".join(rng.choice(words) for _ in range(num_tokens))

    rows = [{"prompt": "Q: " + text(preset["prompt"]) + "\nA:", "completion": " " + text(preset["completion"])}
            for _ in range(num_rows)]  # fmt: skip
    data_path = workdir / "data.jsonl"
    data_path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(model_dir), str(data_path)


def print_table(cuda: bool, shape_result: dict) -> str:
    per_config, shape = shape_result["configs"], shape_result["shape"]
    time_key = "step_s" if cuda else "cpu_step_s"
    memory_key = "cuda_alloc_peak_bytes" if cuda else "rss_peak_bytes"
    time_keys = [("step_s", "step ms"), ("cpu_step_s", "CPU step ms"), ("fwd_bwd", "loss fwd+bwd ms")]
    memory_keys = [("cuda_alloc_peak_bytes", "peak alloc GiB"), ("cuda_reserved_peak_bytes", "peak reserved GiB")] \
        if cuda else [("rss_peak_bytes", "peak RSS GiB"), ("rss_peak_delta_bytes", "RSS over constr. GiB")]  # fmt: skip
    headers = ["config"]
    for _, label in (*time_keys, *memory_keys):
        headers += [label, "x stock (rounds)"]
    headers.append("targets")
    rows = []
    for name, e in per_config.items():
        row = [name]
        for key, _ in time_keys:
            series = e["times"].get(key)
            row += [f"{1e3 * series['median']:.1f}" if series else "-", ratio_cell(e["ratios"].get(key))]
        for key, _ in memory_keys:
            row += [f"{e['memory'][key]['median'] / 2**30:.3f}", ratio_cell(e["ratios"].get(key))]
        target = TARGETS.get(name)
        if target:
            ok_time = e["ratios"][time_key]["pooled"] <= target["time"]
            ok_memory = e["ratios"][memory_key]["pooled"] <= target["memory"]
            row.append(f"time<={target['time']}x:{'y' if ok_time else 'N'} mem<={target['memory']}x:"
                       f"{'y' if ok_memory else 'N'}")  # fmt: skip
        else:
            row.append("-")
        rows.append(row)
    table = f"batch {shape['batch']} x {shape['max_length']} tokens:\n" + format_table(headers, rows)
    print(table)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured optimizer steps before them")
    parser.add_argument("--rounds", type=int, default=3, help="runs per configuration (alternating order, >= 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: stable on shared CPUs)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--sweep",
        help="batch x (prompt + completion) shapes, e.g. 2x128,4x256 (prompt keeps the "
        "preset's share); default: the preset's shape",
    )
    parser.add_argument(
        "--components",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="in-loop component timings (default on for CPU, off for CUDA: they synchronize)",
    )
    parser.add_argument("--worker-timeout", type=float, default=3600, help="seconds one measured run may take")
    add_worker_scope_argument(parser)
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/sft_token_overhead_<device>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        return worker_main(cli.worker, worker, import_trainers)
    exit_on_sigterm()
    if cli.rounds < 3 or cli.steps < 2 or cli.warmup < 1:
        parser.error("need --rounds >= 3, --steps >= 2 and --warmup >= 1")
    import torch

    if cli.device == "cuda" and not torch.cuda.is_available():
        print("sft_token_overhead: --device cuda requested but CUDA is not available; skipping.", file=sys.stderr)
        return 0
    components = cli.device == "cpu" if cli.components is None else cli.components
    if cli.worker_scope is None:
        cli.worker_scope = default_worker_scope(cli.device)
    base = PRESETS[cli.preset]
    configs = ["stock", *[c for c in cli.configs if c != "stock"]]
    started = time.time()
    machine = machine_info(cli.device)
    out = cli.out or RESULTS_DIR / f"sft_token_overhead_{cli.device}.json"

    def report(shapes, complete):
        return {
            "benchmark": "sft_token_overhead",
            "description": (
                "Token-level SFT vs stock SFTTrainer, same model and data, each configuration in worker processes of "
                "its own (settings.worker_scope), alternating order over rounds, warm-up steps excluded; times per "
                "measured step, memory per run (CPU: VmHWM of the worker, reset after construction; CUDA: max "
                "allocated and reserved)."
            ),
            "machine": machine,
            "settings": {
                **{k: v for k, v in vars(cli).items() if k not in ("worker", "out")},
                "preset_values": base,
                "components": components,
                "config_overrides": {n: CONFIGS[n] for n in configs},
                "attn_implementation": "eager",
                "model": "Qwen2ForCausalLM (random)",
            },  # fmt: skip
            "targets": TARGETS,
            "wall_s": time.time() - started,
            "complete": complete,
            "tables": [shape["table"] for shape in shapes if "table" in shape],
            "shapes": shapes,
        }

    shapes = []
    workdir = Path(tempfile.mkdtemp(prefix="sft_token_overhead_"))
    pool = WorkerPool(Path(__file__).resolve(), worker_env(cli.threads), cli.worker_scope, cli.worker_timeout,
                      cli.device == "cuda")  # fmt: skip
    try:
        with pool:
            pool.start(configs, workdir)  # kept workers start up while the model and data are built
            for batch, length in parse_sweep(cli.sweep, (base["batch"], base["prompt"] + base["completion"])):
                prompt = max(4, round(length * base["prompt"] / (base["prompt"] + base["completion"])))
                preset = {**base, "batch": batch, "prompt": prompt, "completion": length - prompt}
                shape_dir = workdir / f"b{batch}_l{length}"
                shape_dir.mkdir()
                model_dir, data_path = build_assets(preset, shape_dir, num_rows=batch * (cli.warmup + cli.steps))
                shape_result = {"shape": {"batch": batch, "max_length": length, "prompt": prompt}}
                shapes.append(shape_result)

                def payload(name, round_index, model_dir=model_dir, data_path=data_path, shape_dir=shape_dir,
                            preset=preset, batch=batch, length=length):  # fmt: skip
                    return dict(config=name, round=round_index, model_dir=model_dir, data_path=data_path,
                                device=cli.device, steps=cli.steps, warmup=cli.warmup, batch=batch, max_length=length,
                                dtype=preset["dtype"], components=components,
                                gradient_checkpointing=preset["gradient_checkpointing"], threads=cli.threads,
                                result_path=str(shape_dir / f"{name}-{round_index}.json"))  # fmt: skip

                measure_rounds(
                    pool,
                    shape_result,
                    configs,
                    cli.rounds,
                    payload,
                    on_round=lambda: write_json(out, report(shapes, complete=False)),
                )
                shape_result["table"] = print_table(cli.device == "cuda", shape_result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    path = write_json(out, report(shapes, complete=True))
    print(f"written to {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one run of one configuration (a kept worker measures run after run: `common.serve`)
# ---------------------------------------------------------------------------------------------------------------------


def import_trainers() -> None:
    """What a kept worker imports before its first run (`common.serve`'s warm-up)."""
    import datasets  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer  # noqa: F401


def worker(payload_path: str) -> int:
    import os

    payload = json.loads(Path(payload_path).read_text())
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from trl_tokenlevel.trainers.token_sft_config import TokenSFTConfig
    from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer

    torch.set_num_threads(payload["threads"])
    cuda = payload["device"] == "cuda"
    rows = [json.loads(line) for line in Path(payload["data_path"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(payload["model_dir"])
    overrides = CONFIGS[payload["config"]]
    args = dict(
        output_dir=str(Path(payload["result_path"]).with_suffix(".out")),
        per_device_train_batch_size=payload["batch"],
        max_steps=payload["warmup"] + payload["steps"],
        max_length=payload["max_length"],
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=payload["dtype"] == "bfloat16",
        gradient_checkpointing=payload["gradient_checkpointing"],
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
        use_cpu=not cuda,
        seed=0,
        model_init_kwargs={"attn_implementation": "eager", "dtype": payload["dtype"]},
    )
    config_cls, trainer_cls = (SFTConfig, SFTTrainer) if overrides is None else (TokenSFTConfig, TokenSFTTrainer)
    timer = make_step_timer(cuda=cuda)
    started = time.perf_counter()
    trainer = trainer_cls(model=payload["model_dir"], args=config_cls(**args, **(overrides or {})),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    construct_s = time.perf_counter() - started
    components = None
    if payload["components"]:
        components = ComponentTimer(cuda)
        components.wrap("loss_fwd", trainer, "compute_loss")
        components.wrap("backward", trainer.accelerator, "backward")
        trainer.add_callback(components.callback)
    probe = MemoryProbe(cuda)
    probe.start()
    load_avg = os.getloadavg()[0]
    trainer.train()
    memory = probe.result()
    warmup = payload["warmup"]
    times = {"step_s": timer.step_times(warmup), "cpu_step_s": timer.cpu_step_times(warmup),
             "compute_s": timer.compute_times(warmup)}  # fmt: skip
    if components is not None:
        parts = components.per_step(warmup)
        times["fwd_bwd"] = [a + b for a, b in zip(parts["loss_fwd"], parts["backward"])]
    result = {
        "config": payload["config"],
        "round": payload["round"],
        "times": times,
        "memory": memory,
        "construct_s": construct_s,
        "load_avg_before": load_avg,
        "last_logged_metrics": {k: v for k, v in trainer.state.log_history[-2].items() if isinstance(v, (int, float))},
    }
    Path(payload["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
