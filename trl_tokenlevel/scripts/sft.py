"""Token-level SFT training script.

Built-in tiny default (CPU, offline, well under a minute):
```bash
trl-tokenlevel sft --token_loss_type otr
```

Full training:
```bash
trl-tokenlevel sft \
    --model_name_or_path Qwen/Qwen2.5-0.5B \
    --dataset_name trl-lib/Capybara \
    --token_loss_type otr --otr_num_samples 256 --otr_temperature 1.3 \
    --learning_rate 2e-5 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 \
    --output_dir Qwen2.5-0.5B-OTR
```

ssToken (needs eager attention unless `--sstoken_gamma 0`), LoRA, several GPUs:
```bash
accelerate launch --num_processes 2 -m trl_tokenlevel.scripts.sft \
    --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara --attn_implementation eager \
    --token_selection sstoken --sstoken_ratio 0.6 --use_peft --lora_r 32 --lora_alpha 16 --output_dir out
```
Every `TokenSFTConfig`/`SFTConfig` field is a flag; `--config file.yaml` works as in TRL.
"""

from __future__ import annotations

import os

import torch

TINY_DEFAULTS = dict(
    per_device_train_batch_size=8,
    num_train_epochs=2,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    logging_steps=10,
    max_length=64,
    gradient_checkpointing=False,
    save_strategy="no",
    report_to="none",
    dataloader_pin_memory=torch.cuda.is_available(),
    seed=0,
)


def make_parser(prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_tokenlevel.trainers.token_sft_config import TokenSFTConfig

    parser = TrlParser((ScriptArguments, TokenSFTConfig, ModelConfig, DatasetMixtureConfig), prog=prog)
    # TrainingArguments refuses bf16 without a GPU; default to what the machine supports.
    parser.set_defaults(
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), output_dir="tokenlevel-sft-output"
    )
    return parser


def parse_args(argv=None):
    parser = make_parser(prog="trl-tokenlevel sft")
    parsed = parser.parse_args_and_config(args=argv)
    if parsed[2].model_name_or_path is None:
        # The built-in tiny job: defaults sized for a CPU minute. Flags and YAML still override them.
        parser.set_defaults(**TINY_DEFAULTS)
        parsed = parser.parse_args_and_config(args=argv)
    return parsed


def _load_datasets(script_args, dataset_args):
    from datasets import load_dataset
    from trl import get_dataset

    from trl_tokenlevel.data.builtin.sft import load_tiny_sft_dataset

    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    else:
        split = load_tiny_sft_dataset().train_test_split(test_size=16, seed=0)
        return split["train"], split["test"]
    train = dataset[script_args.dataset_train_split]
    heldout = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
    return train, heldout


def main(script_args, training_args, model_args, dataset_args):
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_tokenlevel.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_pair
    from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    train_dataset, heldout = _load_datasets(script_args, dataset_args)
    if model_args.model_name_or_path is None:
        texts = [row["prompt"] + row["completion"] for row in train_dataset]
        tokenizer = build_tiny_tokenizer(texts)
        model_path = os.path.join(training_args.output_dir, "tiny-base")
        save_tiny_pair(build_tiny_model(tokenizer, hidden_size=96, num_layers=2), tokenizer, model_path)
        # Eager attention, so that ssToken's attention score works on the tiny job too.
        model_init_kwargs = {"attn_implementation": model_args.attn_implementation or "eager"}
    else:
        model_path = model_args.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                                  trust_remote_code=training_args.trust_remote_code)  # fmt: skip
    model_init_kwargs = {key: value for key, value in model_init_kwargs.items() if value is not None}
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs or None

    trainer = TokenSFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=heldout if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    main(*parse_args())
