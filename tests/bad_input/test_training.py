"""What happens during training: a non-finite loss stops the run before a checkpoint of broken weights is written
(the last good checkpoint survives rotation); OTR names non-finite logits; overridden TRL methods work on objects that
have only TRL's attributes; cDPO `per_token_completion` under gradient accumulation is as documented."""

from __future__ import annotations

import math
import os
from unittest.mock import Mock

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer, TokenGRPOTrainer, TokenSFTConfig, TokenSFTTrainer
from trl_tokenlevel.data import tokenize_preference_dataset
from trl_tokenlevel.data.builtin import load_tiny_grpo_dataset, load_tiny_sft_dataset
from trl_tokenlevel.ops.preference import cdpo_loss
from trl_tokenlevel.trainers.guards import NonFiniteWeightsGuard

from ..trainers.dpo_utils import base_args
from ..trainers.test_token_grpo_parity import grpo_args
from .support import snapshot


class _NonFiniteLossAt(TrainerCallback):
    """Makes the loss of optimizer step `step` (1-based) NaN, as an overflow would."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step
        compute_loss = trainer.compute_loss

        def poisoned(*args, **kwargs):
            loss = compute_loss(*args, **kwargs)
            if trainer.state.global_step + 1 == step:
                loss = loss * torch.tensor(math.nan)
            return loss

        trainer.compute_loss = poisoned


def _checkpoints(out):
    return sorted(name for name in os.listdir(out) if name.startswith("checkpoint-"))


@pytest.mark.parametrize("trainer_kind", ["dpo", "sft"])
def test_nonfinite_loss_stops_before_a_bad_checkpoint(trainer_kind, tiny_preference_dataset, tiny_model_path,
                                                      tiny_tokenizer, tmp_path):  # fmt: skip
    out = str(tmp_path / "run")
    saving = dict(max_steps=6, save_strategy="steps", save_steps=1, save_total_limit=1, learning_rate=1e-4)
    if trainer_kind == "dpo":
        dataset = tiny_preference_dataset.select(range(12))
        tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer)
        dataset = dataset.add_column("rejected_token_weights", [[1.0] * len(i) for i in tokenized["rejected_ids"]])
        args = TokenDPOConfig(**base_args(out, token_loss_type="cdpo", **saving))
        trainer = TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                                  train_dataset=dataset)  # fmt: skip
    else:
        args = TokenSFTConfig(**base_args(out, token_loss_type="chord_phi", **saving))
        trainer = TokenSFTTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                                  train_dataset=load_tiny_sft_dataset().select(range(12)))  # fmt: skip
    _NonFiniteLossAt(trainer, step=3)
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert "step 3" in message and "checkpoint-2" in message and "Lower the learning rate" in message
    # Rotation kept only the last good checkpoint; the broken step was never saved.
    assert _checkpoints(out) == ["checkpoint-2"]
    weights = load_file(os.path.join(out, "checkpoint-2", "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_guard_defaults(tiny_model_path, tiny_tokenizer, tmp_path):
    """On for token methods, off for stock training (exact TRL behaviour), and settable either way."""
    dataset = load_tiny_grpo_dataset().select(range(4))

    def guards(**overrides):
        trainer = TokenGRPOTrainer(model=tiny_model_path, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                   args=grpo_args(tmp_path, **overrides), processing_class=tiny_tokenizer,
                                   train_dataset=dataset)  # fmt: skip
        return sum(isinstance(cb, NonFiniteWeightsGuard) for cb in trainer.callback_handler.callbacks)

    assert guards(token_selection="entropy_quantile") == 1
    assert guards() == 0
    assert guards(stop_on_nonfinite=True) == 1
    assert guards(token_selection="entropy_quantile", stop_on_nonfinite=False) == 0


def test_otr_names_nonfinite_logits(tiny_model_path, tiny_tokenizer, tmp_path):
    args = TokenSFTConfig(**base_args(tmp_path, max_steps=1, token_loss_type="otr", otr_num_samples=4))
    trainer = TokenSFTTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                              train_dataset=load_tiny_sft_dataset().select(range(4)))  # fmt: skip
    with torch.no_grad():
        trainer.model.get_output_embeddings().weight[5, 0] = math.nan
    before = snapshot(tmp_path)
    with pytest.raises(FloatingPointError, match=r"OTR cannot sample at step 0: .* not finite") as info:
        trainer.train()
    assert "multinomial" not in str(info.value) and "Lower the learning rate" in str(info.value).replace(
        "lower", "Lower"
    )
    assert trainer.state.global_step == 0 and snapshot(tmp_path) == before


# Overrides: each overridden TRL method also works on an object built without our __init__ (token features off).
OVERRIDES = [
    (TokenDPOTrainer, DPOTrainer, "_compute_loss", (None, {}, False)),
    (TokenDPOTrainer, DPOTrainer, "_prepare_dataset", (None, None, None, "train")),
    (TokenDPOTrainer, DPOTrainer, "_precompute_ref_logps", (None, "train", 2)),
    (TokenDPOTrainer, DPOTrainer, "create_optimizer", ()),
    (TokenDPOTrainer, DPOTrainer, "save_model", ("dir",)),
    (TokenGRPOTrainer, GRPOTrainer, "_compute_loss", (None, {})),
    (TokenGRPOTrainer, GRPOTrainer, "_generate_and_score_completions", ({},)),
    (TokenGRPOTrainer, GRPOTrainer, "_calculate_rewards", (None, None, None, None)),
    (TokenGRPOTrainer, GRPOTrainer, "_generate_single_turn", (None, None, None, 2)),
    (TokenGRPOTrainer, GRPOTrainer, "_get_per_token_logps_and_entropies", (None, None, None, 4)),
    (TokenSFTTrainer, SFTTrainer, "compute_loss", (None, {})),
    (TokenSFTTrainer, SFTTrainer, "_prepare_dataset", (None, None, None, False, None, "train")),
    (TokenSFTTrainer, SFTTrainer, "_get_num_items_in_batch", ([{"labels": None}], "cpu")),
    (TokenSFTTrainer, SFTTrainer, "_save_optimizer_and_scheduler", ("dir",)),
]


@pytest.mark.parametrize(
    "cls,parent,method,call_args", OVERRIDES, ids=[f"{c.__name__}.{m}" for c, _, m, _ in OVERRIDES]
)
def test_override_defers_on_an_object_with_only_trl_attributes(cls, parent, method, call_args, monkeypatch):
    calls = []
    monkeypatch.setattr(parent, method, lambda self, *args, **kwargs: calls.append(args) or "parent")
    bare = object.__new__(cls)  # what a subclass that skips our __init__, or a test stand-in, looks like
    result = getattr(cls, method)(bare, *call_args)
    # TRL's method ran once, with the caller's arguments first (defaults of ours may follow).
    assert len(calls) == 1 and calls[0][: len(call_args)] == call_args and result in ("parent", None)


@pytest.mark.parametrize("pending", [False, True])
def test_get_high_entropy_mask_called_like_trl_calls_it(pending):
    """TRL's own test calls `get_high_entropy_mask` on a `Mock(spec=GRPOTrainer)` with a mock accelerator."""
    trainer = Mock(spec=TokenGRPOTrainer)
    trainer.accelerator = Mock(num_processes=1)
    trainer.accelerator.pad_across_processes.side_effect = lambda tensor, dim, pad_index: tensor
    trainer.accelerator.gather.side_effect = lambda tensor: tensor
    entropies = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.8, 0.4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    expected = GRPOTrainer.get_high_entropy_mask(trainer, entropies, mask, 0.5)
    if pending:  # during our `_compute_loss`, the shaping-time selection is returned instead
        trainer._pending_selection = torch.tensor([[True, False, False, True], [False] * 4])
        expected = trainer._pending_selection & mask.bool()
    torch.testing.assert_close(TokenGRPOTrainer.get_high_entropy_mask(trainer, entropies, mask, 0.5), expected)


