"""Drop-in parity: with token features off (or neutral), TokenDPOTrainer reproduces DPOTrainer exactly."""

from __future__ import annotations

import pytest
import torch
from trl import DPOConfig, DPOTrainer

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer

from .dpo_utils import assert_logs_equal, assert_params_equal, base_args

STOCK_LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_dataset(tiny_preference_dataset):
    return tiny_preference_dataset.select(range(12))


def _train(trainer_cls, config_cls, model_path, tokenizer, dataset, tmp_path, **kwargs):
    trainer_kwargs = {key: kwargs.pop(key) for key in ("ref_model", "peft_config") if key in kwargs}
    model = kwargs.pop("model", model_path)
    args = config_cls(**base_args(tmp_path, **kwargs))
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **trainer_kwargs)
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type", STOCK_LOSS_TYPES)
def test_stock_loss_types_match_dpo_trainer(loss_type, tiny_model_path, tiny_tokenizer, small_dataset, tmp_path):
    extra = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
    stock = _train(DPOTrainer, DPOConfig, tiny_model_path, tiny_tokenizer, small_dataset, tmp_path / "a",
                   loss_type=loss_type, **extra)  # fmt: skip
    ours = _train(TokenDPOTrainer, TokenDPOConfig, tiny_model_path, tiny_tokenizer, small_dataset, tmp_path / "b",
                  loss_type=loss_type, **extra)  # fmt: skip
    assert_logs_equal(stock.state.log_history, ours.state.log_history)
    assert_params_equal(stock.model, ours.model)


@pytest.mark.parametrize(
    "setting",
    ["precompute_ref_log_probs", "explicit_ref_model", "peft_lora", "multi_loss"],
)
def test_reference_settings_match_dpo_trainer(setting, tiny_model_path, tiny_tokenizer, small_dataset, tmp_path):
    from .dpo_utils import load

    def kwargs():
        if setting == "precompute_ref_log_probs":
            return {"precompute_ref_log_probs": True}
        if setting == "explicit_ref_model":
            return {"ref_model": load(tiny_model_path)}
        if setting == "multi_loss":
            return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
        from peft import LoraConfig

        return {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)}

    stock = _train(DPOTrainer, DPOConfig, tiny_model_path, tiny_tokenizer, small_dataset, tmp_path / "a", **kwargs())
    ours = _train(TokenDPOTrainer, TokenDPOConfig, tiny_model_path, tiny_tokenizer, small_dataset, tmp_path / "b",
                  **kwargs())  # fmt: skip
    assert_logs_equal(stock.state.log_history, ours.state.log_history)
    assert_params_equal(stock.model, ours.model)


def test_plain_dpo_config_is_accepted(tiny_model_path, tiny_tokenizer, small_dataset, tmp_path):
    """Swapping only the trainer class (keeping DPOConfig) is stock DPO."""
    stock = _train(DPOTrainer, DPOConfig, tiny_model_path, tiny_tokenizer, small_dataset, tmp_path / "a")
    ours = _train(TokenDPOTrainer, DPOConfig, tiny_model_path, tiny_tokenizer, small_dataset, tmp_path / "b")
    assert_logs_equal(stock.state.log_history, ours.state.log_history)
    assert_params_equal(stock.model, ours.model)


def test_gradients_match_on_one_batch(tiny_model_path, tiny_tokenizer, small_dataset, tmp_path):
    grads = []
    for trainer_cls, config_cls in ((DPOTrainer, DPOConfig), (TokenDPOTrainer, TokenDPOConfig)):
        args = config_cls(**base_args(tmp_path / trainer_cls.__name__))
        trainer = trainer_cls(model=tiny_model_path, args=args, train_dataset=small_dataset,
                              processing_class=tiny_tokenizer)  # fmt: skip
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], atol=1e-6, rtol=0, msg=f"gradient of {name}")
