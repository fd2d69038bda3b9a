"""Token-level GRPO training script.

Default job (CPU, offline, a minute or two): SmolLM2-135M-Instruct with LoRA learns "Larger of a and b:" from an
exact-answer reward, updating only the 20% highest-entropy completion tokens of each batch (80/20 forking tokens), and
prints held-out greedy accuracy before and after. `--tiny`: a tiny random model on the built-in addition task with a
verifiable reward plus TensorBLEU partial credit (a smoke test, seconds).
```bash
trl-tokenlevel grpo
trl-tokenlevel grpo --tiny --token_advantage hapo               # any of ucas hapo gtpo d3s tw_grpo tempo
```

Full training:
```bash
trl-tokenlevel grpo \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/DeepMath-103K --reward_funcs majority_vote \
    --token_selection entropy_band --num_generations 8 --max_completion_length 1024 \
    --learning_rate 1e-6 --per_device_train_batch_size 8 --gradient_accumulation_steps 4 \
    --output_dir Qwen2.5-0.5B-TokenGRPO
```

LoRA, several GPUs:
```bash
accelerate launch --num_processes 2 -m trl_tokenlevel.scripts.grpo \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name <prompt-only dataset with an `answer` column> \
    --reward_funcs soft_choice --token_advantage gtpo --loss_type grpo --use_peft --lora_r 32 --lora_alpha 16 \
    --output_dir out
```
Every `TokenGRPOConfig`/`GRPOConfig` field is a flag; `--config file.yaml` works as in TRL.
"""

from __future__ import annotations

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
    learning_rate=5e-4,
    lr_scheduler_type="constant",
    gradient_checkpointing=False,
    save_strategy="no",
    report_to="none",
    seed=0,
)
TINY_DEFAULTS = dict(
    COMMON_BUILTIN_DEFAULTS,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=16,
    max_steps=30,
    logging_steps=5,
)
# The demo job: LoRA, the paper's 80/20 entropy selection, 4 answers to each of 4 prompts a step. (8 answers to one
# prompt a step left most steps without a gradient: the model answers a given comparison all right or all wrong, and a
# group with equal rewards has zero advantage.)
DEMO_DEFAULTS = dict(
    COMMON_BUILTIN_DEFAULTS,
    **DEMO_LORA_DEFAULTS,
    reward_funcs=["exact_match"],
    token_selection="entropy_quantile",
    per_device_train_batch_size=16,
    num_generations=4,
    max_completion_length=8,
    max_steps=6,
    learning_rate=1.5e-4,  # chosen on validation problems: bench/demo_settings.py, docs/cli.md
    logging_steps=2,
)
REWARD_FUNCS = ("exact_match", "addition", "token_bleu", "majority_vote", "soft_choice")


@dataclass
class TokenGRPOScriptArguments(BuiltinJobArguments):
    """Script arguments beside TRL's `ScriptArguments`: which built-in reward functions score the completions."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["addition", "token_bleu"],
        metadata={
            "help": "Reward functions: 'exact_match' (1 when the answer, stripped, equals column `answer`), "
            "from trl_tokenlevel.rewards.grpo_rewards 'addition' (last number equals column "
            "`answer`), 'token_bleu' (TensorBLEU against column `--reference_column`), 'majority_vote' (TTRL/SPINE "
            "pseudo-reward, no labels), 'soft_choice' (TW-GRPO soft multi-choice, column `answer`).",
        },
    )
    reference_column: str = field(default="solution", metadata={"help": "Reference column of 'token_bleu'."})


def make_parser(prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig

    parser = TrlParser(
        (ScriptArguments, TokenGRPOScriptArguments, TokenGRPOConfig, ModelConfig, DatasetMixtureConfig), prog=prog
    )
    parser.set_defaults(**machine_defaults("tokenlevel-grpo-output"))
    return parser


def parse_args(argv=None):
    return parse_with_builtin_defaults(make_parser(prog="trl-tokenlevel grpo"), argv, TINY_DEFAULTS, DEMO_DEFAULTS)


def exact_match_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion, stripped of whitespace and end-of-turn markers, is exactly `answer` (the held-out
    accuracy's criterion, `tasks.is_correct`)."""
    from trl_tokenlevel.data.builtin.tasks import normalize
    from trl_tokenlevel.rewards.grpo_rewards import completion_text

    return [float(normalize(completion_text(c)) == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def build_reward_funcs(names: list[str], tokenizer, reference_column: str = "solution") -> list:
    from trl_tokenlevel.rewards.grpo_rewards import (
        MajorityVoteReward,
        SoftChoiceReward,
        TokenBLEUReward,
        addition_reward,
    )

    unknown = [name for name in names if name not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"Unknown reward function(s) {unknown}; choose from {list(REWARD_FUNCS)}.")
    table = {
        "exact_match": lambda: exact_match_reward,
        "addition": lambda: addition_reward,
        "token_bleu": lambda: TokenBLEUReward(tokenizer, reference_column=reference_column),
        "majority_vote": MajorityVoteReward,
        "soft_choice": SoftChoiceReward,
    }
    return [table[name]() for name in names]


def main(script_args, token_script_args, training_args, model_args, dataset_args):
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_tokenlevel.data.builtin import load_tiny_preference_dataset
    from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset
    from trl_tokenlevel.scripts import demo
    from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer

    init_kwargs = model_init_kwargs(model_args, training_args)
    demo_job = model_args.model_name_or_path is None and not token_script_args.tiny
    builtin_demo_data = demo_job and not (script_args.dataset_name or dataset_args.datasets)
    if builtin_demo_data:
        train_dataset, heldout, builtin = demo.training_problem_dataset(with_completion=False), None, False
    else:
        train_dataset, heldout, builtin = load_train_and_heldout(script_args, dataset_args, load_tiny_grpo_dataset)
    if token_script_args.tiny:
        texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in load_tiny_preference_dataset()]
        texts += [row["prompt"] + row["solution"] for row in train_dataset] if builtin else []
        tokenizer, model_path = build_tiny_base(training_args, texts)
        init_kwargs = {}
    else:
        from trl_tokenlevel.models import demo_model_path

        model_path = demo_model_path() if demo_job else model_args.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                                  trust_remote_code=training_args.trust_remote_code,
                                                  padding_side="left")  # fmt: skip
    set_model_init_kwargs(training_args, init_kwargs)

    trainer_kwargs = {}
    if training_args.chord and training_args.chord_expert_dataset_name is None and builtin:
        # The built-in task ships reference solutions: they are CHORD's expert demonstrations.
        trainer_kwargs["expert_dataset"] = train_dataset.rename_column("solution", "completion")
    trainer = TokenGRPOTrainer(
        model=model_path,
        reward_funcs=build_reward_funcs(token_script_args.reward_funcs, tokenizer, token_script_args.reference_column),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=heldout if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        **trainer_kwargs,
    )
    if not builtin_demo_data:
        return train_and_save(trainer, training_args, script_args)
    before = demo.print_heldout_accuracy(trainer, tokenizer, "before training", token_script_args.heldout_split)
    train_and_save(trainer, training_args, script_args)
    demo.print_heldout_accuracy(trainer, tokenizer, "after training", token_script_args.heldout_split, before)
    return trainer


if __name__ == "__main__":
    main(*parse_args())
    leave_distributed_run()
