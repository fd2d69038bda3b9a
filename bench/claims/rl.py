"""RL claims: token-level GRPO methods against the GRPO/DAPO baseline, with a binary correctness reward.

Setting: SmolLM2-135M-Instruct with a LoRA adapter (last 8 layers), trained on "Larger of a and b" with 2-digit numbers
(a task it partly solves, greedy ~30-45%, no SFT warm-up) by `TokenGRPOTrainer`: reward 1 for the exact answer,
else 0; 4 completions per prompt, temperature 1, short completions. Tracked over training: rollout reward (sampled
accuracy) and the mean token entropy of the completions (TRL's `entropy` metric); after training: greedy accuracy on
held-out test problems (the same for every method and seed, so differences are paired).

Methods: `grpo` (stock TRL, `loss_type="dapo"`), `forking_80_20` (`token_selection="entropy_quantile"`, top 20%
entropy tokens), `gtpo`, `hapo`, `ucas` (`token_advantage=...`), each at its default knobs.

Claims tested: 80/20 (training on the top 20% entropy tokens matches or beats all tokens) as a non-inferiority test
of held-out accuracy, margin 0.05; entropy-aware methods keep entropy from collapsing, as the paired difference of
the final mean token entropy against GRPO.

Sizes: what a loaded 2-core CPU allows in ~25 minutes for 5 methods x 3 seeds is two GRPO steps per run (one step
of 8 completions takes ~30-60 s there), so this is a smoke-scale run; `CONFIGS` records it and `--set` scales it up.
TRL logs the entropy of step k from the policy before that step's update, so the curve's last point is the policy
after `max_steps - 1` updates.

    python -m bench.claims run rl [--quick]          # through the suite's runner (writes JSON + PNG, then the table)
    python -m bench.claims.rl --max-wall-s 1800      # directly; seeds that would overrun the budget are skipped
"""

from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time

from bench.claims.common import experiment_config, mean_ci, paired_difference, verdict
from bench.claims.sft import (
    LORA_LAST_LAYERS,
    _fmt,
    greedy_accuracy,
    load_model,
    lora_config,
    save_and_write,
    set_threads,
)

