"""Drop-in parity: with token features off (or neutral), TokenSFTTrainer reproduces SFTTrainer exactly."""

from __future__ import annotations

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from trl_tokenlevel.data.builtin.sft import load_tiny_sft_dataset
from trl_tokenlevel.data.sft_columns import tokenize_sft_dataset
from trl_tokenlevel.trainers.token_sft_config import TokenSFTConfig
from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer

from .dpo_utils import assert_logs_equal, assert_params_equal, base_args

# Each setting: (dataset format, config overrides). Prompt-completion data trains on the completion only by default.
STOCK_SETTINGS = {
    "default": ("prompt_completion", {}),
    "completion_only_loss": ("prompt_completion", {"completion_only_loss": True}),
    "full_sequence_loss": ("prompt_completion", {"completion_only_loss": False}),
    "language_modeling": ("language_modeling", {}),
    "assistant_only_loss": ("conversational", {"assistant_only_loss": True}),
    "packing": ("prompt_completion", {"packing": True}),
    "packing_wrapped": ("language_modeling", {"packing": True, "packing_strategy": "wrapped", "max_length": 32}),
    # Padding-free flattens the batch into one row and separates the sequences by position ids; it runs on CPU with
    # SDPA and with eager attention.
    "padding_free": ("prompt_completion", {"padding_free": True, "max_length": None}),
    "padding_free_eager": (
        "prompt_completion",
        {"padding_free": True, "max_length": None, "model_init_kwargs": {"attn_implementation": "eager"}},
    ),
    "dft": ("prompt_completion", {"loss_type": "dft"}),
    "grad_accumulation": ("prompt_completion", {"gradient_accumulation_steps": 2}),
}


def sft_args(tmp_path, **overrides) -> dict:
    args = base_args(tmp_path, per_device_train_batch_size=4)
    args.update(overrides)
    return args


def train(trainer_cls, config_cls, model_path, tokenizer, dataset, tmp_path, **overrides):
    args = config_cls(**sft_args(tmp_path, **overrides))
    trainer = trainer_cls(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.mark.parametrize("setting", list(STOCK_SETTINGS))
def test_stock_settings_match_sft_trainer(setting, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset_format, overrides = STOCK_SETTINGS[setting]
    dataset = load_tiny_sft_dataset(dataset_format).select(range(16))
    stock = train(SFTTrainer, SFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "a", **overrides)
    ours = train(TokenSFTTrainer, TokenSFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "b", **overrides)
    assert_logs_equal(stock.state.log_history, ours.state.log_history)
    assert_params_equal(stock.model, ours.model)


def test_plain_sft_config_is_accepted(tiny_model_path, tiny_tokenizer, tmp_path):
    """Swapping only the trainer class (keeping SFTConfig) is stock SFT."""
    dataset = load_tiny_sft_dataset().select(range(16))
    stock = train(SFTTrainer, SFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "a")
    ours = train(TokenSFTTrainer, SFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "b")
    assert_logs_equal(stock.state.log_history, ours.state.log_history)
    assert_params_equal(stock.model, ours.model)


def _loss_and_grads(trainer_cls, config_cls, model_path, tokenizer, dataset, tmp_path, **overrides):
    args = config_cls(**sft_args(tmp_path, **overrides))
    trainer = trainer_cls(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(37))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


def _assert_same(a, b, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], atol=atol, rtol=0, msg=f"gradient of {name}")


def test_gradients_match_on_one_batch(tiny_model_path, tiny_tokenizer, tmp_path):
    dataset = load_tiny_sft_dataset().select(range(8))
    stock = _loss_and_grads(SFTTrainer, SFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "a")
    ours = _loss_and_grads(TokenSFTTrainer, TokenSFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "b")
    _assert_same(stock, ours, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Neutral token settings reproduce stock losses
# ---------------------------------------------------------------------------------------------------------------------


def test_unit_token_weights_equal_stock_nll(tiny_model_path, tiny_tokenizer, tmp_path):
    dataset = load_tiny_sft_dataset().select(range(16))
    tokenized = tokenize_sft_dataset(dataset, tiny_tokenizer)
    weights = [[1.0] * sum(label != -100 for label in labels) for labels in tokenized["labels"]]
    weighted = dataset.add_column("token_weights", weights)
    stock = train(SFTTrainer, SFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "a")
    ours = train(TokenSFTTrainer, TokenSFTConfig, tiny_model_path, tiny_tokenizer, weighted, tmp_path / "b",
                 token_loss_type="weighted")  # fmt: skip
    assert_logs_equal(stock.state.log_history, ours.state.log_history, ignore_prefixes=("token_weights/",))
    assert_params_equal(stock.model, ours.model)
    assert ours.state.log_history[0]["token_weights/mean"] == 1.0


@pytest.mark.parametrize(
    "dft_setting",
    [
        {"token_loss_type": "chord_phi", "chord_weighting": "is"},
        # Expected-form OTR with κ = 1 and β = 0 is −sg(π(y))·log π(y): DFT.
        {"token_loss_type": "otr", "otr_estimator": "expected", "otr_temperature": 1.0, "otr_beta": 0.0},
    ],
    ids=["chord_is", "otr_expected_kappa1_beta0"],
)
def test_our_dft_settings_equal_trl_dft(dft_setting, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset = load_tiny_sft_dataset().select(range(16))
    stock = train(SFTTrainer, SFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "a", loss_type="dft")
    ours = train(TokenSFTTrainer, TokenSFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "b",
                 **dft_setting)  # fmt: skip
    assert_logs_equal(stock.state.log_history, ours.state.log_history, ignore_prefixes=("token_weights/", "otr/"))
    assert_params_equal(stock.model, ours.model)
    # The same on one batch, gradients included.
    stock_grads = _loss_and_grads(SFTTrainer, SFTConfig, tiny_model_path, tiny_tokenizer, dataset, tmp_path / "c",
                                  loss_type="dft")  # fmt: skip
    our_grads = _loss_and_grads(TokenSFTTrainer, TokenSFTConfig, tiny_model_path, tiny_tokenizer, dataset,
                                tmp_path / "d", **dft_setting)  # fmt: skip
    _assert_same(stock_grads, our_grads)


@pytest.fixture(autouse=True, scope="module")
def _frozen_gc():
    # `Trainer.train()` ends with `gc.collect()`, whose cost grows with every object the test session has created;
    # freezing the objects that exist now keeps each training run's collection small.
    import gc

    gc.freeze()
    yield
    gc.unfreeze()
