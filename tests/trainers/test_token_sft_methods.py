"""Token-level SFT methods in the trainer: end-to-end training, full-logits references, selection, validation.

The worked examples of the spec (OTR, ssToken, CHORD) and the Gumbel sampler's exactness live in
`tests/ops/test_sft_ops.py`; here the trainer's use of those ops is checked against naive full-logits computations.
"""

from __future__ import annotations

import math

import pytest
import torch

from trl_tokenlevel.data.builtin.sft import load_tiny_sft_dataset
from trl_tokenlevel.data.sft_columns import tokenize_sft_dataset
from trl_tokenlevel.ops.sft import gathered_logits, otr_pg_loss, otr_rewards, sample_tokens_tiled
from trl_tokenlevel.trainers.token_sft_config import TokenSFTConfig
from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer

from .dpo_utils import base_args

EAGER = {"model_init_kwargs": {"attn_implementation": "eager"}}


@pytest.fixture(autouse=True, scope="module")
def _frozen_gc():
    # `Trainer.train()` ends with `gc.collect()`, whose cost grows with every object the session has created.
    import gc

    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def dataset():
    return load_tiny_sft_dataset().select(range(16))


def make_trainer(model_path, tokenizer, dataset, tmp_path, **overrides):
    args = TokenSFTConfig(**{**base_args(tmp_path, per_device_train_batch_size=4), **overrides})
    return TokenSFTTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer)


def with_weights(dataset, tokenizer, **tokenize_kwargs):
    tokenized = tokenize_sft_dataset(dataset, tokenizer, **tokenize_kwargs)
    weights = [
        [0.5 + (i % 4) / 2 for i in range(sum(label != -100 for label in labels))] for labels in tokenized["labels"]
    ]
    return dataset.add_column("token_weights", weights)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: every method trains, the loss is finite, every parameter moves, the method's metrics are logged
# ---------------------------------------------------------------------------------------------------------------------