def test_cdpo_per_token_completion_under_gradient_accumulation():
    """Documented in docs/token_dpo.md: micro-batch token means are averaged, so two micro-batches of 2 differ from one
    batch of 4 when their completion-token counts differ; `sequence` and (at a fixed padded length) `per_token` do not."""
    torch.manual_seed(0)
    batch, length = 4, 6
    chosen, rejected = torch.randn(batch, length), torch.randn(batch, length)
    chosen_w, rejected_w = torch.rand(batch, length), torch.rand(batch, length)
    positions = torch.arange(length)
    chosen_mask = (positions < torch.tensor([6, 2, 5, 1])[:, None]).float()
    rejected_mask = (positions < torch.tensor([3, 6, 1, 2])[:, None]).float()

    def loss(aggregation, rows):
        return cdpo_loss(chosen[rows], rejected[rows], chosen_w[rows], rejected_w[rows], chosen_mask[rows],
                         rejected_mask[rows], 0.1, aggregation).mean()  # fmt: skip

    halves = (slice(0, 2), slice(2, 4))
    for aggregation in ("sequence", "per_token"):
        accumulated = sum(loss(aggregation, rows) for rows in halves) / 2
        torch.testing.assert_close(accumulated, loss(aggregation, slice(None)))
    one_batch = loss("per_token_completion", slice(None)).item()
    accumulated = (sum(loss("per_token_completion", rows) for rows in halves) / 2).item()
    assert one_batch == pytest.approx(0.6954, abs=1e-4) and accumulated == pytest.approx(0.6910, abs=1e-4)
