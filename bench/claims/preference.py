"""Preference claims on the real demo model: DPO vs TDPO, TGDPO, cDPO, SparsePO and weighted DPO.

Setting (`CONFIGS` holds every number):

- **Data, on-policy rejected answers.** SmolLM2-135M-Instruct samples `samples_per_prompt` answers at temperature 1
  to 2-shot chat prompts of a task it half-solves (default: sort three 2-digit numbers, ~19% greedy). Each prompt
  with a wrong sample gives one pair (`onpolicy.build_preference_pairs`): rejected = one of the model's own wrong
  answers; chosen = a right sample, or with `fallback_to_gold` the gold answer when no sample was right (the result's
  `config.pool.gold_chosen` counts those rows). No SFT warm-up: the untouched model is the sampling policy and the DPO
  reference. Pairs of `train` problems train; pairs of `valid` problems are the held-out analysis pairs (token credit,
  chosen likelihood); greedy accuracy is measured on `test` problems. The three splits are hash-disjoint.
- **Training.** Every method trains a LoRA adapter (the reference is the adapter-disabled base) with the same seed,
  data order, steps and learning rate; only `token_loss_type` and its signal columns differ. Seeds change the
  training-pair subset/order and the LoRA initialisation; the pair pool is sampled once (from the base model).
- **Signals** come from the package's builders, never from the gold answer: TGDPO's token rewards are
  `signals.add_dpo_token_rewards` from the same seed's trained DPO policy vs the base; cDPO's rejected weights (and the
  `weighted` run's weights on both sides) are `signals.add_critical_token_weights` from a positive and a negative
  LoRA fine-tune of the base on the chosen / rejected answers (as the cDPO paper does).
- **Metrics.** Held-out greedy accuracy; KL(π_θ‖π_ref) summed over the tokens of the policy's own greedy answers
  (sequential KL, TDPO's measure), mean over held-out prompts; and on the held-out analysis pairs, for every policy
  trained at the main beta, the change of log π(chosen) (DPO's collapse of the chosen likelihood) and its per-token
  implicit reward β·log π_θ/π_ref on rejected answers (From r to Q*, `TokenDPOTrainer.compute_token_rewards`): how
  often the most negative token is the first wrong token, and what share of the negative mass sits on, before and
  after it. The signal columns themselves are scored in the `signals` experiment.
- **Frontier.** DPO and TDPO2 are trained at each of `frontier_betas`; a TDPO point's frontier gap is its accuracy
  minus DPO's accuracy at the same KL (linear interpolation through the same seed's DPO points, clamped at the ends).
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.claims.common import experiment_config, mean_ci, paired_difference, verdict

# Sized for the shared 2-core CPU (about 26 training tokens/s for this model under load; see the README): one DPO pair
# of 2-shot sort prompts is ~245 tokens, so a training step of 2 pairs costs ~25 s.
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {
        "task": "sort",
        "digits": 2,
        "length": 3,
        "n_shots": 2,
        "pool_train_problems": 16,
        "pool_valid_problems": 8,
        "samples_per_prompt": 2,
        "temperature": 1.0,
        "max_new_tokens": 12,
        "fallback_to_gold": True,
        "train_pairs": 6,
        "analysis_pairs": 6,
        "n_eval": 12,
        "steps": 3,
        "batch_size": 2,
        "learning_rate": 5e-4,
        "lora_r": 8,
        "lora_alpha": 16,
        "beta": 0.1,
        "frontier_betas": [0.1, 0.5],
        "signal_sft_steps": 3,
        "tgdpo_alpha": 0.5,
        "tdpo_alpha": 0.5,
        "methods": ["dpo", "tdpo2", "tgdpo", "cdpo", "weighted", "sparsepo"],
        "threads": 2,
        "device": "cpu",
    },
    "quick": {
        "task": "sort",
        "digits": 2,
        "length": 3,
        "n_shots": 2,
        "pool_train_problems": 2,
        "pool_valid_problems": 1,
        "samples_per_prompt": 2,
        "temperature": 1.0,
        "max_new_tokens": 10,
        "fallback_to_gold": True,
        "train_pairs": 1,
        "analysis_pairs": 1,
        "n_eval": 1,
        "steps": 1,
        "batch_size": 1,
        "learning_rate": 5e-4,
        "lora_r": 4,
        "lora_alpha": 8,
        "beta": 0.1,
        "frontier_betas": [0.1],
        "signal_sft_steps": 1,
        "tgdpo_alpha": 0.5,
        "tdpo_alpha": 0.5,
        "methods": ["dpo", "tdpo2", "tgdpo", "cdpo", "weighted", "sparsepo"],
        "threads": 1,
        "device": "cpu",
    },
}
PAPERS = {
    "tdpo2": "Zeng et al. 2024, Token-level Direct Preference Optimization (arXiv:2404.11999)",
    "tgdpo": "Zhu et al. 2025, TGDPO (arXiv:2506.14574)",
    "cdpo": "Lin et al. 2024, Critical Tokens Matter / cDPO (arXiv:2411.19943)",
    "sparsepo": "Christopoulou et al. 2024, SparsePO (arXiv:2410.05102)",
    "weighted": "token-weighted DPO (package baseline; weights from the cDPO builder on both sides)",
    "dpo": "Rafailov et al. 2024, From r to Q* (arXiv:2404.12358)",
}
TRAIN_COLUMNS = ("prompt", "chosen", "rejected")


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def _pairs_cache_path(config: dict) -> Path:
    from trl_tokenlevel.models import cache_dir

    keys = ("task", "digits", "length", "n_shots", "pool_train_problems", "pool_valid_problems",
            "samples_per_prompt", "temperature", "max_new_tokens", "fallback_to_gold")  # fmt: skip
    digest = hashlib.sha256(json.dumps({k: config[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "claims" / f"pairs_{digest}.json"


def preference_pool(config: dict, model, tokenizer) -> dict[str, Any]:
    """On-policy pairs of the base model for the train and valid problems (sampled once, cached by config).

    Returns `{"train": rows, "valid": rows, "sample_accuracy": {...}, "sampling_s": float}`.
    """
    from trl_tokenlevel.data.builtin.tasks import make_problems, to_messages
    from trl_tokenlevel.data.onpolicy import build_preference_pairs, sample_completions

    path = _pairs_cache_path(config)
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    start = time.perf_counter()
    pool: dict[str, Any] = {"sample_accuracy": {}}
    for split, count in (("train", config["pool_train_problems"]), ("valid", config["pool_valid_problems"])):
        problems = make_problems(config["task"], count, split, digits=config["digits"], length=config["length"])
        samples = sample_completions(
            model, tokenizer, [to_messages(p, n_shots=config["n_shots"]) for p in problems],
            num_samples=config["samples_per_prompt"], temperature=config["temperature"],
            max_new_tokens=config["max_new_tokens"], batch_size=16, seed=0,
        )  # fmt: skip
        pool[split] = build_preference_pairs(
            problems, samples, n_shots=config["n_shots"], fallback_to_gold=config["fallback_to_gold"], seed=0
        )
        flat = [p.answer == s.strip() for p, group in zip(problems, samples) for s in group]
        pool["sample_accuracy"][split] = sum(flat) / len(flat)
    pool["sampling_s"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pool), encoding="utf-8")
    return pool


def pool_summary(pool: dict[str, Any]) -> dict[str, Any]:
    """Pairs per split, how many have the gold answer as chosen (no sample was right), the samples' accuracy."""
    return {
        "pairs": {split: len(pool[split]) for split in ("train", "valid")},
        "gold_chosen": {
            split: sum(row["chosen_source"] == "gold" for row in pool[split]) for split in ("train", "valid")
        },
        "sample_accuracy": pool["sample_accuracy"],
        "sampling_s": pool["sampling_s"],
    }