METHODS = {
    "otr": ({"token_loss_type": "otr"}, ["otr/mean_reward", "otr/gold_sampled", "otr/loss", "otr/nll"]),
    "otr_expected": ({"token_loss_type": "otr", "otr_estimator": "expected"}, ["otr/loss", "otr/nll"]),
    "otr_gumbel": ({"token_loss_type": "otr", "otr_sampler": "gumbel", "otr_num_samples": 8}, ["otr/mean_reward"]),
    "otr_options": (
        {
            "token_loss_type": "otr",
            "otr_baseline": "mean",
            "otr_include_gold": True,
            "otr_nll_coef": 0.5,
            "otr_logprob_temperature": 0.8,
            "otr_num_samples": 16,
        },
        ["otr/mean_reward"],
    ),  # fmt: skip
    "otr_packing": ({"token_loss_type": "otr", "packing": True, "otr_num_samples": 16}, ["otr/mean_reward"]),
    "otr_padding_free": (
        {"token_loss_type": "otr", "padding_free": True, "max_length": None, "otr_num_samples": 16},
        ["otr/mean_reward"],
    ),
    "chord_phi": ({"token_loss_type": "chord_phi"}, ["token_weights/mean", "token_weights/max"]),
    "weighted": ({"token_loss_type": "weighted"}, ["token_weights/mean", "token_weights/min"]),
    "weighted_packing": ({"token_loss_type": "weighted", "packing": True}, ["token_weights/mean"]),
    "weighted_padding_free": (
        {"token_loss_type": "weighted", "padding_free": True, "max_length": None},
        ["token_weights/mean"],
    ),
    "sstoken": ({"token_selection": "sstoken", "sstoken_history_decay": 0.9, **EAGER}, ["sstoken/selected_fraction"]),
    "sstoken_rel_only_sdpa": ({"token_selection": "sstoken", "sstoken_gamma": 0.0}, ["sstoken/selected_fraction"]),
    "sstoken_with_otr": (
        {"token_selection": "sstoken", "token_loss_type": "otr", "otr_num_samples": 16, **EAGER},
        ["sstoken/selected_fraction", "otr/mean_reward"],
    ),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains(method, tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    overrides, metric_keys = METHODS[method]
    if overrides.get("token_loss_type") == "weighted":
        dataset = with_weights(dataset, tiny_tokenizer)
    trainer = make_trainer(tiny_model_path, tiny_tokenizer, dataset, tmp_path, **overrides)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param, before[name]), f"parameter {name} did not change"
    logged = trainer.state.log_history[0]
    for key in [*metric_keys, "entropy", "mean_token_accuracy", "num_tokens"]:
        assert key in logged and math.isfinite(logged[key]), f"{key} missing from {sorted(logged)}"


# ---------------------------------------------------------------------------------------------------------------------
# OTR inside the trainer equals a naive full-logits computation
# ---------------------------------------------------------------------------------------------------------------------


def _batch_and_grads(trainer, loss_fn):
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = loss_fn(batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


def _full_log_probs(model, batch, temperature):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    valid = batch["labels"][:, 1:] != -100
    return torch.log_softmax(logits / temperature, dim=-1)[valid], logits[valid], batch["labels"][:, 1:][valid]


@pytest.mark.parametrize(
    "options",
    [{}, {"otr_logprob_temperature": 0.7, "otr_baseline": "mean"}, {"otr_beta": -0.5, "otr_num_samples": 3}],
    ids=["default", "tau0.7_mean_baseline", "beta-0.5_k3"],
)
def test_otr_mc_matches_full_logits_reference(options, tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_tokenizer, dataset, tmp_path, token_loss_type="otr", **options)
    args = trainer.args
    trainer.otr_generator = torch.Generator().manual_seed(0)
    recorded = {}
    sample = trainer._otr_sample

    def recording_sample(rows, head, gold):
        samples, raw_values = sample(rows, head, gold)
        recorded["samples"] = samples
        return samples, raw_values

    trainer._otr_sample = recording_sample
    ours = _batch_and_grads(trainer, lambda batch: trainer.compute_loss(trainer.model, batch))

    def reference(batch):
        log_probs, _, gold = _full_log_probs(trainer.model, batch, args.otr_logprob_temperature)
        samples = recorded["samples"]
        rewards = otr_rewards(samples, gold, beta=args.otr_beta, dtype=torch.float32)
        per_position = otr_pg_loss(log_probs.gather(1, samples), rewards, baseline=args.otr_baseline)
        return per_position.sum() / gold.numel()

    expected = _batch_and_grads(trainer, reference)
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=0)
    for name, grad in expected[1].items():
        torch.testing.assert_close(ours[1][name], grad, atol=1e-5, rtol=0, msg=f"gradient of {name}")


def test_otr_expected_matches_full_logits_reference(tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_tokenizer, dataset, tmp_path, token_loss_type="otr",
                           otr_estimator="expected", otr_beta=-0.3, otr_logprob_temperature=0.9)  # fmt: skip
    args = trainer.args
    num_items = torch.tensor(101)
    ours = _batch_and_grads(
        trainer, lambda batch: trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    )

    def reference(batch):
        log_probs, logits, gold = _full_log_probs(trainer.model, batch, args.otr_logprob_temperature)
        explore = torch.softmax(logits.detach() / args.otr_temperature, dim=-1)
        beta = args.otr_beta
        gold_term = (1 - beta) * explore.gather(1, gold[:, None]) * log_probs.gather(1, gold[:, None])
        per_position = -(gold_term.squeeze(1) + beta * (explore * log_probs).sum(-1))
        return per_position.sum() / num_items

    expected = _batch_and_grads(trainer, reference)
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=0)
    for name, grad in expected[1].items():
        torch.testing.assert_close(ours[1][name], grad, atol=1e-5, rtol=0, msg=f"gradient of {name}")


# ---------------------------------------------------------------------------------------------------------------------
# OTR tile helpers: exact multinomial sampling and gathered logits
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.5, "softcap": 3.0}], ids=["plain", "scale_softcap"])
def test_tiled_sampler_is_exact(transform):
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 8, generator=generator), torch.randn(20, 8, generator=generator)
    bias = torch.randn(20, generator=generator)
    num_samples, temperature = 20000, 1.3
    # A tile budget of 40 logits forces two rows per tile, so tiling and the per-slice head cast are exercised.
    samples = sample_tokens_tiled(hidden, weight, bias, num_samples, temperature, generator=generator,
                                  tile_elements=40, **transform)  # fmt: skip
    z = (hidden @ weight.T + bias) * transform.get("logit_scale", 1.0)
    if "softcap" in transform:
        z = transform["softcap"] * torch.tanh(z / transform["softcap"])
    probs = torch.softmax(z / temperature, dim=-1)
    freqs = torch.stack([torch.bincount(row, minlength=20) for row in samples]).float() / num_samples
    # Binomial standard error is at most 0.0036 here; 5 sigma.
    assert (freqs - probs).abs().max() < 0.018


def test_gathered_logits_match_autograd():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=generator, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, 11, (5, 7), generator=generator)
    coef = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    ours = gathered_logits(hidden, weight, bias, indices, logit_scale=0.7, softcap=2.0)
    full = 2.0 * torch.tanh((hidden @ weight.T + bias) * 0.7 / 2.0)
    expected = full.gather(1, indices)
    torch.testing.assert_close(ours, expected)
    grads = torch.autograd.grad((ours * coef).sum(), (hidden, weight, bias))
    expected_grads = torch.autograd.grad((expected * coef).sum(), (hidden, weight, bias))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------------
# ssToken: selection, normalisation, attention constraint, history model and resume
# ---------------------------------------------------------------------------------------------------------------------


