"""Token-level GRPO with a verifiable reward, end to end.

A policy answers addition questions ("Q: What is 25 plus 27?\\nA:"); a completion earns 1.0 when its last number is the
sum (`addition_reward`, a verifiable reward) plus TensorBLEU partial credit against the reference solution (token-id
BLEU computed on tensors). The token-level method is one flag; the default trains only on the 20% highest-entropy
("forking") tokens.

Runs offline on a tiny random model by default (the rewards are then near zero, but every step is real):
    python examples/grpo_verifiable_reward.py
    python examples/grpo_verifiable_reward.py --method hapo        # ucas hapo gtpo d3s tw_grpo tempo entropy_band ...
With a real model:
    python examples/grpo_verifiable_reward.py --model Qwen/Qwen2.5-0.5B-Instruct --method entropy_quantile --steps 200
"""

import argparse

from transformers import AutoTokenizer

from trl_tokenlevel.data.builtin import load_tiny_preference_dataset
from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset
from trl_tokenlevel.rewards.grpo_rewards import TokenBLEUReward, addition_reward
from trl_tokenlevel.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair
from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig
from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer

SELECTIONS = ("entropy_quantile", "entropy_band")
ADVANTAGES = ("ucas", "hapo", "gtpo", "d3s", "tw_grpo", "tempo")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model"), parser.add_argument("--output_dir", default="grpo-verifiable-output")
    parser.add_argument("--method", default="entropy_quantile", choices=["none", *SELECTIONS, *ADVANTAGES])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    dataset = load_tiny_grpo_dataset()  # columns: prompt, answer (the sum), solution (a reference completion)
    if args.model is None:  # offline default: a tiny random model and a BPE tokenizer trained in memory
        texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in load_tiny_preference_dataset()]
        tokenizer = build_tiny_tokenizer(texts + [r["prompt"] + r["solution"] for r in dataset])
        model = save_tiny_pair(build_tiny_model(tokenizer), tokenizer, f"{args.output_dir}/base")
    else:
        tokenizer, model = AutoTokenizer.from_pretrained(args.model, padding_side="left"), args.model

    method = (
        {}
        if args.method == "none"
        else ({"token_selection": args.method} if args.method in SELECTIONS else {"token_advantage": args.method})
    )
    config = TokenGRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, logging_steps=5, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=16 if args.model is None else 128, report_to="none",
        learning_rate=5e-4 if args.model is None else 1e-6, bf16=False, gradient_checkpointing=args.model is not None,
        **method,
    )  # fmt: skip
    trainer = TokenGRPOTrainer(
        model=model,
        reward_funcs=[addition_reward, TokenBLEUReward(tokenizer, reference_column="solution")],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    last = [e for e in trainer.state.log_history if "reward" in e][-1]
    print({k: round(v, 4) for k, v in last.items() if k.startswith(("reward", "token/", "entropy"))})


if __name__ == "__main__":
    main()
