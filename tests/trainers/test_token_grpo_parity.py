"""Drop-in parity: with token options off (or neutral), TokenGRPOTrainer reproduces GRPOTrainer exactly.

Generation samples with the trainer's seed (`set_seed(seed, device_specific=True)` in both trainers) and our code draws
no random numbers, so both trainers see the same rollouts; losses, every logged metric and the final parameters must
agree to 1e-6. Shared helpers of the GRPO tests live here (other GRPO test files import them).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset
from trl_tokenlevel.trainers.token_grpo_config import TokenGRPOConfig
from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer

# Logged values that depend on wall time, not on the math.
TIMING_KEYS = ("runtime", "per_second", "total_flos", "step_time")


def id_reward(completion_ids, **kwargs) -> list[float]:
    """A cheap reward that varies between completions of a random tiny model (token ids only)."""
    return [(sum(ids) % 10) / 10 for ids in completion_ids]


def grpo_args(tmp_path, config_cls=TokenGRPOConfig, **overrides):
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=7,
    )
    args.update(overrides)
    return config_cls(**args)


def train(trainer_cls, args, model_path, tokenizer, reward=id_reward, **trainer_kwargs):
    trainer = trainer_cls(
        model=model_path,
        reward_funcs=reward,
        args=args,
        train_dataset=load_tiny_grpo_dataset().select(range(16)),
        processing_class=tokenizer,
        **trainer_kwargs,
    )
    trainer.train()
    return trainer


def numeric_logs(log_history, ignore_prefixes=()) -> list[dict]:
    return [
        {
            k: v
            for k, v in entry.items()
            if isinstance(v, (int, float))
            and not any(t in k for t in TIMING_KEYS)
            and not k.startswith(ignore_prefixes)
        }
        for entry in log_history
    ]


def assert_logs_equal(expected, actual, atol=1e-6, ignore_prefixes=(), only=None) -> None:
    expected = numeric_logs(expected, ignore_prefixes)
    actual = numeric_logs(actual, ignore_prefixes)
    assert len(expected) == len(actual)
    for step, (a, b) in enumerate(zip(expected, actual)):
        keys = set(a) if only is None else {k for k in a if k in only}
        if only is None:
            assert set(a) == set(b), f"step {step}: metric names differ: {set(a) ^ set(b)}"
        for key in keys:
            assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=atol), f"step {step} {key}: {a[key]} vs {b[key]}"


def assert_params_equal(model_a, model_b, atol=1e-6) -> None:
    params_b = dict(model_b.named_parameters())
    for name, param in model_a.named_parameters():
        torch.testing.assert_close(param, params_b[name], atol=atol, rtol=0, msg=f"parameter {name} differs")


def assert_params_changed(trainer, model_path) -> None:
    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).named_parameters())
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param.detach().cpu(), initial[name].detach()), f"parameter {name} did not change"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return PreTrainedTokenizerFast.from_pretrained(tiny_model_path)


@pytest.mark.parametrize(
    "setting",
    [
        {},  # defaults: loss_type="dapo", beta=0
        {"loss_type": "grpo", "beta": 0.05},
        {"loss_type": "bnpo", "beta": 0.05, "num_iterations": 2},
    ],
    ids=["dapo", "grpo_beta", "bnpo_beta_iterations"],
)
def test_no_token_option_matches_grpo_trainer(setting, tiny_model_path, tokenizer, tmp_path):
    stock = train(GRPOTrainer, grpo_args(tmp_path / "a", GRPOConfig, **setting), tiny_model_path, tokenizer)
    ours = train(TokenGRPOTrainer, grpo_args(tmp_path / "b", **setting), tiny_model_path, tokenizer)
    assert_logs_equal(stock.state.log_history, ours.state.log_history)
    assert_params_equal(stock.model, ours.model)
    assert ours.state.log_history[-1]["train_loss"] is not None


def test_plain_grpo_config_is_accepted(tiny_model_path, tokenizer, tmp_path):
    """Swapping only the trainer class (keeping GRPOConfig) is stock GRPO."""
    stock = train(GRPOTrainer, grpo_args(tmp_path / "a", GRPOConfig), tiny_model_path, tokenizer)
    ours = train(TokenGRPOTrainer, grpo_args(tmp_path / "b", GRPOConfig), tiny_model_path, tokenizer)
    assert_logs_equal(stock.state.log_history, ours.state.log_history)
    assert_params_equal(stock.model, ours.model)


def test_neutral_selection_runs_the_token_path_with_stock_math(tiny_model_path, tokenizer, tmp_path):
    """ρ = 1 selects every token: the whole token path (our cached training forward, the selection through TRL's
    entropy-mask branch, (B, T) advantages) runs and must leave TRL's loss, metrics and updates unchanged."""
    stock = train(GRPOTrainer, grpo_args(tmp_path / "a", GRPOConfig, beta=0.05), tiny_model_path, tokenizer)
    ours = train(TokenGRPOTrainer, grpo_args(tmp_path / "b", beta=0.05, token_selection="entropy_quantile",
                                             entropy_top_ratio=1.0), tiny_model_path, tokenizer)  # fmt: skip
    assert_logs_equal(stock.state.log_history, ours.state.log_history, ignore_prefixes=("token/",))
    assert all(
        entry["token/selected_frac"] == 1.0 for entry in ours.state.log_history if "token/selected_frac" in entry
    )
    assert_params_equal(stock.model, ours.model)


