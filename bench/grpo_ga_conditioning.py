"""Why HAPO's gradient-accumulation gap is larger than the other methods': conditioning of ĥ, not a layout bug.

For each method, train the tiny test model twice from the same seed: one batch of 4 rows, and 2 micro-batches of 2
(`gradient_accumulation_steps=2`, so TRL generates the same 4 rows once and shapes them at the rollout stage). SGD
(lr 0.1), so parameter differences are gradient differences (Adam's first step amplifies noise in small gradients).
Reports the largest parameter difference after `--steps` steps and HAPO's entropy statistics: HAPO's ĥ divides
log-entropy deviations by their RMS σ, so when all entropies are nearly equal (the random tiny model: σ(log H) ≈ 3e-4)
a one-ulp float32 difference in an entropy becomes a visible difference in the advantages. `--head-scale` multiplies
the LM head to spread the entropies (σ ≈ 0.3 at 5), where HAPO's gap falls to the others' level.

    python bench/grpo_ga_conditioning.py                      # head scales 1 and 5, ~1 minute on 2 CPU cores
    python bench/grpo_ga_conditioning.py --head-scales 1 --steps 2

Writes bench/results/grpo_ga_conditioning_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = {
    "stock": {},
    "tempo": {"token_advantage": "tempo", "token_shaping_stage": "rollout"},
    "ucas": {"token_advantage": "ucas"},
    "hapo": {"token_advantage": "hapo"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-scales", default="1,5")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "grpo_ga_conditioning_cpu.json"))  # fmt: skip
    cli = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    import trl_tokenlevel.trainers.token_grpo_trainer as trainer_module
    from tests.trainers.test_token_grpo_parity import grpo_args, train
    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset
    from trl_tokenlevel.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair

    entropy_log = []
    stats_fn = trainer_module.hapo_entropy_stats

    def recording_stats(entropy, mask, *args, **kwargs):
        stats = stats_fn(entropy, mask, *args, **kwargs)
        valid = entropy[mask.bool()]
        entropy_log.append({"entropy_min": valid.min().item(), "entropy_max": valid.max().item(),
                            "sigma_log_entropy": float(stats.scale)})  # fmt: skip
        return stats

    trainer_module.hapo_entropy_stats = recording_stats
    tmp = tempfile.mkdtemp()
    rows = load_tiny_preference_dataset()
    tokenizer = build_tiny_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows])
    results = []
    for scale in [float(x) for x in cli.head_scales.split(",")]:
        model = build_tiny_model(tokenizer)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
        path = save_tiny_pair(model, tokenizer, f"{tmp}/model_x{scale:g}")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        initial = dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())
        for name, overrides in METHODS.items():
            entropy_log.clear()
            runs = []
            for layout in ({}, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}):
                args = grpo_args(f"{tmp}/{name}_{scale:g}_{len(runs)}", max_steps=cli.steps, optim="sgd",
                                 learning_rate=0.1, **overrides, **layout)  # fmt: skip
                runs.append(
                    dict(train(trainer_module.TokenGRPOTrainer, args, path, tokenizer).model.named_parameters())
                )
            gap = max((runs[0][n] - runs[1][n]).abs().max().item() for n in runs[0])
            moved = max((runs[0][n] - initial[n]).abs().max().item() for n in runs[0])
            row = {
                "head_scale": scale,
                "method": name,
                "steps": cli.steps,
                "max_param_gap": gap,
                "max_param_move": moved,
            }
            if entropy_log:
                row["hapo_entropy_stats_first_step"] = entropy_log[0]
            results.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(cli.out), exist_ok=True)
    with open(cli.out, "w") as handle:
        json.dump({"command": "python bench/grpo_ga_conditioning.py " + " ".join(sys.argv[1:]), "results": results},
                  handle, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
