"""Token signals on the preference data: do the builders put their extreme values on the token that decides correctness?

On the held-out on-policy analysis pairs of the `preference` experiment (pairs of `valid` problems; the rejected answer is the
base model's own wrong sample), each builder of `trl_tokenlevel.signals` scores every rejected completion token, and
we ask whether its most extreme value lands on the first wrong token (`tasks.first_wrong_token`, the token where the
answer departs from the gold one; later tokens follow from it).

- cDPO critical-token weights (`add_critical_token_weights`, high = critical): positive / negative models are LoRA
  fine-tunes of the base on the chosen / rejected answers of the seed's training pairs. Scored with
  `eos_weight_one=False`: with the official `True` the end-of-turn weight is pinned to 1 and would always rank first.
- TGDPO / From-r-to-Q* DPO token rewards (`add_dpo_token_rewards`, most negative = blamed): from a LoRA DPO policy
  trained on the seed's training pairs, against the base. (TGDPO's scale does not change the ranking, so this is also
  DPO's own implicit per-token reward.)
- T-REG contrastive-prompt rewards (`add_contrastive_prompt_rewards`, most negative = blamed), base model as
  evaluator with the package's default templates. It trains nothing, so its value is the same for every seed.

precision@k = fraction of rejected answers whose first wrong token is among the builder's k most extreme tokens;
chance@k = mean of min(k, n)/n over the same answers (n = completion tokens, end of turn and template suffix included).
"""

from __future__ import annotations

import gc
import random
import time
from typing import Any

from bench.claims.common import experiment_config, mean_ci, paired_difference, verdict
from bench.claims.preference import (
    CONFIGS as PREFERENCE_CONFIGS,
)
from bench.claims.preference import (
    _dataset,
    first_wrong_tokens,
    load_base_and_pool,
    pool_summary,
    train_preference,
    train_sft_model,
)

KS = (1, 3)
# The preference experiment's settings (same cached pair pool), with fewer builder-training steps in the full run so
# it fits beside the preference run on the shared CPU; every setting is recorded in the result's config.
CONFIGS = {
    "full": {**PREFERENCE_CONFIGS["full"], "signal_sft_steps": 2, "steps": 2},
    "quick": dict(PREFERENCE_CONFIGS["quick"]),
}
# (builder, column, sign): sign +1 ranks the largest values first, -1 the most negative first.
BUILDERS = {
    "cdpo_critical_weights": ("rejected_token_weights", +1),
    "tgdpo_dpo_rewards": ("rejected_token_rewards", -1),
    "treg_contrastive_rewards": ("rejected_token_rewards", -1),
}
PAPERS = {
    "cdpo_critical_weights": "Lin et al. 2024, Critical Tokens Matter / cDPO (arXiv:2411.19943)",
    "tgdpo_dpo_rewards": "Zhu et al. 2025, TGDPO (arXiv:2506.14574); Rafailov et al. 2024, From r to Q*",
    "treg_contrastive_rewards": "Zhou et al. 2024, T-REG (arXiv:2412.02685)",
}


def precision_at_k(values: list[list[float]], first_wrong: list[int | None], sign: int, k: int) -> tuple[float, float]:
    """(precision@k, chance@k) of the `k` most `sign`-extreme tokens against each row's first wrong token."""
    hits, chance = [], []
    for row, wrong in zip(values, first_wrong):
        if wrong is None or not row:
            continue
        ranked = sorted(range(len(row)), key=lambda t: -sign * row[t])
        hits.append(float(wrong in ranked[:k]))
        chance.append(min(k, len(row)) / len(row))
    if not hits:
        raise ValueError("No rejected answer with a first wrong token to score.")
    return sum(hits) / len(hits), sum(chance) / len(chance)