@pytest.mark.parametrize(
    "setting",
    [
        {},  # the paper's recipe: dapo, no KL
        {"beta": 0.05},  # KL on every valid token, the policy term on the selected ones
        {"loss_type": "grpo", "beta": 0.05, "entropy_coef": 0.01},  # per-completion normaliser; entropy bonus on F
        {"loss_type": "bnpo", "beta": 0.05, "num_iterations": 2},
    ],
    ids=["dapo", "dapo_beta", "grpo_beta_entropy_bonus", "bnpo_beta_iterations"],
)
def test_entropy_quantile_equals_trl_top_entropy_quantile(setting, tiny_model_path, tokenizer, tmp_path):
    """The default 80/20 rule (quantile threshold, ties kept, all-valid-token normaliser) is TRL's
    `top_entropy_quantile=0.2`, also with a KL term: the selection masks only the policy-gradient term, the KL stays on
    every valid token. Same losses, every TRL metric (entropy, KL and clip ratios over all valid tokens) and the same
    updates."""
    stock = train(GRPOTrainer, grpo_args(tmp_path / "a", GRPOConfig, top_entropy_quantile=0.2, **setting),
                  tiny_model_path, tokenizer)  # fmt: skip
    ours = train(TokenGRPOTrainer, grpo_args(tmp_path / "b", token_selection="entropy_quantile", **setting),
                 tiny_model_path, tokenizer)  # fmt: skip
    assert_logs_equal(stock.state.log_history, ours.state.log_history, ignore_prefixes=("token/",))
    assert_params_equal(stock.model, ours.model)
    selected = [entry["token/selected_frac"] for entry in ours.state.log_history if "token/selected_frac" in entry]
    assert selected and all(0.0 < frac < 1.0 for frac in selected)
    if setting.get("beta"):
        assert any(entry.get("kl", 0.0) > 0.0 for entry in stock.state.log_history)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_selected_normalization_divides_the_policy_term_only(loss_type, tiny_model_path, tokenizer, tmp_path):
    """One micro-batch, KL > 0: `entropy_normalize="selected"` divides the policy term by the S selected tokens instead
    of the N valid ones (`L_sel(β=0) = L_all(β=0)·N/S`), while the KL term is the same all-token mean in both
    (`L_sel(β) − L_sel(0) = L_all(β) − L_all(0) ≠ 0`)."""
    args = grpo_args(tmp_path, loss_type=loss_type, beta=0.05, token_selection="entropy_quantile")
    trainer = TokenGRPOTrainer(model=tiny_model_path, reward_funcs=id_reward, args=args, processing_class=tokenizer,
                               train_dataset=load_tiny_grpo_dataset().select(range(16)))  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():  # move the policy away from the reference, so that the KL term is not 0
        trainer.model.lm_head.weight.add_(0.05 * torch.randn_like(trainer.model.lm_head.weight))
    losses = {}
    for normalize in ("all", "selected"):
        trainer.args.entropy_normalize = normalize
        for beta in (0.0, 0.05):
            trainer.beta = beta
            with torch.no_grad():
                losses[normalize, beta] = trainer.compute_loss(trainer.model, inputs).item()
    fraction = trainer._metrics["train"]["token/selected_frac"][-1]  # S / N over this batch (one process)
    assert 0.0 < fraction < 1.0
    kl_term = losses["all", 0.05] - losses["all", 0.0]
    assert abs(kl_term) > 1e-6
    assert losses["selected", 0.05] - losses["selected", 0.0] == pytest.approx(kl_term, abs=1e-6)
    assert losses["selected", 0.0] == pytest.approx(losses["all", 0.0] / fraction, abs=1e-6)


def test_gradients_match_on_one_batch(tiny_model_path, tokenizer, tmp_path):
    """One micro-batch through `compute_loss` + backward: identical loss and parameter gradients."""
    grads = []
    for trainer_cls, config_cls in ((GRPOTrainer, GRPOConfig), (TokenGRPOTrainer, TokenGRPOConfig)):
        args = grpo_args(tmp_path / trainer_cls.__name__, config_cls, beta=0.05)
        trainer = trainer_cls(model=tiny_model_path, reward_funcs=id_reward, args=args,
                              train_dataset=load_tiny_grpo_dataset().select(range(16)), processing_class=tokenizer)  # fmt: skip
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
        torch.manual_seed(0)
        batch = next(iter(trainer.get_train_dataloader()))
        inputs = trainer._prepare_inputs(batch)
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-7, rtol=0)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grad, grads[1][1][name], atol=1e-7, rtol=0, msg=f"gradient of {name} differs")
