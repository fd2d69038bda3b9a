"""Token-level DPO training script.

Built-in tiny default (CPU, offline, 10-30 seconds):
```bash
trl-tokenlevel dpo
```

Full training:
```bash
trl-tokenlevel dpo \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --token_loss_type tgdpo --guidance_model_name_or_path <your-dpo-model> \
    --learning_rate 5e-7 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --output_dir Qwen2.5-0.5B-TGDPO
```

LoRA, several GPUs:
```bash
accelerate launch --num_processes 2 -m trl_tokenlevel.scripts.dpo \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized \
    --token_loss_type treg --token_signal treg --use_peft --lora_r 32 --lora_alpha 16 --output_dir out
```
Every `TokenDPOConfig`/`DPOConfig` field is a flag; `--config file.yaml` works as in TRL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl_tokenlevel.scripts.common import (
    build_tiny_base,
    load_train_and_heldout,
    machine_defaults,
    model_init_kwargs,
    parse_with_tiny_defaults,
    set_model_init_kwargs,
    train_and_save,
)

TINY_DEFAULTS = dict(
    per_device_train_batch_size=8,
    num_train_epochs=4,
    learning_rate=5e-4,
    lr_scheduler_type="constant",
    beta=0.1,
    logging_steps=10,
    max_length=64,
    gradient_checkpointing=False,
    save_strategy="no",
    report_to="none",
    seed=0,
)
TOKEN_SIGNALS = ("none", "dpo", "critical", "treg")


@dataclass
class TokenDPOScriptArguments:
    """Script arguments beside TRL's `ScriptArguments`: which offline token signal to build before training."""

    token_signal: str = field(
        default="none",
        metadata={
            "help": "Build per-token columns before training: 'none'; 'dpo' (DPO token rewards from "
            "--signal_model_name_or_path vs the base model, for tgdpo); 'critical' (cDPO weights from "
            "--positive_model_name_or_path/--negative_model_name_or_path); 'treg' (T-REG contrastive-prompt rewards "
            "with the initial policy as evaluator).",
            "choices": list(TOKEN_SIGNALS),
        },
    )
    signal_model_name_or_path: str | None = field(default=None, metadata={"help": "DPO model for token_signal='dpo'."})
    positive_model_name_or_path: str | None = field(default=None, metadata={"help": "cDPO positive model."})
    negative_model_name_or_path: str | None = field(default=None, metadata={"help": "cDPO negative model."})
    heatmap_examples: int = field(
        default=6, metadata={"help": "Held-out pairs drawn in the per-token implicit-reward heatmap (0: none)."}
    )


def make_parser(prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_tokenlevel import TokenDPOConfig

    parser = TrlParser(
        (ScriptArguments, TokenDPOScriptArguments, TokenDPOConfig, ModelConfig, DatasetMixtureConfig), prog=prog
    )
    parser.set_defaults(**machine_defaults("tokenlevel-dpo-output"))
    return parser


def parse_args(argv=None):
    return parse_with_tiny_defaults(make_parser(prog="trl-tokenlevel dpo"), argv, TINY_DEFAULTS)


def _add_token_signal(script_args, dataset, model_path, tokenizer, init_kwargs, device):
    from transformers import AutoModelForCausalLM

    from trl_tokenlevel import signals

    def load(path, what):
        if path is None:
            raise ValueError(f"--token_signal {script_args.token_signal} needs {what}.")
        # Signals are built before training, on the training device (one forward per completion and model).
        return AutoModelForCausalLM.from_pretrained(path, **init_kwargs).to(device).eval()

    if script_args.token_signal == "dpo":
        dpo_model = load(script_args.signal_model_name_or_path, "--signal_model_name_or_path (a DPO-trained model)")
        return signals.add_dpo_token_rewards(dataset, dpo_model, load(model_path, "a base model"), tokenizer)
    if script_args.token_signal == "critical":
        positive = load(script_args.positive_model_name_or_path, "--positive_model_name_or_path")
        negative = load(script_args.negative_model_name_or_path, "--negative_model_name_or_path")
        return signals.add_critical_token_weights(dataset, positive, negative, tokenizer)
    if script_args.token_signal == "treg":
        return signals.add_contrastive_prompt_rewards(dataset, load(model_path, "a base model"), tokenizer)
    return dataset


def write_implicit_reward_heatmap(trainer, rows, path: str) -> str | None:
    """HTML heatmap of `β·log π_θ/π_ref` per completion token for held-out pairs (From r to Q*)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from trl_tokenlevel.data import tokenize_preference_dataset
    from trl_tokenlevel.viz import TokenRow, token_heatmap_terminal, write_token_heatmap

    tokenizer = trainer.processing_class
    tokenized = tokenize_preference_dataset(rows, tokenizer)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(list(tokenized))
    try:
        rewards = trainer.compute_token_rewards(batch).cpu()
    except ValueError as error:  # e.g. precomputed reference log-probs and no reference model left in memory
        trainer.accelerator.print(f"No token-reward heatmap: {error}")
        return None
    mask = batch["completion_mask"][:, 1:].bool()
    n = len(rows)
    heat_rows = []
    for i in range(n):
        for side, row in (("chosen", i), ("rejected", n + i)):
            ids = batch["input_ids"][row, 1:][mask[row]].tolist()
            tokens = [tokenizer.decode([token]) for token in ids]
            prompt = tokenizer.decode(tokenized[i]["prompt_ids"], skip_special_tokens=True)
            heat_rows.append(TokenRow(f"{side}: {prompt.strip()}", tokens, rewards[row][mask[row]].tolist()))
    write_token_heatmap(path, heat_rows, title="Per-token implicit rewards β·log π_θ/π_ref", value_name="reward")
    trainer.accelerator.print(token_heatmap_terminal(heat_rows[0]))
    trainer.accelerator.print(token_heatmap_terminal(heat_rows[1]))
    return path


def main(script_args, token_script_args, training_args, model_args, dataset_args):
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_tokenlevel import TokenDPOTrainer
    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset

    init_kwargs = model_init_kwargs(model_args, training_args)
    train_dataset, heldout, builtin = load_train_and_heldout(script_args, dataset_args, load_tiny_preference_dataset)
    if model_args.model_name_or_path is None:
        texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in train_dataset]
        tokenizer, model_path = build_tiny_base(training_args, texts)
        init_kwargs = {}
    else:
        model_path = model_args.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                                  trust_remote_code=training_args.trust_remote_code)  # fmt: skip
    set_model_init_kwargs(training_args, init_kwargs)

    train_dataset = _add_token_signal(
        token_script_args, train_dataset, model_path, tokenizer, training_args.model_init_kwargs or {}, training_args.device
    )
    trainer = TokenDPOTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=heldout if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, training_args, script_args)

    rows = heldout if heldout is not None else train_dataset
    count = min(token_script_args.heatmap_examples, len(rows))
    if count > 0 and trainer.accelerator.is_main_process:
        path = os.path.join(training_args.output_dir, "token_rewards.html")
        if write_implicit_reward_heatmap(trainer, rows.select(range(count)), path):
            trainer.accelerator.print(f"Per-token implicit-reward heatmap written to {path}")
    return trainer


if __name__ == "__main__":
    main(*parse_args())
