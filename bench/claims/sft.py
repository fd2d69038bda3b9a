"""SFT claims: token-level SFT losses against plain SFT, in distribution and under a distribution shift.

Setting: SmolLM2-135M-Instruct with a LoRA adapter (last 8 layers) is fine-tuned on sorting 3 two-digit numbers
(train split, gold answers, zero-shot chat prompts, loss on the answer only) with each method, then evaluated greedily
on held-out test problems: sorting 3 numbers (in distribution) and sorting 4 (a longer list, shifted). The test
problems are the same for every method and seed, so differences are paired. Sizes are what a loaded 2-core CPU
allows in ~25 minutes for 5 methods x 3 seeds (3 optimizer steps of 4 examples, ~34 s per step of 8 there): a
smoke-scale setting, reported as such; `CONFIGS` records it and `--set` scales it up.

Methods (`TokenSFTTrainer`): `sft` (stock NLL), `otr` (One-Token Rollout), `dft` (TRL's `loss_type="dft"`),
`sstoken` (ssToken selection over the NLL), `chord_phi` (CHORD's p(1-p)-weighted NLL), each at its default knobs.

Claims tested: OTR generalises better out of distribution than SFT (paired difference of shifted-split accuracy,
with the in-distribution difference beside it: the paper's claim is "at equal in-distribution accuracy"); DFT,
ssToken and CHORD-phi each claim to beat SFT, tested the same way.

    python -m bench.claims run sft [--quick]          # through the suite's runner (writes JSON + PNG, then the table)
    python -m bench.claims.sft --max-wall-s 1800      # directly; seeds that would overrun the budget are skipped
"""

from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time
from pathlib import Path

from bench.claims.common import (
    CLAIMS_DIR,
    experiment_config,
    mean_ci,
    paired_difference,
    verdict,
    write_result,
)

EXPERIMENT = "sft"
METHOD_ARGS = {  # method -> TokenSFTConfig arguments; "sft" is the baseline every claim compares with
    "sft": {},
    "otr": {"token_loss_type": "otr"},
    "dft": {"loss_type": "dft"},
    "sstoken": {"token_selection": "sstoken"},
    "chord_phi": {"token_loss_type": "chord_phi"},
}
PAPERS = {
    "otr": "One-Token Rollout (arXiv 2509.26313)",
    "dft": "Dynamic Fine-Tuning (arXiv 2508.05629)",
    "sstoken": "ssToken (arXiv 2510.18250)",
    "chord_phi": "CHORD (arXiv 2508.11408)",
}
# Train on sorting 3 two-digit numbers; the shifted split sorts 4 (a longer list than any seen in training).
EVAL_SPLITS = {  # name -> make_problems kwargs; the first is the training distribution, the rest are shifted
    "sort3": {"task": "sort", "digits": 2, "length": 3},
    "sort4": {"task": "sort", "digits": 2, "length": 4},
}
IN_DISTRIBUTION = "sort3"
N_SHOTS = 0  # zero-shot prompts: SFT teaches the answer format, and the prompt (most of the compute) stays short
LORA_LAST_LAYERS = 8  # adapters on the last 8 of 30 decoder layers only: backward stops there (CPU time)
LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {  # `python -m bench.claims run sft --set key=value` overrides any of these
    "full": {
        "train_problems": 200,
        "max_steps": 3,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "lora_r": 16,
        "eval_problems": 16,
        "methods": list(METHOD_ARGS),
        "device": "cpu",
        "threads": 1,
    },
    "quick": {
        "train_problems": 8,
        "max_steps": 1,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "lora_r": 4,
        "eval_problems": 1,
        "methods": list(METHOD_ARGS),
        "device": "cpu",
        "threads": 1,
    },
}


def set_threads(threads: int = 1) -> None:
    """One thread: on a shared, oversubscribed CPU two OpenMP threads spin-wait and run ~10x slower (measured)."""
    import torch

    torch.set_num_threads(threads)


