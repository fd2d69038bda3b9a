"""Token-level losses inside TokenDPOTrainer: neutral signals reproduce DPO, real signals match a full-logits reference,
precomputed per-token reference log-probs match the live reference, PEFT references work."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer
from trl_tokenlevel.data import tokenize_preference_dataset

from .dpo_utils import assert_logs_equal, assert_params_equal, base_args, load

TOKEN_METRIC_PREFIXES = ("token_weights/", "token_rewards/", "treg/")


@pytest.fixture(scope="module")
def tokenized(tiny_preference_dataset, tiny_tokenizer):
    dataset = tiny_preference_dataset.select(range(12))
    return dataset, tokenize_preference_dataset(dataset, tiny_tokenizer)


def _with_columns(dataset, tokenized, fill, columns):
    """Add per-token columns; `fill(side, row, length)` gives the list of values."""
    for column in columns:
        side = column.split("_")[0]
        values = [fill(side, row, len(ids)) for row, ids in enumerate(tokenized[f"{side}_ids"])]
        dataset = dataset.add_column(column, values)
    return dataset


def _random_fill(low, high, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def fill(side, row, length):
        return (low + (high - low) * torch.rand(length, generator=generator)).tolist()

    return fill


NEUTRAL = {
    "weighted": (lambda s, r, n: [1.0] * n, ["chosen_token_weights", "rejected_token_weights"]),
    "cdpo": (lambda s, r, n: [1.0] * n, ["rejected_token_weights"]),
    "tgdpo": (lambda s, r, n: [0.0] * n, ["chosen_token_rewards", "rejected_token_rewards"]),
    "treg": (lambda s, r, n: [0.0] * n, ["chosen_token_rewards", "rejected_token_rewards"]),
}


@pytest.mark.parametrize("token_loss_type", list(NEUTRAL))
def test_neutral_signals_reproduce_stock_dpo(token_loss_type, tiny_model_path, tiny_tokenizer, tokenized, tmp_path):
    dataset, ids = tokenized
    fill, columns = NEUTRAL[token_loss_type]
    stock = DPOTrainer(model=tiny_model_path, args=DPOConfig(**base_args(tmp_path / "a")), train_dataset=dataset,
                       processing_class=tiny_tokenizer)  # fmt: skip
    stock.train()
    args = TokenDPOConfig(**base_args(tmp_path / "b", token_loss_type=token_loss_type))
    ours = TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=_with_columns(dataset, ids, fill, columns),
                           processing_class=tiny_tokenizer)  # fmt: skip
    ours.train()
    assert_logs_equal(stock.state.log_history, ours.state.log_history, ignore_prefixes=TOKEN_METRIC_PREFIXES)
    assert_params_equal(stock.model, ours.model)
    assert any(k.startswith(TOKEN_METRIC_PREFIXES) for entry in ours.state.log_history for k in entry)


def _naive_per_token_logps(model, batch):
    """Full-logits reference: log-softmax over the whole vocabulary, gather the next token (tests only)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return logps * batch["completion_mask"][:, 1:]


def _naive_loss(token_loss_type, policy, ref, batch, beta, args):
    mask = batch["completion_mask"][:, 1:].float()
    logps = _naive_per_token_logps(policy, batch)
    with torch.no_grad():
        ref_logps = _naive_per_token_logps(ref, batch)
    delta = (logps - ref_logps) * mask
    dw, dl = delta.chunk(2)
    mw, ml = mask.chunk(2)
    if token_loss_type in ("weighted", "cdpo"):
        ww, wl = batch["token_weights"][:, 1:].chunk(2)
        if token_loss_type == "cdpo" and args.cdpo_aggregation == "per_token":
            return (-F.logsigmoid(beta * (ww * dw - wl * dl))).mean()
        return (-F.logsigmoid(beta * ((ww * dw).sum(1) - (wl * dl).sum(1)))).mean()
    rw, rl = batch["token_rewards"][:, 1:].chunk(2)
    if token_loss_type == "tgdpo":
        aw, al = 1 + args.tgdpo_alpha * beta * rw, 1 - args.tgdpo_alpha * beta * rl
        return (-F.logsigmoid(beta * ((aw * dw).sum(1) - (al * dl).sum(1)))).mean()
    margin_w, margin_l = beta * dw.sum(1), beta * dl.sum(1)
    dpo = -F.logsigmoid(margin_w - margin_l)
    pair_weight = torch.sigmoid(margin_l - margin_w).detach()
    reg = -(rw * beta * dw).sum(1) - (rl * beta * dl).sum(1)
    return (dpo + args.treg_alpha * pair_weight * reg).mean()


