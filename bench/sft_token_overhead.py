"""Step time and peak memory of token-level SFT (OTR, ssToken) against stock `trl.SFTTrainer`.

One model (random weights from a config) and one synthetic prompt-completion dataset are built once; each configuration
then trains for the same number of steps on the same data in its own fresh subprocess, so peak memory is per
configuration. Every configuration uses eager attention (ssToken's attention score needs it), so the stock baseline
runs the same model. Results, with machine and library versions, go to
`bench/results/sft_token_overhead_<device>.json`; ratios are against `stock`.

```bash
python bench/sft_token_overhead.py                 # CPU, the "small" preset
python bench/sft_token_overhead.py --device cuda --preset medium
```
Targets: OTR <= 1.3x stock step time and <= 1.1x stock peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
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

# Config name -> TokenSFTConfig overrides (None: stock SFTTrainer with SFTConfig).
CONFIGS = {
    "stock": None,
    "otr": {"token_loss_type": "otr"},  # paper defaults: K = 256 samples at kappa = 1.3, Monte-Carlo
    "otr_expected": {"token_loss_type": "otr", "otr_estimator": "expected"},
    "sstoken": {"token_selection": "sstoken", "sstoken_history_decay": 1.0},  # frozen history model, gamma = 0.5
    "sstoken_ema": {"token_selection": "sstoken", "sstoken_history_decay": 0.9},  # the default
}
PRESETS = {
    # hidden, layers, vocab, batch, prompt tokens, completion tokens
    "small": dict(hidden=256, layers=8, vocab=4096, batch=4, prompt=32, completion=96),
    "medium": dict(hidden=1024, layers=8, vocab=32768, batch=8, prompt=128, completion=384),
}


# ---------------------------------------------------------------------------------------------------------------------
# Parent: build model and data once, run each configuration in a subprocess
# ---------------------------------------------------------------------------------------------------------------------


def build_assets(preset: dict, workdir: Path, num_rows: int, seed: int = 0) -> tuple[str, str]:
    import random

    from trl_tokenlevel.tiny import build_tiny_model, save_tiny_pair

    words = pseudo_words(4000, seed)
    tokenizer = build_word_tokenizer(words, vocab_size=preset["vocab"], seed=seed)
    model = build_tiny_model(tokenizer, hidden_size=preset["hidden"], num_layers=preset["layers"], seed=seed)
    model_dir = save_tiny_pair(model, tokenizer, str(workdir / "model"))

    rng = random.Random(seed)

    def text(num_tokens: int) -> str:
        # About one token per pseudo-word pair at this vocabulary size; `max_length` trims the rest.
        return " ".join(rng.choice(words) for _ in range(num_tokens))

    rows = [{"prompt": "Q: " + text(preset["prompt"]) + "\nA:", "completion": " " + text(preset["completion"])}
            for _ in range(num_rows)]  # fmt: skip
    data_path = workdir / "data.jsonl"
    data_path.write_text("\n".join(json.dumps(row) for row in rows))
    return model_dir, str(data_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first --warmup excluded)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="runs per configuration (alternating order)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: stable on shared CPUs)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        return worker(cli.worker)

    preset = PRESETS[cli.preset]
    configs = ["stock", *[c for c in cli.configs if c != "stock"]]
    env = worker_env(cli.threads)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir, data_path = build_assets(preset, workdir, num_rows=preset["batch"] * cli.steps)
        for round_index, order in enumerate(round_orders(configs, cli.rounds)):
            for name in order:
                payload = dict(config=name, model_dir=model_dir, data_path=data_path, device=cli.device,
                               steps=cli.steps, warmup=cli.warmup, batch=preset["batch"],
                               max_length=preset["prompt"] + preset["completion"],
                               result_path=str(workdir / f"{name}-{round_index}.json"))  # fmt: skip
                print(f"round {round_index}: {name} ...", flush=True)
                runs[name].append(run_worker(Path(__file__), payload, env, timeout=3600))

    def median(name: str, key: str) -> float:
        values = sorted(run[key] for run in runs[name])
        return values[len(values) // 2]

    summary = {}
    for name in configs:
        summary[name] = {
            "step_time_s": median(name, "step_time_median_s"),
            "peak_memory_bytes": median(name, "peak_memory_bytes"),
            "train_memory_bytes": median(name, "train_memory_bytes"),
        }
    for name in configs:
        base = summary["stock"]
        summary[name]["time_ratio"] = summary[name]["step_time_s"] / base["step_time_s"]
        summary[name]["peak_memory_ratio"] = summary[name]["peak_memory_bytes"] / base["peak_memory_bytes"]
        summary[name]["train_memory_ratio"] = summary[name]["train_memory_bytes"] / max(base["train_memory_bytes"], 1)

    result = {
        "benchmark": "sft_token_overhead",
        "description": "Token-level SFT vs stock SFTTrainer: median step time and peak memory, same model and data.",
        "machine": machine_info(cli.device),
        "settings": {**vars(cli), "preset_values": preset, "configs": {n: CONFIGS[n] for n in configs},
                     "attn_implementation": "eager", "threads": cli.threads},  # fmt: skip
        "memory_note": (
            "cpu: peak_memory = peak RSS during training (the high-water mark is reset after trainer construction); "
            "train_memory = that peak minus the RSS just before training. cuda: torch.cuda.max_memory_allocated "
            "during training, and the same minus the memory allocated before training."
        ),
        "targets": {"otr_time_ratio_max": 1.3, "otr_peak_memory_ratio_max": 1.1},
        "summary": summary,
        "runs": runs,
    }
    path = write_json(RESULTS_DIR / f"sft_token_overhead_{cli.device}.json", result)
    rows = [
        [name, f"{s['step_time_s'] * 1000:.1f}", f"{s['time_ratio']:.2f}x", f"{s['peak_memory_bytes'] / 2**20:.0f}",
         f"{s['peak_memory_ratio']:.3f}x", f"{s['train_memory_bytes'] / 2**20:.1f}", f"{s['train_memory_ratio']:.2f}x"]
        for name, s in summary.items()
    ]  # fmt: skip
    headers = ["config", "step ms", "time", "peak MiB", "peak", "train MiB", "train"]
    print(format_table(headers, rows))
    print(f"written to {path}")


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration in a fresh process
# ---------------------------------------------------------------------------------------------------------------------


def worker(payload_path: str) -> None:
    payload = json.loads(Path(payload_path).read_text())
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from trl_tokenlevel.trainers.token_sft_config import TokenSFTConfig
    from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer

    cuda = payload["device"] == "cuda"
    rows = [json.loads(line) for line in Path(payload["data_path"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(payload["model_dir"])
    overrides = CONFIGS[payload["config"]]
    args = dict(
        output_dir=str(Path(payload["result_path"]).with_suffix(".out")),
        per_device_train_batch_size=payload["batch"],
        max_steps=payload["steps"],
        max_length=payload["max_length"],
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        use_cpu=not cuda,
        seed=0,
        model_init_kwargs={"attn_implementation": "eager"},
    )
    config_cls, trainer_cls = (SFTConfig, SFTTrainer) if overrides is None else (TokenSFTConfig, TokenSFTTrainer)
    timer = make_step_timer(cuda=cuda)
    trainer = trainer_cls(model=payload["model_dir"], args=config_cls(**args, **(overrides or {})),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
        reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    step_times = timer.step_times(skip=payload["warmup"])
    metrics = {k: v for k, v in trainer.state.log_history[-2].items() if isinstance(v, (int, float))}
    result = {
        "config": payload["config"],
        "step_time_median_s": summarize(step_times)["median"],
        "step_times": summarize(step_times),
        "compute_times": summarize(timer.compute_times(skip=payload["warmup"])),
        "train_wall_s": wall,
        "peak_memory_bytes": peak,
        "memory_before_train_bytes": before,
        "train_memory_bytes": peak - before,
        "last_logged_metrics": metrics,
    }
    Path(payload["result_path"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