def test_sstoken_loss_is_mean_nll_over_kept_tokens(tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_tokenizer, dataset, tmp_path, token_selection="sstoken",
                           sstoken_ratio=0.5, **EAGER)  # fmt: skip
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    captured = {}
    keep_fn = trainer._sstoken_keep

    def recording_keep(*args):
        captured["keep"] = keep_fn(*args)
        return captured["keep"]

    trainer._sstoken_keep = recording_keep
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    keep = captured["keep"]
    valid = batch["labels"][:, 1:] != -100
    # Kept tokens are a subset of the loss tokens, ceil(ρ·N) per row, and their count is what TRL's normaliser sees.
    assert not (keep & ~valid).any()
    assert keep.sum(-1).tolist() == [math.ceil(0.5 * n) for n in valid.sum(-1).tolist()]
    assert trainer._get_num_items_in_batch([batch], "cpu") == keep.sum()
    with torch.no_grad():
        log_probs = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"],
                                  fused_lm_head=True).log_probs  # fmt: skip
    torch.testing.assert_close(loss, -(log_probs * keep).sum() / keep.sum())


def test_sstoken_needs_eager_attention_and_names_the_fix(tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    with pytest.raises(ValueError) as error:
        make_trainer(tiny_model_path, tiny_tokenizer, dataset, tmp_path, token_selection="sstoken")
    message = str(error.value)
    assert "attn_implementation='sdpa (the default)'" in message
    assert "model_init_kwargs={'attn_implementation': 'eager'}" in message and "sstoken_gamma=0.0" in message
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        make_trainer(model, tiny_tokenizer, dataset, tmp_path, token_selection="sstoken")


def test_history_model_is_an_ema_of_the_policy(tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_tokenizer, dataset, tmp_path, token_selection="sstoken",
                           sstoken_history_decay=0.9, sstoken_gamma=0.0, max_steps=1)  # fmt: skip
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    history = dict(trainer.history_model.named_parameters())
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(history[name], 0.9 * initial[name] + 0.1 * param.detach())
        assert not history[name].requires_grad


def test_sstoken_resume_is_exact(tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    def trainer():
        return make_trainer(
            tiny_model_path, tiny_tokenizer, dataset, tmp_path / "run", token_selection="sstoken",
            sstoken_history_decay=0.8, max_steps=4, save_strategy="steps", save_steps=2, **EAGER,
        )  # fmt: skip

    straight = trainer()
    straight.train()
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for a, b in ((straight.model, resumed.model), (straight.history_model, resumed.history_model)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, atol=0, rtol=0, msg=f"{name} differs after resume")

    def step_logs(history):
        # `num_tokens` is a running count that TRL's SFTTrainer does not checkpoint (stock behaviour).
        return [{k: v for k, v in e.items() if k != "num_tokens"} for e in history if "loss" in e and e["step"] > 2]

    assert step_logs(straight.state.log_history) == step_logs(resumed.state.log_history)

    (tmp_path / "run" / "checkpoint-2" / "sstoken_history.safetensors").unlink()
    with pytest.raises(ValueError, match="has no ssToken history model"):
        trainer().train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


# ---------------------------------------------------------------------------------------------------------------------
# Per-token weights: alignment through truncation and packing, validation messages
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting", [{"max_length": 20}, {"packing": True, "max_length": 48}], ids=["truncation", "packing"]
)
def test_token_weights_follow_their_tokens(setting, tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    tokenized = tokenize_sft_dataset(dataset, tiny_tokenizer)
    # Weight = the token id, so alignment can be read back from the ids themselves.
    weights = [[float(i) for i, label in zip(ids, labels) if label != -100]
               for ids, labels in zip(tokenized["input_ids"], tokenized["labels"])]  # fmt: skip
    trainer = make_trainer(tiny_model_path, tiny_tokenizer, dataset.add_column("token_weights", weights), tmp_path,
                           token_loss_type="weighted", **setting)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss_positions = batch["labels"] != -100
    torch.testing.assert_close(batch["token_weights"][loss_positions], batch["input_ids"][loss_positions].float())
    assert (batch["token_weights"][~loss_positions] == 0).all()


def test_token_weights_validation_names_column_row_lengths_and_fix(tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    tokenized = tokenize_sft_dataset(dataset, tiny_tokenizer)
    counts = [sum(label != -100 for label in labels) for labels in tokenized["labels"]]
    weights = [[1.0] * n for n in counts]
    weights[3] = weights[3][:-2]
    with pytest.raises(ValueError) as error:
        make_trainer(tiny_model_path, tiny_tokenizer, dataset.add_column("token_weights", weights), tmp_path,
                     token_loss_type="weighted")  # fmt: skip
    message = str(error.value)
    assert "'token_weights', row 3" in message and f"has {counts[3] - 2} values" in message
    assert f"{counts[3]} loss tokens" in message and "tokenize_sft_dataset" in message

    weights[3] = [1.0] * (counts[3] - 1) + [float("nan")]
    with pytest.raises(ValueError, match="row 3, loss token .* is not finite"):
        make_trainer(tiny_model_path, tiny_tokenizer, dataset.add_column("token_weights", weights), tmp_path,
                     token_loss_type="weighted")  # fmt: skip
    with pytest.raises(ValueError, match="needs a 'token_weights' column"):
        make_trainer(tiny_model_path, tiny_tokenizer, dataset, tmp_path, token_loss_type="weighted")


def test_assistant_only_token_weights(tiny_model_path, tiny_tokenizer, tmp_path):
    """Conversational data: one weight per assistant token, end-of-turn included."""
    dataset = load_tiny_sft_dataset("conversational").select(range(8))
    weighted = with_weights(dataset, tiny_tokenizer, assistant_only_loss=True)
    trainer = make_trainer(tiny_model_path, tiny_tokenizer, weighted, tmp_path, token_loss_type="weighted",
                           assistant_only_loss=True)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert ((batch["token_weights"] != 0) == (batch["labels"] != -100)).all()
    trainer.train()


# ---------------------------------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"token_loss_type": "nope"}, "not a token-level SFT loss"),
        ({"token_selection": "rho1"}, "not a token selection"),
        ({"token_loss_type": "otr", "loss_type": "dft"}, "chord_weighting='is'"),
        ({"token_loss_type": "otr", "label_smoothing_factor": 0.1}, "label_smoothing_factor"),
        ({"token_loss_type": "otr", "otr_beta": 1.0}, "otr_beta=1.0 is out of range"),
        ({"token_loss_type": "otr", "otr_num_samples": 0}, "otr_num_samples"),
        ({"token_loss_type": "otr", "otr_estimator": "expected", "otr_include_gold": True}, "has no samples"),
        ({"token_selection": "sstoken", "packing": True}, "packing=False"),
        ({"token_selection": "sstoken", "sstoken_ratio": 0.0}, "sstoken_ratio"),
        ({"token_loss_type": "chord_phi", "chord_cutoff_prob": 0.0}, "chord_cutoff_prob"),
    ],
)
def test_config_rejects_contradictions(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        TokenSFTConfig(**{**base_args(tmp_path), **overrides})


def test_compute_loss_func_is_refused(tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    args = TokenSFTConfig(**base_args(tmp_path, token_loss_type="chord_phi"))
    with pytest.raises(ValueError, match="compute_loss_func"):
        TokenSFTTrainer(model=tiny_model_path, args=args, train_dataset=dataset, processing_class=tiny_tokenizer,
                        compute_loss_func=lambda *a, **k: 0)  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        {"token_loss_type": "chord_phi"},
        {"token_loss_type": "weighted"},
        {"token_loss_type": "otr", "otr_estimator": "expected"},
        {"token_selection": "sstoken", "sstoken_history_decay": 0.9, **EAGER},
    ],
    ids=["chord_phi", "weighted", "otr_expected", "sstoken"],
)
def test_gradient_accumulation_matches_one_large_batch(overrides, tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    """The loss is normalised by the token count of the whole optimizer step, as TRL's (GA=2 x 2 rows == 1 x 4)."""
    if overrides.get("token_loss_type") == "weighted":
        dataset = with_weights(dataset, tiny_tokenizer)
    runs = []
    for batch_size, steps in ((4, 1), (2, 2)):
        trainer = make_trainer(
            tiny_model_path, tiny_tokenizer, dataset, tmp_path / str(steps), max_steps=2,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=steps, **overrides,
        )  # fmt: skip
        trainer.train()
        runs.append(trainer)
    for (name, a), b in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"parameter {name}")
    assert math.isclose(runs[0].state.log_history[1]["loss"], runs[1].state.log_history[1]["loss"], abs_tol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"token_loss_type": "otr", "otr_num_samples": 16},
        {"token_selection": "sstoken", "sstoken_history_decay": 0.9, **EAGER},
    ],
    ids=["otr", "sstoken"],
)
def test_lora(overrides, tiny_model_path, tiny_tokenizer, dataset, tmp_path):
    from peft import LoraConfig

    args = TokenSFTConfig(**{**base_args(tmp_path, per_device_train_batch_size=4), **overrides})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = TokenSFTTrainer(model=tiny_model_path, args=args, train_dataset=dataset, processing_class=tiny_tokenizer,
                              peft_config=lora)  # fmt: skip
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]) != ("lora_" in name), f"{name}: only adapters should train"
    if trainer.history_model is not None:
        history = dict(trainer.history_model.named_parameters())
        moved = [n for n, p in history.items() if not torch.equal(p, before[n])]
        assert moved and all("lora_" in n for n in moved)
