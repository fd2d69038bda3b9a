"""Token-level DPO training script.

Default job (CPU, offline, minutes on 2 cores): SmolLM2-135M-Instruct with LoRA learns TDPO2 on its own
answers to "Larger of a and b:" (built-in on-policy pairs labelled by correctness), prints held-out greedy accuracy
before and after, and writes a heatmap of per-token implicit rewards on held-out pairs:
```bash
trl-tokenlevel dpo
trl-tokenlevel dpo --tiny          # smoke test: tiny random model, toy data, seconds
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

LoRA, several GPUs (see docs/launch.md):
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
    beta=0.1,
    gradient_checkpointing=False,
    save_strategy="no",
    report_to="none",
    seed=0,
)
TINY_DEFAULTS = dict(
    COMMON_BUILTIN_DEFAULTS,
    per_device_train_batch_size=8,
    num_train_epochs=4,
    learning_rate=5e-4,
    logging_steps=10,
    max_length=64,
)
# The demo job: LoRA and TDPO2, the token-level DPO of Zeng et al. It needs no token signal (a signal builder such as
# T-REG's contrastive prompts costs four more forwards per pair, more than the job's CPU budget), and its per-token KL
# is computed in tiles.
DEMO_DEFAULTS = dict(
    COMMON_BUILTIN_DEFAULTS,
    **DEMO_LORA_DEFAULTS,
    token_loss_type="tdpo2",
    per_device_train_batch_size=4,
    max_steps=8,
    learning_rate=5e-4,  # chosen on validation problems: bench/demo_settings.py, docs/cli.md
    logging_steps=2,
    max_length=256,
)
TOKEN_SIGNALS = ("none", "dpo", "critical", "treg")


@dataclass
class TokenDPOScriptArguments(BuiltinJobArguments):
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
    return parse_with_builtin_defaults(make_parser(prog="trl-tokenlevel dpo"), argv, TINY_DEFAULTS, DEMO_DEFAULTS)


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


def implicit_token_rewards(trainer, rows, batch_size: int = 16):
    """Per held-out pair, the completion ids and implicit token rewards `β·log π_θ/π_ref` (From r to Q*) of the chosen
    and the rejected answer: `[(chosen_ids, chosen_rewards, rejected_ids, rejected_rewards), ...]`, or None when the
    reference is not in memory.

    Every rank must call this: TRL's dataset preparation waits on a barrier, and a sharded model (FSDP, ZeRO-3) needs
    every rank in each forward.
    """
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from trl_tokenlevel.data import tokenize_preference_dataset

    tokenizer = trainer.processing_class
    tokenized = tokenize_preference_dataset(rows, tokenizer)
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    pairs = []
    was_training = trainer.model.training
    trainer.model.eval()  # the rewards of the trained policy, not of one dropout sample of it
    try:
        for start in range(0, len(tokenized), batch_size):
            batch = collate(list(tokenized.select(range(start, min(start + batch_size, len(tokenized))))))
            try:
                with torch.no_grad():
                    rewards = trainer.compute_token_rewards(batch).float().cpu()
            except ValueError as error:  # e.g. precomputed reference log-probs and no reference model left in memory
                trainer.accelerator.print(f"No token-reward heatmap: {error}")
                return None
            mask = batch["completion_mask"][:, 1:].bool()
            ids = [batch["input_ids"][row, 1:][mask[row]].tolist() for row in range(mask.shape[0])]
            values = [rewards[row][mask[row]].tolist() for row in range(mask.shape[0])]
            n = mask.shape[0] // 2  # chosen rows, then rejected rows
            pairs += [(ids[i], values[i], ids[n + i], values[n + i]) for i in range(n)]
    finally:
        trainer.model.train(was_training)
    return pairs


def write_implicit_reward_heatmap(trainer, rows, pairs, path: str) -> str:
    """HTML heatmap of the implicit token rewards of `pairs` (from `implicit_token_rewards`); main process only."""
    from trl_tokenlevel.viz import TokenRow, token_heatmap_terminal, write_token_heatmap

    tokenizer = trainer.processing_class
    heat_rows = []
    for row, (chosen_ids, chosen, rejected_ids, rejected) in zip(rows, pairs):
        prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        for side, ids, values in (("chosen", chosen_ids, chosen), ("rejected", rejected_ids, rejected)):
            tokens = [tokenizer.decode([token]) for token in ids]
            heat_rows.append(TokenRow(f"{side}: {prompt.strip()}", tokens, values))
    write_token_heatmap(path, heat_rows, title="Per-token implicit rewards β·log π_θ/π_ref", value_name="reward")
    print(token_heatmap_terminal(heat_rows[0]))
    print(token_heatmap_terminal(heat_rows[1]))
    return path


def main(script_args, token_script_args, training_args, model_args, dataset_args):
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_tokenlevel import TokenDPOTrainer
    from trl_tokenlevel.data.builtin import load_demo_preference_dataset, load_tiny_preference_dataset
    from trl_tokenlevel.scripts import demo

    init_kwargs = model_init_kwargs(model_args, training_args)
    demo_job = model_args.model_name_or_path is None and not token_script_args.tiny
    # The built-in demo pairs come from verifiable problems: accuracy and first wrong tokens can be measured.
    demo_data = demo_job and not (script_args.dataset_name or dataset_args.datasets)
    if demo_data:
        train_dataset = load_demo_preference_dataset("train").select_columns(["prompt", "chosen", "rejected"])
        heldout = load_demo_preference_dataset("test")
    else:
        train_dataset, heldout, _ = load_train_and_heldout(script_args, dataset_args, load_tiny_preference_dataset)
    if token_script_args.tiny:
        texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in train_dataset]
        tokenizer, model_path = build_tiny_base(training_args, texts)
        init_kwargs = {}
    else:
        from trl_tokenlevel.models import demo_model_path

        model_path = demo_model_path() if demo_job else model_args.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                                  trust_remote_code=training_args.trust_remote_code)  # fmt: skip
    set_model_init_kwargs(training_args, init_kwargs)

    train_dataset = _add_token_signal(
        token_script_args,
        train_dataset,
        model_path,
        tokenizer,
        training_args.model_init_kwargs or {},
        training_args.device,
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
    if demo_data:
        before = demo.print_heldout_accuracy(trainer, tokenizer, "before training", token_script_args.heldout_split)
    train_and_save(trainer, training_args, script_args)
    if demo_data:
        demo.print_heldout_accuracy(trainer, tokenizer, "after training", token_script_args.heldout_split, before)

    rows = heldout if heldout is not None else train_dataset
    count = min(token_script_args.heatmap_examples, len(rows))
    if count == 0:
        return trainer
    # The built-in held-out pairs are all scored, to measure where the credit goes; other data only as many as drawn.
    scored = rows if demo_data else rows.select(range(count))
    pairs = implicit_token_rewards(trainer, scored)
    if pairs is None or not trainer.accelerator.is_main_process:
        return trainer
    path = write_implicit_reward_heatmap(trainer, scored.select(range(count)), pairs[:count],
                                         os.path.join(training_args.output_dir, "token_rewards.html"))  # fmt: skip
    print(f"Per-token implicit-reward heatmap written to {path}")
    if demo_data:
        hits, total, chance = demo.most_negative_on_first_wrong(
            scored, [pair[2] for pair in pairs], [pair[3] for pair in pairs], tokenizer
        )
        print(
            f"Most negative token reward on the first wrong token: {hits}/{total} held-out rejected answers "
            f"({hits / total:.0%}; a random token would hit {chance:.0%})"
        )
    return trainer


if __name__ == "__main__":
    main(*parse_args())
    leave_distributed_run()