def _dataset(rows: list[dict], extra: dict[str, list] | None = None):
    from datasets import Dataset

    columns = {name: [row[name] for row in rows] for name in TRAIN_COLUMNS}
    return Dataset.from_dict({**columns, **(extra or {})})


def _problem_of(row: dict):
    from trl_tokenlevel.data.builtin.tasks import Problem

    return Problem(row["task"], row["prompt"][-1]["content"], row["answer"], row["key"])


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _lora(config: dict):
    from peft import LoraConfig

    return LoraConfig(r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip


def _common_args(config: dict, seed: int, steps: int, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=config["batch_size"],
        learning_rate=config["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, seed=seed,
        data_seed=seed, logging_steps=max(steps, 1), save_strategy="no", report_to=[], use_cpu=config["device"] == "cpu",
        disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False,
    )  # fmt: skip


def train_preference(method: str, beta: float, dataset, model_path: str, tokenizer, config: dict, seed: int):
    """A LoRA `TokenDPOTrainer` run of `method` (`dpo` is stock, `token_loss_type=None`); returns the trainer."""
    from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer

    token_loss_type = None if method == "dpo" else method
    with tempfile.TemporaryDirectory() as output_dir:
        args = TokenDPOConfig(
            **_common_args(config, seed, config["steps"], output_dir), beta=beta, token_loss_type=token_loss_type,
            tgdpo_alpha=config["tgdpo_alpha"], tdpo_alpha=config["tdpo_alpha"], max_length=256,
        )  # fmt: skip
        torch.manual_seed(seed)
        trainer = TokenDPOTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=_lora(config))  # fmt: skip
        trainer.train()
    return trainer


def train_sft_model(rows: list[dict], side: str, model_path: str, tokenizer, config: dict, seed: int):
    """A merged LoRA fine-tune of the base on the `side` answers (cDPO's positive / negative model)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "completion": [r[side] for r in rows]})
    with tempfile.TemporaryDirectory() as output_dir:
        args = SFTConfig(**_common_args(config, seed, config["signal_sft_steps"], output_dir), max_length=256)
        torch.manual_seed(seed)
        trainer = SFTTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=_lora(config))  # fmt: skip
        trainer.train()
    return trainer.model.merge_and_unload().eval()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_accuracy_and_kl(policy, tokenizer, problems, config: dict) -> dict[str, float]:
    """Greedy held-out accuracy and the mean sequential KL(π_θ‖π_ref) along the policy's own greedy answers.

    KL_seq = Σ_t Σ_v π_θ(v|s_t)·[log π_θ(v|s_t) − log π_ref(v|s_t)] over the answer tokens (end of turn included).
    The policy's distributions come from `generate` itself; the reference is the PEFT policy's adapter-disabled
    forward (a model without adapters is its own reference: KL 0).
    """
    from trl_tokenlevel.data.builtin.tasks import is_correct, to_messages
    from trl_tokenlevel.ops.preference import per_token_kl_from_logits

    policy.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct, kls = 0, []
    try:
        for start in range(0, len(problems), 16):
            batch = problems[start : start + 16]
            texts = [tokenizer.apply_chat_template(to_messages(p, n_shots=config["n_shots"]), add_generation_prompt=True,
                                                   tokenize=False) for p in batch]  # fmt: skip
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(policy.device)
            output = policy.generate(**encoded, max_new_tokens=config["max_new_tokens"], do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                                     output_logits=True)  # fmt: skip
            generated = output.sequences[:, encoded["input_ids"].shape[1] :]
            answers = tokenizer.batch_decode(generated, skip_special_tokens=True)
            correct += sum(is_correct(p, a) for p, a in zip(batch, answers))
            if not hasattr(policy, "disable_adapter"):
                kls += [0.0] * len(batch)
                continue
            # Answer tokens: up to and including the first end of turn.
            is_eos = generated == tokenizer.eos_token_id
            answer_mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0
            attention = torch.cat([encoded["attention_mask"], answer_mask.long()], dim=1)
            policy_logits = torch.stack(output.logits, dim=1)
            with policy.disable_adapter():
                ref_logits = policy(input_ids=output.sequences, attention_mask=attention,
                                    logits_to_keep=generated.shape[1] + 1).logits[:, :-1]  # fmt: skip
            # per_token_kl_from_logits(a, b) = Σ_v π_b·(log π_b − log π_a): the policy goes second for KL(π_θ‖π_ref).
            kl = per_token_kl_from_logits(ref_logits, policy_logits)
            kls += (kl * answer_mask).sum(1).tolist()
    finally:
        tokenizer.padding_side = padding_side
    return {"accuracy": correct / len(problems), "kl": sum(kls) / len(kls)}


def _collate(trainer, dataset):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from trl_tokenlevel.data import tokenize_preference_dataset

    tokenizer = trainer.processing_class
    tokenized = tokenize_preference_dataset(dataset, tokenizer)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in tokenized]
    )
    return tokenized, batch


def per_token_values(trainer, rows: list[dict]) -> tuple[list[list[float]], list[list[float]], list]:
    """The trained policy's implicit rewards β·log π_θ/π_ref per completion token: (chosen rows, rejected rows, tokenized)."""
    tokenized, batch = _collate(trainer, _dataset(rows))
    rewards = trainer.compute_token_rewards(batch).float().cpu()
    mask = batch["completion_mask"][:, 1:].bool()
    values = [rewards[i][mask[i]].tolist() for i in range(rewards.shape[0])]
    return values[: len(rows)], values[len(rows) :], tokenized


def credit_location(values: list[list[float]], first_wrong: list[int], sign: int = -1) -> dict[str, float]:
    """Where the credit of sign `sign` (negative: blame) lands relative to each row's first wrong token.

    Returns `top1` (fraction of rows whose most `sign`-extreme token is the first wrong token), `chance` (the same for
    a uniformly random token) and the shares of the `sign` mass `before` / `at` / `after` the first wrong token,
    averaged over rows that have some mass.
    """
    top1, chance, shares = [], [], {"before": [], "at": [], "after": []}
    for row, wrong in zip(values, first_wrong):
        if wrong is None or not row:
            continue
        signed = [sign * v for v in row]
        top1.append(float(max(range(len(row)), key=signed.__getitem__) == wrong))
        chance.append(1.0 / len(row))
        mass = [max(v, 0.0) for v in signed]
        total = sum(mass)
        if total > 0:
            shares["before"].append(sum(mass[:wrong]) / total)
            shares["at"].append(mass[wrong] / total)
            shares["after"].append(sum(mass[wrong + 1 :]) / total)

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {"top1": mean(top1), "chance": mean(chance), **{k: mean(v) for k, v in shares.items()}}


def first_wrong_tokens(rows: list[dict], tokenized, tokenizer) -> list[int | None]:
    from trl_tokenlevel.data.builtin.tasks import first_wrong_token

    return [first_wrong_token(_problem_of(row), ids, tokenizer) for row, ids in zip(rows, tokenized["rejected_ids"])]


# ---------------------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------------------


def frontier_gap(method_points: list[tuple[float, float]], baseline_points: list[tuple[float, float]]) -> float:
    """Mean over `method_points` (kl, accuracy) of accuracy minus the baseline's accuracy at the same KL.

    The baseline curve is the linear interpolation through its points sorted by KL, clamped at both ends.
    """
    import numpy as np

    baseline = sorted(baseline_points)
    xs, ys = [p[0] for p in baseline], [p[1] for p in baseline]
    return float(np.mean([acc - np.interp(kl, xs, ys) for kl, acc in method_points]))


def _signal_columns(method, rows, seed, state, model_path, tokenizer, base, config):
    """Signal columns a method trains on, built with the package's builders (cached per seed in `state`)."""
    from trl_tokenlevel import signals

    if method == "tgdpo":
        dpo_model = state["dpo_merged"]
        built = signals.add_dpo_token_rewards(_dataset(rows), dpo_model, base, tokenizer)
        return {k: built[k] for k in ("chosen_token_rewards", "rejected_token_rewards")}
    if method in ("cdpo", "weighted"):
        if "critical" not in state:
            positive = train_sft_model(rows, "chosen", model_path, tokenizer, config, seed)
            negative = train_sft_model(rows, "rejected", model_path, tokenizer, config, seed)
            built = signals.add_critical_token_weights(_dataset(rows), positive, negative, tokenizer, only_neg=False)
            state["critical"] = {k: built[k] for k in ("chosen_token_weights", "rejected_token_weights")}
            del positive, negative
        if method == "cdpo":
            return {"rejected_token_weights": state["critical"]["rejected_token_weights"]}
        return state["critical"]
    return {}


def load_base_and_pool(config: dict[str, Any]):
    """`(model_path, base, tokenizer, pool)`: the demo model on the configured device in eval mode (torch at the
    configured thread count) and its on-policy pair pool; shared by the preference and signals experiments."""
    from trl_tokenlevel.models import demo_model_path, load_demo_model

    torch.set_num_threads(config["threads"])
    model_path = demo_model_path(use_hub=False)
    base, tokenizer = load_demo_model(model_path, use_hub=False)
    base.to(config["device"]).eval()
    return model_path, base, tokenizer, preference_pool(config, base, tokenizer)


def run(quick: bool, seeds: list[int]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from trl_tokenlevel.data.builtin.tasks import make_problems

    config = experiment_config(CONFIGS, quick)
    start = time.perf_counter()
    model_path, base, tokenizer, pool = load_base_and_pool(config)
    if len(pool["train"]) < config["batch_size"] or not pool["valid"]:
        raise RuntimeError(f"Too few on-policy pairs: {len(pool['train'])} train, {len(pool['valid'])} valid.")
    eval_problems = make_problems(config["task"], config["n_eval"], "test", digits=config["digits"],
                                  length=config["length"])  # fmt: skip
    analysis_rows = pool["valid"][: config["analysis_pairs"]]
    base_eval = greedy_accuracy_and_kl(base, tokenizer, eval_problems, config)

    runs: list[tuple[str, float]] = [(m, config["beta"]) for m in config["methods"]]
    runs += [(m, b) for b in config["frontier_betas"] for m in ("dpo", "tdpo2") if b != config["beta"]]
    per_seed: dict[str, list[float]] = {}
    credit: dict[str, list[dict]] = {}
    points: dict[str, list[list[tuple[float, float]]]] = {"dpo": [], "tdpo2": []}
    timings: dict[str, list[float]] = {}

    def record(name, value):
        per_seed.setdefault(name, []).append(float(value))

    for seed in seeds:
        rows = random.Random(seed).sample(pool["train"], min(config["train_pairs"], len(pool["train"])))
        state: dict[str, Any] = {}
        seed_points = {"dpo": [], "tdpo2": []}
        for method, beta in runs:
            tick = time.perf_counter()
            columns = _signal_columns(method, rows, seed, state, model_path, tokenizer, base, config)
            trainer = train_preference(method, beta, _dataset(rows, columns), model_path, tokenizer, config, seed)
            policy = trainer.model
            evaluation = greedy_accuracy_and_kl(policy, tokenizer, eval_problems, config)
            tag = method if beta == config["beta"] else f"{method}@beta={beta}"
            record(f"{tag}/test_accuracy", evaluation["accuracy"])
            record(f"{tag}/kl_seq", evaluation["kl"])
            if method in seed_points:
                seed_points[method].append((evaluation["kl"], evaluation["accuracy"]))
            if beta == config["beta"]:
                chosen, rejected, tokenized = per_token_values(trainer, analysis_rows)
                record(f"{method}/heldout_chosen_logratio", sum(sum(r) for r in chosen) / len(chosen) / beta)
                location = credit_location(rejected, first_wrong_tokens(analysis_rows, tokenized, tokenizer))
                credit.setdefault(method, []).append(location)
                for key, value in location.items():
                    record(f"{method}/implicit_reward_{key}", value)
                if method == "dpo" and "tgdpo" in config["methods"]:
                    state["dpo_merged"] = policy.merge_and_unload().eval()
            timings.setdefault(tag, []).append(time.perf_counter() - tick)
            del trainer, policy
            gc.collect()
        for method in points:
            points[method].append(seed_points[method])
        if seed_points["dpo"] and seed_points["tdpo2"]:
            record("tdpo2_minus_dpo/frontier_gap", frontier_gap(seed_points["tdpo2"], seed_points["dpo"]))
        state.clear()

    metrics = {name: mean_ci(values) for name, values in per_seed.items()}
    metrics["base/test_accuracy"] = mean_ci([base_eval["accuracy"]] * len(seeds))
    claims = _claims(config, per_seed, seeds)
    figures = {
        "preference_frontier.png": _plot_frontier(points, base_eval, config),
        "preference_credit.png": _plot_credit(credit, config),
        "preference_accuracy.png": _plot_accuracy(metrics, config, base_eval),
    }
    return {
        "experiment": "preference",
        "config": {
            **config,
            "model": "SmolLM2-135M-Instruct (de-quantised Q4_1 GGUF)",
            "pool": pool_summary(pool),
            "runs_per_seed": [f"{m}@beta={b}" for m, b in runs],
        },  # fmt: skip
        "seeds": list(seeds),
        "metrics": metrics,
        "claims": claims,
        "timings_s": {k: mean_ci(v) for k, v in timings.items()},
        "wall_time_s": time.perf_counter() - start,
        "figures": figures,
    }


def _claims(config: dict, per_seed: dict[str, list[float]], seeds: list[int]) -> list[dict]:
    setting = (
        f"SmolLM2-135M, on-policy pairs on '{config['task']}' ({config['train_pairs']} pairs), LoRA r={config['lora_r']},"
        f" {config['steps']} steps x {config['batch_size']}, beta={config['beta']}, {len(seeds)} seeds"
    )
    claims = []

    def add(claim, paper, metric, result, sign, plot, setting_=setting):
        claims.append({"claim": claim, "paper": paper, "setting": setting_, "metric": metric, "result": result,
                       "verdict": verdict(result, sign), "plot": plot})  # fmt: skip

    if "tdpo2_minus_dpo/frontier_gap" in per_seed:
        add(
            "TDPO has a better reward-KL frontier than DPO",
            PAPERS["tdpo2"],
            "held-out accuracy minus DPO's at equal sequential KL (TDPO2 - DPO)",
            mean_ci(per_seed["tdpo2_minus_dpo/frontier_gap"]),
            +1,
            "preference_frontier.png",
            setting + f", betas {config['frontier_betas']}",
        )
        add(
            "TDPO keeps the policy closer to the reference than DPO at equal beta",
            PAPERS["tdpo2"],
            "sequential KL(π‖π_ref), TDPO2 - DPO",
            paired_difference(per_seed["tdpo2/kl_seq"], per_seed["dpo/kl_seq"]),
            -1,
            "preference_frontier.png",
        )
    for method in ("tdpo2", "tgdpo", "cdpo", "sparsepo", "weighted"):
        if f"{method}/test_accuracy" in per_seed:
            add(
                f"{method} beats DPO on held-out accuracy",
                PAPERS[method],
                "greedy test accuracy, method - DPO",
                paired_difference(per_seed[f"{method}/test_accuracy"], per_seed["dpo/test_accuracy"]),
                +1,
                "preference_accuracy.png",
            )
    add(
        "DPO lowers the likelihood of chosen answers",
        PAPERS["dpo"],
        "log π(chosen) - log π_ref(chosen), held-out pairs",
        mean_ci(per_seed["dpo/heldout_chosen_logratio"]),
        -1,
        "preference_accuracy.png",
    )
    add(
        "DPO's implicit token reward is most negative at the first wrong token of rejected answers",
        PAPERS["dpo"],
        "top-1 hit rate minus chance, held-out pairs",
        paired_difference(per_seed["dpo/implicit_reward_top1"], per_seed["dpo/implicit_reward_chance"]),
        +1,
        "preference_credit.png",
    )
    for method in ("cdpo", "tgdpo"):
        if f"{method}/implicit_reward_top1" in per_seed:
            add(
                f"{method} concentrates blame on the first wrong token more than DPO",
                PAPERS[method],
                "top-1 hit rate of the trained implicit token reward, method - DPO",
                paired_difference(per_seed[f"{method}/implicit_reward_top1"], per_seed["dpo/implicit_reward_top1"]),
                +1,
                "preference_credit.png",
            )
    return claims


def _plot_frontier(points, base_eval, config):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for method, color in (("dpo", "tab:blue"), ("tdpo2", "tab:red")):
        for index, seed_points in enumerate(points[method]):
            ordered = sorted(seed_points)
            axis.plot([p[0] for p in ordered], [p[1] for p in ordered], "o-", color=color, alpha=0.6,
                      label=method if index == 0 else None)  # fmt: skip
    axis.axhline(base_eval["accuracy"], color="gray", linestyle=":", label="base model")
    axis.set_xlabel("sequential KL(π‖π_ref) on greedy held-out answers")
    axis.set_ylabel("held-out greedy accuracy")
    axis.set_title(f"Reward-KL frontier, betas {config['frontier_betas']} (one line per seed)")
    axis.legend()
    return figure


def _plot_credit(credit, config):
    import matplotlib.pyplot as plt

    methods = list(credit)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    parts = ("before", "at", "after")
    bottom = [0.0] * len(methods)
    for part, color in zip(parts, ("tab:gray", "tab:red", "tab:olive")):
        heights = [sum(c[part] for c in credit[m]) / len(credit[m]) for m in methods]
        axes[0].bar(methods, heights, bottom=bottom, color=color, label=f"{part} first wrong token")
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes[0].set_ylabel("share of negative implicit reward, rejected answers")
    axes[0].legend(fontsize=8)
    top1 = [sum(c["top1"] for c in credit[m]) / len(credit[m]) for m in methods]
    chance = [sum(c["chance"] for c in credit[m]) / len(credit[m]) for m in methods]
    axes[1].bar(methods, top1, color="tab:red", label="most negative token = first wrong token")
    axes[1].plot(methods, chance, "k_", markersize=20, label="chance")
    axes[1].set_ylabel("fraction of held-out rejected answers")
    axes[1].legend(fontsize=8)
    figure.suptitle("Where each trained policy's token reward β·log π/π_ref puts the blame (seed mean)")
    return figure


def _plot_accuracy(metrics, config, base_eval):
    import matplotlib.pyplot as plt

    methods = [m for m in config["methods"] if f"{m}/test_accuracy" in metrics]
    means = [metrics[f"{m}/test_accuracy"]["mean"] for m in methods]
    errors = [metrics[f"{m}/test_accuracy"]["ci95"] or 0.0 for m in methods]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(methods, means, yerr=errors, capsize=4, color="tab:blue")
    axis.axhline(base_eval["accuracy"], color="gray", linestyle=":", label="base model")
    axis.set_ylabel(f"held-out greedy accuracy ({config['n_eval']} test prompts), 95% CI")
    axis.legend()
    return figure