def run(quick: bool, seeds: list[int]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from trl_tokenlevel import signals
    from trl_tokenlevel.data import tokenize_preference_dataset

    config = experiment_config(CONFIGS, quick)
    start = time.perf_counter()
    model_path, base, tokenizer, pool = load_base_and_pool(config)
    rows = pool["valid"][: config["analysis_pairs"]]
    analysis = _dataset(rows)
    first_wrong = first_wrong_tokens(rows, tokenize_preference_dataset(analysis, tokenizer), tokenizer)
    treg = signals.add_contrastive_prompt_rewards(analysis, base, tokenizer)["rejected_token_rewards"]

    per_seed: dict[str, list[float]] = {}
    for seed in seeds:
        train_rows = random.Random(seed).sample(pool["train"], min(config["train_pairs"], len(pool["train"])))
        positive = train_sft_model(train_rows, "chosen", model_path, tokenizer, config, seed)
        negative = train_sft_model(train_rows, "rejected", model_path, tokenizer, config, seed)
        critical = signals.add_critical_token_weights(analysis, positive, negative, tokenizer, eos_weight_one=False)
        del positive, negative
        trainer = train_preference("dpo", config["beta"], _dataset(train_rows), model_path, tokenizer, config, seed)
        dpo_model = trainer.model.merge_and_unload().eval()
        dpo_rewards = signals.add_dpo_token_rewards(analysis, dpo_model, base, tokenizer)
        del trainer, dpo_model
        gc.collect()
        columns = {
            "cdpo_critical_weights": critical["rejected_token_weights"],
            "tgdpo_dpo_rewards": dpo_rewards["rejected_token_rewards"],
            "treg_contrastive_rewards": treg,
        }
        for name, (_, sign) in BUILDERS.items():
            for k in KS:
                hit, chance = precision_at_k(columns[name], first_wrong, sign, k)
                per_seed.setdefault(f"{name}/precision@{k}", []).append(hit)
                per_seed.setdefault(f"{name}/chance@{k}", []).append(chance)

    metrics = {name: mean_ci(values) for name, values in per_seed.items()}
    setting = (
        f"SmolLM2-135M, {len(rows)} held-out on-policy '{config['task']}' pairs; builder models: LoRA r={config['lora_r']},"
        f" {config['signal_sft_steps']} SFT / {config['steps']} DPO steps on {config['train_pairs']} train pairs"
    )
    claims = []
    for name in BUILDERS:
        difference = paired_difference(per_seed[f"{name}/precision@1"], per_seed[f"{name}/chance@1"])
        claims.append({
            "claim": f"{name.replace('_', ' ')}: most extreme value on the first wrong token of rejected answers",
            "paper": PAPERS[name], "setting": setting + (" (no training: same value every seed)" if "treg" in name else ""),
            "metric": "precision@1 minus chance", "result": difference, "verdict": verdict(difference, +1),
            "plot": "signals_precision.png",
        })  # fmt: skip
    return {
        "experiment": "signals",
        "config": {
            **config,
            "ks": list(KS),
            "analysis_pairs": len(rows),
            "cdpo_eos_weight_one": False,
            "pool": pool_summary(pool),
        },
        "seeds": list(seeds),
        "metrics": metrics,
        "claims": claims,
        "wall_time_s": time.perf_counter() - start,
        "figures": {"signals_precision.png": _plot(metrics)},
    }


def _plot(metrics):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(KS), figsize=(5 * len(KS), 4), sharey=True)
    names = list(BUILDERS)
    for axis, k in zip(axes, KS):
        means = [metrics[f"{n}/precision@{k}"]["mean"] for n in names]
        errors = [metrics[f"{n}/precision@{k}"]["ci95"] or 0.0 for n in names]
        axis.bar(range(len(names)), means, yerr=errors, capsize=4, color="tab:red", label=f"precision@{k}")
        axis.plot(range(len(names)), [metrics[f"{n}/chance@{k}"]["mean"] for n in names], "k_", markersize=25,
                  label="chance")  # fmt: skip
        axis.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=8)
        axis.set_title(f"first wrong token among the top {k}")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("fraction of held-out rejected answers (95% CI)")
    return figure