@pytest.mark.parametrize(
    "token_loss_type,extra",
    [("weighted", {}), ("cdpo", {}), ("cdpo", {"cdpo_aggregation": "per_token"}), ("tgdpo", {"tgdpo_alpha": 2.0}),
     ("treg", {})],
)  # fmt: skip
def test_loss_and_gradients_match_full_logits_reference(
    token_loss_type, extra, tiny_model_path, tiny_tokenizer, tokenized, tmp_path
):
    dataset, ids = tokenized
    columns = {
        "weighted": ["chosen_token_weights", "rejected_token_weights"],
        "cdpo": ["chosen_token_weights", "rejected_token_weights"],
        "tgdpo": ["chosen_token_rewards", "rejected_token_rewards"],
        "treg": ["chosen_token_rewards", "rejected_token_rewards"],
    }[token_loss_type]
    low, high = (0.0, 2.0) if "weights" in columns[0] else (-3.0, 3.0)
    dataset = _with_columns(dataset, ids, _random_fill(low, high), columns)
    policy = load(tiny_model_path)
    with torch.no_grad():  # move the policy away from the reference so log-ratios are not zero
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type=token_loss_type, beta=0.5, **extra))
    trainer = TokenDPOTrainer(model=policy, ref_model=load(tiny_model_path), args=args, train_dataset=dataset,
                              processing_class=tiny_tokenizer)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    naive_policy = load(tiny_model_path)
    naive_policy.load_state_dict(policy.state_dict())
    naive_policy.train()
    expected = _naive_loss(token_loss_type, naive_policy, load(tiny_model_path), batch, 0.5, args)
    expected.backward()
    assert abs(loss.item() - math.log(2)) > 1e-4, "log-ratios should not vanish in this test"
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    for name, param in naive_policy.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_precomputed_per_token_reference_matches_live(
    truncation_mode, tiny_model_path, tiny_tokenizer, tokenized, tmp_path
):
    dataset, ids = tokenized
    dataset = _with_columns(dataset, ids, _random_fill(0.0, 2.0), ["chosen_token_weights", "rejected_token_weights"])
    # A short max_length truncates completions, so the cache must line up with the collator's truncation.
    common = dict(token_loss_type="weighted", max_length=20, truncation_mode=truncation_mode)
    live = TokenDPOTrainer(model=tiny_model_path, args=TokenDPOConfig(**base_args(tmp_path / "a", **common)),
                           train_dataset=dataset, processing_class=tiny_tokenizer)  # fmt: skip
    live.train()
    cached_args = TokenDPOConfig(**base_args(tmp_path / "b", precompute_ref_log_probs=True, **common))
    cached = TokenDPOTrainer(model=tiny_model_path, args=cached_args, train_dataset=dataset,
                             processing_class=tiny_tokenizer)  # fmt: skip
    assert "ref_chosen_token_logps" in cached.train_dataset.column_names
    cached.train()
    assert_logs_equal(live.state.log_history, cached.state.log_history, atol=1e-5)
    assert_params_equal(live.model, cached.model, atol=1e-5)


def test_per_token_cache_does_not_reuse_stock_sums_cache(tiny_model_path, tiny_tokenizer, tokenized, tmp_path):
    """The stock precompute caches sums only; the token trainer must not pick that file up (different fingerprint)."""
    dataset, ids = tokenized
    dataset = _with_columns(dataset, ids, _random_fill(0.0, 2.0), ["rejected_token_weights"])
    stock = DPOTrainer(model=tiny_model_path, args=DPOConfig(**base_args(tmp_path / "a", precompute_ref_log_probs=True)),
                       train_dataset=dataset, processing_class=tiny_tokenizer)  # fmt: skip
    assert "ref_chosen_token_logps" not in stock.train_dataset.column_names
    args = TokenDPOConfig(**base_args(tmp_path / "b", precompute_ref_log_probs=True, token_loss_type="cdpo"))
    ours = TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    assert "ref_rejected_token_logps" in ours.train_dataset.column_names
    torch.testing.assert_close(
        torch.tensor(ours.train_dataset["ref_rejected_logps"]), torch.tensor(stock.train_dataset["ref_rejected_logps"]),
        atol=1e-5, rtol=0,
    )  # fmt: skip


def test_peft_reference_is_adapter_disabled_base(tiny_model_path, tiny_tokenizer, tokenized, tmp_path):
    from peft import LoraConfig

    dataset, ids = tokenized
    dataset = _with_columns(dataset, ids, _random_fill(0.0, 2.0), ["chosen_token_weights", "rejected_token_weights"])
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="weighted"))
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=dataset, processing_class=tiny_tokenizer,
                              peft_config=peft_config)  # fmt: skip
    assert trainer.ref_model is None
    before = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    # LoRA B starts at zero, so policy == reference at step 0: every log-ratio is 0 and the loss is exactly log 2.
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora" in n for n in changed)
