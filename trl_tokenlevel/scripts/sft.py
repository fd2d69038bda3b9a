"""Token-level SFT training script.

Default job (CPU, offline, a minute or two): SmolLM2-135M-Instruct with LoRA learns the gold answers to "Larger of a
and b:" with One-Token Rollout (a one-step policy gradient on sampled tokens at every answer position) and prints
held-out greedy accuracy before and after. `--tiny`: a tiny random model on toy data (a smoke test, seconds).
```bash
trl-tokenlevel sft
trl-tokenlevel sft --tiny --token_loss_type chord_phi
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

import torch

from trl_tokenlevel.scripts.common import (
    DEMO_LORA_DEFAULTS,
    BuiltinJobArguments,
    build_tiny_base,
    leave_distributed_run,
    load_train_and_heldout,
    machine_defaults,
    model_init_kwargs,
    parse_with_builtin_defaults,
    set_model_init_kwargs,
    train_and_save,
)

COMMON_BUILTIN_DEFAULTS = dict(
    lr_scheduler_type="constant",
    gradient_checkpointing=False,
    save_strategy="no",
    report_to="none",
    dataloader_pin_memory=torch.cuda.is_available(),
    seed=0,
)
TINY_DEFAULTS = dict(
    COMMON_BUILTIN_DEFAULTS,
    per_device_train_batch_size=8,
    num_train_epochs=2,
    learning_rate=1e-3,
    logging_steps=10,
    max_length=64,
)
# The demo job: LoRA, One-Token Rollout with the config's defaults (K=256 samples at temperature 1.3 per position).
DEMO_DEFAULTS = dict(
    COMMON_BUILTIN_DEFAULTS,
    **DEMO_LORA_DEFAULTS,
    token_loss_type="otr",
    per_device_train_batch_size=8,
    max_steps=8,
    learning_rate=1.5e-4,  # chosen on validation problems: bench/demo_settings.py, docs/cli.md
    logging_steps=2,
    max_length=256,
)


def make_parser(prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_tokenlevel.trainers.token_sft_config import TokenSFTConfig

    parser = TrlParser(
        (ScriptArguments, BuiltinJobArguments, TokenSFTConfig, ModelConfig, DatasetMixtureConfig), prog=prog
    )
    parser.set_defaults(**machine_defaults("tokenlevel-sft-output"))
    return parser


def parse_args(argv=None):
    return parse_with_builtin_defaults(make_parser(prog="trl-tokenlevel sft"), argv, TINY_DEFAULTS, DEMO_DEFAULTS)


def main(script_args, job_args, training_args, model_args, dataset_args):
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_tokenlevel.data.builtin.sft import load_tiny_sft_dataset
    from trl_tokenlevel.scripts import demo
    from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer

    init_kwargs = model_init_kwargs(model_args, training_args)
    demo_job = model_args.model_name_or_path is None and not job_args.tiny
    builtin_demo_data = demo_job and not (script_args.dataset_name or dataset_args.datasets)
    if builtin_demo_data:
        train_dataset, heldout = demo.training_problem_dataset(with_completion=True).remove_columns("answer"), None
    else:
        train_dataset, heldout, _ = load_train_and_heldout(script_args, dataset_args, load_tiny_sft_dataset)
    if job_args.tiny:
        tokenizer, model_path = build_tiny_base(
            training_args, [row["prompt"] + row["completion"] for row in train_dataset]
        )
        # Eager attention, so that ssToken's attention score works on the tiny job too.
        init_kwargs = {"attn_implementation": model_args.attn_implementation or "eager"}
    else:
        from trl_tokenlevel.models import demo_model_path

        model_path = demo_model_path() if demo_job else model_args.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                                  trust_remote_code=training_args.trust_remote_code)  # fmt: skip
    set_model_init_kwargs(training_args, init_kwargs)

    trainer = TokenSFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=heldout if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if not builtin_demo_data:
        return train_and_save(trainer, training_args, script_args)
    before = demo.print_heldout_accuracy(trainer, tokenizer, "before training", job_args.heldout_split)
    train_and_save(trainer, training_args, script_args)
    demo.print_heldout_accuracy(trainer, tokenizer, "after training", job_args.heldout_split, before)
    return trainer


if __name__ == "__main__":
    main(*parse_args())
    leave_distributed_run()
