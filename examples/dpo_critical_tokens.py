"""Critical-token DPO (cDPO) end to end: contrastive-estimation weights from two models, then token-weighted DPO.

Runs offline on tiny random models by default (the weights are then meaningless, but every step is real):
    python examples/dpo_critical_tokens.py
With real models (LoRA fine-tunes of one base on correct / incorrect answers):
    python examples/dpo_critical_tokens.py --model Qwen/Qwen2.5-0.5B-Instruct --positive pos-model --negative neg-model \
        --dataset trl-lib/ultrafeedback_binarized
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer
from trl_tokenlevel.data.builtin import load_tiny_preference_dataset
from trl_tokenlevel.signals import add_critical_token_weights
from trl_tokenlevel.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model"), parser.add_argument("--positive"), parser.add_argument("--negative")
    parser.add_argument("--dataset"), parser.add_argument("--output_dir", default="cdpo-output")
    args = parser.parse_args()

    if args.model is None:  # offline default: tiny models built from a config
        dataset = load_tiny_preference_dataset()
        tokenizer = build_tiny_tokenizer(row["prompt"] + row["chosen"] + row["rejected"] for row in dataset)
        model = save_tiny_pair(build_tiny_model(tokenizer), tokenizer, f"{args.output_dir}/base")
        positive, negative = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=2)
    else:
        from datasets import load_dataset

        dataset = load_dataset(args.dataset, split="train")
        tokenizer, model = AutoTokenizer.from_pretrained(args.model), args.model
        positive = AutoModelForCausalLM.from_pretrained(args.positive)
        negative = AutoModelForCausalLM.from_pretrained(args.negative)

    # w_t = 1 - softmax(2 z+ - z-)[y_t] on rejected tokens (only_neg), EOS weight 1: one column per completion token.
    dataset = add_critical_token_weights(dataset, positive, negative, tokenizer)
    config = TokenDPOConfig(output_dir=args.output_dir, token_loss_type="cdpo", max_steps=20, logging_steps=5,
                            learning_rate=5e-4 if args.model is None else 5e-7,
                            report_to="none", bf16=False, gradient_checkpointing=args.model is not None)  # fmt: skip
    trainer = TokenDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
