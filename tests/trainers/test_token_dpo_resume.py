"""Checkpoints resume exactly, per-token columns included."""

from __future__ import annotations

import os

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer
from trl_tokenlevel.data import tokenize_preference_dataset

from .dpo_utils import assert_logs_equal, assert_params_equal, base_args


def test_resume_from_checkpoint_is_exact(tiny_preference_dataset, tiny_tokenizer, tiny_model_path, tmp_path):
    dataset = tiny_preference_dataset.select(range(16))
    tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer)
    weights = [[0.25 + (i % 3) for i in range(len(ids))] for ids in tokenized["rejected_ids"]]
    dataset = dataset.add_column("rejected_token_weights", weights)

    def trainer(out, **overrides):
        args = TokenDPOConfig(**base_args(out, token_loss_type="cdpo", max_steps=4, save_strategy="steps",
                                          save_steps=2, **overrides))  # fmt: skip
        return TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)

    straight = trainer(tmp_path / "straight")
    straight.train()
    resumed = trainer(tmp_path / "straight")  # same output dir: resume from its step-2 checkpoint
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "straight", "checkpoint-2"))
    assert_params_equal(straight.model, resumed.model)

    # `num_tokens` is a running count that TRL's DPOTrainer does not checkpoint (stock behaviour, kept for parity).
    def step_logs(history):
        return [{k: v for k, v in e.items() if k != "num_tokens"} for e in history if "loss" in e and e["step"] > 2]

    assert_logs_equal(step_logs(straight.state.log_history), step_logs(resumed.state.log_history))