def load_model(attn_implementation: str = "eager", device: str = "cpu"):
    """The demo model in float32 (eager attention: ssToken reads attention maps; every method uses the same one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_tokenlevel.models import demo_model_path

    folder = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.to(device), tokenizer


def lora_config(r: int, num_layers: int = 30):
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LINEAR_MODULES, task_type="CAUSAL_LM",
        layers_to_transform=list(range(num_layers - LORA_LAST_LAYERS, num_layers)),
    )  # fmt: skip


def eval_sets(n: int) -> dict[str, list]:
    """Held-out test problems per evaluation split (fixed: seed 0, the same for every method and seed)."""
    from trl_tokenlevel.data.builtin.tasks import make_problems

    return {name: make_problems(split="test", n=n, seed=0, **kw) for name, kw in EVAL_SPLITS.items()}


def greedy_accuracy(model, tokenizer, problems, n_shots: int = N_SHOTS) -> float:
    """Exact-match accuracy of greedy answers. Generation stops 2 tokens past the longest expected answer: a longer
    answer is wrong anyway, and decoding is most of the evaluation time."""
    from trl_tokenlevel.data.builtin.tasks import to_messages
    from trl_tokenlevel.data.onpolicy import accuracy, sample_completions

    max_new_tokens = 2 + max(len(tokenizer(p.answer, add_special_tokens=False).input_ids) for p in problems)
    completions = sample_completions(
        model, tokenizer, [to_messages(p, n_shots=n_shots) for p in problems], num_samples=1, temperature=0.0,
        max_new_tokens=max_new_tokens, batch_size=32,
    )  # fmt: skip
    return accuracy(problems, [group[0] for group in completions])


def train_dataset(n: int, seed: int):
    from datasets import Dataset

    from trl_tokenlevel.data.builtin.tasks import make_problems, to_messages

    problems = make_problems(split="train", n=n, seed=seed, **EVAL_SPLITS[IN_DISTRIBUTION])
    rows = [{"prompt": to_messages(p, n_shots=N_SHOTS), "completion": [{"role": "assistant", "content": p.answer}]}
            for p in problems]  # fmt: skip
    return Dataset.from_list(rows)


def train_one(method: str, seed: int, config: dict, output_dir: str, base_model, tokenizer):
    """Fine-tune a fresh LoRA adapter on a copy of `base_model` with `method`; returns the model and the train loss."""
    from trl_tokenlevel.trainers.token_sft_config import TokenSFTConfig
    from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer

    model = copy.deepcopy(base_model)
    args = TokenSFTConfig(
        output_dir=output_dir, max_steps=config["max_steps"], per_device_train_batch_size=config["batch_size"],
        learning_rate=config["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to="none", seed=seed, data_seed=seed, use_cpu=config["device"] == "cpu",
        bf16=False, dataloader_num_workers=0, disable_tqdm=True, **METHOD_ARGS[method],
    )  # fmt: skip
    trainer = TokenSFTTrainer(
        model=model, args=args, train_dataset=train_dataset(config["train_problems"], seed), processing_class=tokenizer,
        peft_config=lora_config(config["lora_r"]),
    )  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer.model, losses


def run(quick: bool, seeds: list[int], max_wall_s: float | None = None) -> dict:
    """The experiment over `seeds`. With `max_wall_s`, a seed that would not finish within that budget (at the pace of
    the seeds so far) is skipped and listed in `seeds_skipped`; every metric covers the seeds in `seeds`."""
    config = experiment_config(CONFIGS, quick)
    methods = config["methods"]
    if methods[:1] != ["sft"] or not set(methods) <= set(METHOD_ARGS):
        raise ValueError(
            f"methods must start with the baseline 'sft' and name only {list(METHOD_ARGS)}; got {methods}."
        )
    set_threads(config["threads"])
    started = time.time()
    problems = eval_sets(config["eval_problems"])
    shifted = [name for name in EVAL_SPLITS if name != IN_DISTRIBUTION]

    base_model, tokenizer = load_model(device=config["device"])
    base = {name: greedy_accuracy(base_model, tokenizer, ps) for name, ps in problems.items()}

    per_seed: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    curves: dict[str, list[list[float]]] = {m: [] for m in methods}
    run_times: dict[str, list[float]] = {m: [] for m in methods}
    done, skipped = [], []
    for seed in seeds:
        elapsed = time.time() - started
        if max_wall_s is not None and done and elapsed + elapsed / len(done) > max_wall_s:
            skipped.append(seed)
            continue
        done.append(seed)
        for method in methods:
            t0 = time.time()
            with tempfile.TemporaryDirectory() as out:
                model, losses = train_one(method, seed, config, out, base_model, tokenizer)
            accs = {name: greedy_accuracy(model, tokenizer, ps) for name, ps in problems.items()}
            accs["shifted"] = sum(accs[name] * len(problems[name]) for name in shifted) / sum(
                len(problems[name]) for name in shifted
            )
            for name, value in accs.items():
                per_seed[method].setdefault(name, []).append(value)
            curves[method].append(losses)
            run_times[method].append(time.time() - t0)
            print(f"[sft] seed={seed} {method}: " + ", ".join(f"{k}={v:.3f}" for k, v in accs.items())
                  + f" ({run_times[method][-1]:.0f}s)", flush=True)  # fmt: skip
            del model
            gc.collect()

    metrics = {f"{m}/{name}": mean_ci(values) for m in methods for name, values in per_seed[m].items()}
    claims = []
    plot = f"{EXPERIMENT}.png"
    for method in methods[1:]:
        d_shift = paired_difference(per_seed[method]["shifted"], per_seed["sft"]["shifted"])
        d_id = paired_difference(per_seed[method][IN_DISTRIBUTION], per_seed["sft"][IN_DISTRIBUTION])
        metrics[f"diff/{method}-sft/shifted"] = d_shift
        metrics[f"diff/{method}-sft/{IN_DISTRIBUTION}"] = d_id
        claim = (
            "Better out-of-distribution generalisation than SFT at equal in-distribution accuracy"
            if method == "otr"
            else f"{method} generalises better than SFT (higher accuracy under a distribution shift)"
        )
        claims.append({
            "claim": claim, "paper": PAPERS[method],
            "setting": f"SmolLM2-135M-Instruct + LoRA r={config['lora_r']}, {config['max_steps']} steps x "
                       f"{config['batch_size']} (lr {config['learning_rate']}) on sorting 3 two-digit numbers, zero-shot; "
                       f"greedy on {config['eval_problems']} held-out problems per split; shifted = sorting 4 numbers",
            "metric": f"paired difference of shifted-split (sort4) accuracy, {method} − SFT (SFT: "
                      f"{_fmt(metrics['sft/shifted'])}); in-distribution (sort3) difference: {_fmt(d_id, signed=True)}",
            "result": d_shift, "verdict": verdict(d_shift, +1), "plot": plot,
        })  # fmt: skip
    result = {
        "experiment": EXPERIMENT,
        "config": {
            **config,
            "train": EVAL_SPLITS[IN_DISTRIBUTION],
            "eval_splits": EVAL_SPLITS,
            "method_args": {m: METHOD_ARGS[m] for m in methods},
            "lora": f"all linear layers of the last {LORA_LAST_LAYERS} layers",
            "n_shots": N_SHOTS,
            "decoding": "greedy",
            "quick": quick,
        },
        "seeds": done,
        "seeds_skipped": skipped,
        "metrics": metrics,
        "baseline": base,
        "train_loss": curves,
        "run_time_s": run_times,
        "claims": claims,
        "wall_time_s": time.time() - started,
    }
    result["figures"] = {plot: _plot(result)}
    return result


def _fmt(stat: dict, signed: bool = False) -> str:
    ci = "n/a" if stat["ci95"] is None else f"{stat['ci95']:.3f}"
    return f"{stat['mean']:{'+' if signed else ''}.3f} ± {ci}"


def save_and_write(name: str, result: dict, quick: bool) -> Path:
    """What the claims runner does, for running this module directly: PNGs beside the JSON, then the JSON (quick runs
    under `quick/`, which git ignores)."""
    import matplotlib.pyplot as plt

    directory = CLAIMS_DIR / "quick" if quick else CLAIMS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for filename, figure in result.pop("figures", {}).items():
        figure.savefig(directory / filename, dpi=110, bbox_inches="tight")
        plt.close(figure)
    return write_result(name, {**result, "quick": quick}, directory)


def _plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(EVAL_SPLITS)
    fig, ax = plt.subplots(figsize=(8, 4))
    methods = result["config"]["methods"]
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        means = [result["metrics"][f"{method}/{s}"]["mean"] for s in splits]
        errors = [result["metrics"][f"{method}/{s}"]["ci95"] or 0.0 for s in splits]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(splits))]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=method)
    for j, s in enumerate(splits):
        ax.hlines(result["baseline"][s], j - 0.4, j + 0.4, colors="k", linestyles="dashed",
                  label="before training" if j == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(splits)), [s + (" (in-dist)" if s == IN_DISTRIBUTION else " (shifted)") for s in splits])
    ax.set_ylabel("greedy accuracy (held-out test)")
    ax.set_title(f"SFT methods, mean ± 95% CI over {len(result['seeds'])} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-wall-s", type=float, help="skip seeds that would not finish within this budget")
    args = parser.parse_args(argv)
    result = run(args.quick, [int(s) for s in args.seeds.split(",")], args.max_wall_s)
    print(save_and_write(EXPERIMENT, result, args.quick))


if __name__ == "__main__":
    main()