EXPERIMENT = "rl"
METHOD_ARGS = {  # method -> TokenGRPOConfig arguments; "grpo" is the baseline every claim compares with
    "grpo": {},
    "forking_80_20": {"token_selection": "entropy_quantile"},
    "gtpo": {"token_advantage": "gtpo"},
    "hapo": {"token_advantage": "hapo"},
    "ucas": {"token_advantage": "ucas"},
}
PAPERS = {
    "forking_80_20": "Beyond the 80/20 Rule (arXiv 2506.01939)",
    "gtpo": "GTPO (arXiv 2508.03772)",
    "hapo": "HAPO (arXiv 2509.16591)",
    "ucas": "UCAS (arXiv 2510.10649)",
}
TASK = {"task": "compare", "digits": 2}
N_SHOTS = 2  # no SFT warm-up: the two solved examples give the format
NON_INFERIORITY_MARGIN = 0.05
# Sized from a measured step on the shared 2-core CPU (~30 s for one step of 4 completions under load): what fits
# 5 methods x 3 seeds in ~30 minutes is a handful of steps, a smoke-scale RL run.
CONFIGS = {  # `python -m bench.claims run rl --set key=value` overrides any of these
    "full": {
        "train_problems": 100,
        "max_steps": 2,
        "prompts_per_step": 2,
        "num_generations": 4,
        "max_completion_length": 4,
        "learning_rate": 5e-4,
        "lora_r": 16,
        "eval_problems": 16,
        "final_window": 1,
        "methods": list(METHOD_ARGS),
        "device": "cpu",
        "threads": 1,
    },
    "quick": {
        "train_problems": 8,
        "max_steps": 1,
        "prompts_per_step": 2,
        "num_generations": 2,
        "max_completion_length": 4,
        "learning_rate": 5e-4,
        "lora_r": 4,
        "eval_problems": 1,
        "final_window": 1,
        "methods": list(METHOD_ARGS),
        "device": "cpu",
        "threads": 1,
    },
}


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion is exactly the answer, else 0.0 (binary, verifiable)."""
    from trl_tokenlevel.data.builtin.tasks import normalize

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(normalize(text) == gold) for text, gold in zip(texts, answer, strict=True)]


def train_dataset(n: int, seed: int):
    from datasets import Dataset

    from trl_tokenlevel.data.builtin.tasks import make_problems, to_messages

    problems = make_problems(TASK["task"], n, split="train", seed=seed, digits=TASK["digits"])
    return Dataset.from_list([{"prompt": to_messages(p, n_shots=N_SHOTS), "answer": p.answer} for p in problems])


def train_one(method: str, seed: int, config: dict, output_dir: str, base_model, tokenizer):
    """GRPO-train a fresh LoRA adapter on a copy of `base_model` with `method`; returns the model and per-step log."""
    from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig
    from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer

    model = copy.deepcopy(base_model)
    batch = config["prompts_per_step"] * config["num_generations"]
    args = TokenGRPOConfig(
        output_dir=output_dir, max_steps=config["max_steps"], per_device_train_batch_size=batch,
        num_generations=config["num_generations"], max_completion_length=config["max_completion_length"],
        learning_rate=config["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, loss_type="dapo",
        temperature=1.0, beta=0.0, logging_steps=1, save_strategy="no", report_to="none", seed=seed,
        data_seed=seed, use_cpu=config["device"] == "cpu", bf16=False, dataloader_num_workers=0, disable_tqdm=True,
        **METHOD_ARGS[method],
    )  # fmt: skip
    trainer = TokenGRPOTrainer(
        model=model, reward_funcs=correctness_reward, args=args,
        train_dataset=train_dataset(config["train_problems"], seed), processing_class=tokenizer,
        peft_config=lora_config(config["lora_r"]),
    )  # fmt: skip
    trainer.train()
    log = [entry for entry in trainer.state.log_history if "reward" in entry]
    return trainer.model, log


def non_inferiority(difference: dict, margin: float) -> str:
    """`reproduced` when the CI's lower end is above −margin (matches or beats), `not reproduced` when the whole CI is
    below 0 (worse), else `inconclusive`."""
    if difference["ci95"] is None:
        return "inconclusive"
    low, high = difference["mean"] - difference["ci95"], difference["mean"] + difference["ci95"]
    if low > -margin:
        return "reproduced"
    return "not reproduced" if high < 0 else "inconclusive"


def run(quick: bool, seeds: list[int], max_wall_s: float | None = None) -> dict:
    """The experiment over `seeds`. With `max_wall_s`, a seed that would not finish within that budget (at the pace of
    the seeds so far) is skipped and listed in `seeds_skipped`; every metric covers the seeds in `seeds`."""
    from trl_tokenlevel.data.builtin.tasks import make_problems

    config = experiment_config(CONFIGS, quick)
    methods = config["methods"]
    if methods[:1] != ["grpo"] or not set(methods) <= set(METHOD_ARGS):
        raise ValueError(
            f"methods must start with the baseline 'grpo' and name only {list(METHOD_ARGS)}; got {methods}."
        )
    set_threads(config["threads"])
    started = time.time()
    problems = make_problems(TASK["task"], config["eval_problems"], split="test", seed=0, digits=TASK["digits"])

    base_model, tokenizer = load_model(
        attn_implementation="sdpa", device=config["device"]
    )  # no attention maps needed here
    base_accuracy = greedy_accuracy(base_model, tokenizer, problems, n_shots=N_SHOTS)

    per_seed: dict[str, dict[str, list[float]]] = {m: {"accuracy": [], "final_entropy": [], "final_reward": []}
                                                   for m in methods}  # fmt: skip
    curves: dict[str, list[dict]] = {m: [] for m in methods}
    run_times: dict[str, list[float]] = {m: [] for m in methods}
    window = config["final_window"]
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
                model, log = train_one(method, seed, config, out, base_model, tokenizer)
            acc = greedy_accuracy(model, tokenizer, problems, n_shots=N_SHOTS)
            entropy = [entry["entropy"] for entry in log]
            reward = [entry["reward"] for entry in log]
            per_seed[method]["accuracy"].append(acc)
            per_seed[method]["final_entropy"].append(sum(entropy[-window:]) / len(entropy[-window:]))
            per_seed[method]["final_reward"].append(sum(reward[-window:]) / len(reward[-window:]))
            curves[method].append({"entropy": entropy, "reward": reward})
            run_times[method].append(time.time() - t0)
            print(f"[rl] seed={seed} {method}: accuracy={acc:.3f} final_entropy={per_seed[method]['final_entropy'][-1]:.3f}"
                  f" final_reward={per_seed[method]['final_reward'][-1]:.3f} ({run_times[method][-1]:.0f}s)", flush=True)  # fmt: skip
            del model
            gc.collect()

    metrics = {f"{m}/{name}": mean_ci(values) for m in methods for name, values in per_seed[m].items()}
    plot = f"{EXPERIMENT}.png"
    setting = (
        f"SmolLM2-135M-Instruct + LoRA r={config['lora_r']}, GRPO (dapo loss) on 2-digit 'larger of two', "
        f"{config['max_steps']} steps x {config['prompts_per_step']} prompts x {config['num_generations']} completions, "
        f"max {config['max_completion_length']} tokens, no SFT warm-up; greedy on {config['eval_problems']} held-out "
        f"problems (before training: {base_accuracy:.3f})"
    )
    claims = []
    if "forking_80_20" in methods:
        d_acc = paired_difference(per_seed["forking_80_20"]["accuracy"], per_seed["grpo"]["accuracy"])
        claims.append({
            "claim": "Training on the top 20% highest-entropy tokens matches or beats training on all tokens",
            "paper": PAPERS["forking_80_20"], "setting": setting,
            "metric": f"paired difference of held-out greedy accuracy, 80/20 − GRPO (GRPO: "
                      f"{_fmt(metrics['grpo/accuracy'])}); non-inferiority: reproduced when the CI's lower end is "
                      f"above −{NON_INFERIORITY_MARGIN}",
            "result": d_acc,
            "verdict": non_inferiority(d_acc, NON_INFERIORITY_MARGIN), "plot": plot,
        })  # fmt: skip
    for method in methods[1:]:
        d_entropy = paired_difference(per_seed[method]["final_entropy"], per_seed["grpo"]["final_entropy"])
        d_method_acc = paired_difference(per_seed[method]["accuracy"], per_seed["grpo"]["accuracy"])
        metrics[f"diff/{method}-grpo/final_entropy"] = d_entropy
        metrics[f"diff/{method}-grpo/accuracy"] = d_method_acc
        claims.append({
            "claim": f"{method} keeps token entropy from collapsing (higher entropy than GRPO at the end of training)",
            "paper": PAPERS[method], "setting": setting,
            "metric": f"paired difference of mean token entropy over the last {window} steps (nats), {method} − GRPO "
                      f"(GRPO: {_fmt(metrics['grpo/final_entropy'])}); held-out accuracy difference: "
                      f"{_fmt(d_method_acc, signed=True)}",
            "result": d_entropy,
            "verdict": verdict(d_entropy, +1), "plot": plot,
        })  # fmt: skip
    result = {
        "experiment": EXPERIMENT,
        "config": {
            **config,
            "task": TASK,
            "method_args": {m: METHOD_ARGS[m] for m in methods},
            "loss_type": "dapo",
            "beta": 0.0,
            "temperature": 1.0,
            "lora": f"all linear layers of the last {LORA_LAST_LAYERS} layers",
            "n_shots": N_SHOTS,
            "sft_warmup": None,
            "quick": quick,
        },
        "seeds": done,
        "seeds_skipped": skipped,
        "metrics": metrics,
        "baseline": {"accuracy": base_accuracy},
        "curves": curves,
        "run_time_s": run_times,
        "claims": claims,
        "wall_time_s": time.time() - started,
    }
    result["figures"] = {plot: _plot(result)}
    return result


def _plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for name, ax in zip(("entropy", "reward"), axes[:2]):
        for method, runs in result["curves"].items():
            steps = min(len(r[name]) for r in runs)
            mean = [sum(r[name][i] for r in runs) / len(runs) for i in range(steps)]
            ax.plot(range(1, steps + 1), mean, "o-", label=method)
        ax.set_xlabel("step")
        ax.set_ylabel({"entropy": "mean token entropy (nats)", "reward": "rollout accuracy (reward)"}[name])
        ax.set_title(f"{name} over training (mean over seeds)")
    axes[0].legend(fontsize=8)
    methods = list(result["curves"])
    means = [result["metrics"][f"{m}/accuracy"]["mean"] for m in methods]
    errors = [result["metrics"][f"{m}/accuracy"]["ci95"] or 0.0 for m in methods]
    axes[2].bar(range(len(methods)), means, yerr=errors, capsize=3)
    axes[2].axhline(result["baseline"]["accuracy"], color="k", linestyle="--", label="before training")
    axes[2].set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
    axes[2].set_ylabel("held-out greedy accuracy")
    axes[2].set_title("after training, mean ± 95% CI")
    axes[2].legend(fontsize=8)
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
