"""Signal builders against a plain full-logits reference on tiny models."""

from __future__ import annotations

import pytest
import torch
from trl import DPOConfig

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer
from trl_tokenlevel.data import tokenize_preference_dataset
from trl_tokenlevel.signals import (
    add_contrastive_prompt_rewards,
    add_critical_token_weights,
    add_dpo_token_rewards,
    token_implicit_rewards,
)
from trl_tokenlevel.tiny import build_tiny_model

from ..trainers.dpo_utils import assert_logs_equal, assert_params_equal, base_args


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, seed=1).eval(), build_tiny_model(tiny_tokenizer, seed=2).eval()


@pytest.fixture(scope="module")
def rows(tiny_preference_dataset):
    return tiny_preference_dataset.select(range(5))


def _full_logits(model, prompt_ids, completion_ids):
    """[len(completion), V] logits predicting each completion token (full logits: tests only)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    return logits[len(prompt_ids) - 1 : -1]


def _gather(logits, completion_ids):
    return logits.log_softmax(-1)[torch.arange(len(completion_ids)), completion_ids]


def test_dpo_token_rewards_match_full_logits(models, rows, tiny_tokenizer):
    dpo, ref = models
    out = add_dpo_token_rewards(rows, dpo, ref, tiny_tokenizer, scale=0.5, batch_size=2)
    tokenized = tokenize_preference_dataset(rows, tiny_tokenizer)
    for i in range(len(rows)):
        for side in ("chosen", "rejected"):
            prompt, completion = tokenized[i]["prompt_ids"], tokenized[i][f"{side}_ids"]
            expected = 0.5 * (_gather(_full_logits(dpo, prompt, completion), completion)
                              - _gather(_full_logits(ref, prompt, completion), completion))  # fmt: skip
            torch.testing.assert_close(torch.tensor(out[i][f"{side}_token_rewards"], dtype=torch.float64), expected,
                                       atol=1e-5, rtol=0)  # fmt: skip


def test_dpo_token_rewards_clip(models, rows, tiny_tokenizer):
    out = add_dpo_token_rewards(rows, *models, tiny_tokenizer, scale=10.0, clip=0.05)
    values = torch.tensor([v for row in out["chosen_token_rewards"] for v in row])
    assert values.abs().max() <= 0.05 + 1e-7 and (values.abs() == 0.05).any()


@pytest.mark.parametrize("only_neg", [True, False])
def test_critical_token_weights_match_full_logits(only_neg, models, rows, tiny_tokenizer):
    positive, negative = models
    out = add_critical_token_weights(rows, positive, negative, tiny_tokenizer, gamma=1.0, only_neg=only_neg)
    assert ("chosen_token_weights" in out.column_names) == (not only_neg)
    tokenized = tokenize_preference_dataset(rows, tiny_tokenizer)
    for i in range(len(rows)):
        for side in ("rejected",) if only_neg else ("chosen", "rejected"):
            prompt, completion = tokenized[i]["prompt_ids"], tokenized[i][f"{side}_ids"]
            contrast = 2 * _full_logits(positive, prompt, completion) - _full_logits(negative, prompt, completion)
            p_ce = _gather(contrast, completion).exp()
            expected = 1 - p_ce if side == "rejected" else p_ce
            expected[-1] = 1.0  # the completion ends with EOS, weighted 1 on both sides
            torch.testing.assert_close(torch.tensor(out[i][f"{side}_token_weights"], dtype=torch.float64), expected,
                                       atol=1e-5, rtol=0)  # fmt: skip


def test_contrastive_prompt_rewards_match_full_logits(models, rows, tiny_tokenizer):
    evaluator = models[0]
    better, worse = "Be good. {prompt}", "Be bad. {prompt}"
    out = add_contrastive_prompt_rewards(rows, evaluator, tiny_tokenizer, better_template=better, worse_template=worse)
    tokenized = tokenize_preference_dataset(rows, tiny_tokenizer)
    for i in range(len(rows)):
        completion = tokenized[i]["rejected_ids"]
        contexts = [tiny_tokenizer(t.format(prompt=rows[i]["prompt"]))["input_ids"] for t in (better, worse)]
        logps = [_gather(_full_logits(evaluator, c, completion), completion) for c in contexts]
        expected = torch.sigmoid(logps[0] - logps[1]) - 0.5
        torch.testing.assert_close(torch.tensor(out[i]["rejected_token_rewards"], dtype=torch.float64), expected,
                                   atol=1e-5, rtol=0)  # fmt: skip
        assert all(-0.5 < v < 0.5 for v in out[i]["rejected_token_rewards"])


def test_implicit_rewards_identity(models, rows, tiny_tokenizer, tiny_model_path, tmp_path):
    """log π_θ(y) = Σ_t r̂_t / β + log π_ref(y) on a collated batch."""
    policy, ref = models
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="weighted"))
    tokenized = tokenize_preference_dataset(rows, tiny_tokenizer)
    data = rows.add_column("chosen_token_weights", [[1.0] * len(ids) for ids in tokenized["chosen_ids"]])
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    rewards = token_implicit_rewards(
        policy, ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], 0.1
    )
    mask = batch["completion_mask"][:, 1:].bool()
    assert (rewards[~mask] == 0).all()
    for i in range(rewards.shape[0]):
        completion_positions = mask[i].nonzero().squeeze(-1)
        ids = batch["input_ids"][i]
        with torch.no_grad():
            lp = [m(input_ids=ids[None]).logits[0, :-1].double().log_softmax(-1) for m in (policy, ref)]
        targets = ids[1:][completion_positions]
        seq_policy = lp[0][completion_positions, targets].sum()
        seq_ref = lp[1][completion_positions, targets].sum()
        torch.testing.assert_close(rewards[i].sum().double() / 0.1 + seq_ref, seq_policy, atol=1e-4, rtol=0)


def test_online_tgdpo_equals_offline_columns(
    models, tiny_preference_dataset, tiny_tokenizer, tiny_model_path, tmp_path
):
    """TGDPO with a live guidance model trains exactly like TGDPO on columns built offline from the same model."""
    from ..trainers.dpo_utils import load

    guidance = models[0]
    dataset = tiny_preference_dataset.select(range(8))
    reference = load(tiny_model_path).eval()
    offline = add_dpo_token_rewards(dataset, guidance, reference, tiny_tokenizer, scale=1.0)
    common = dict(token_loss_type="tgdpo", tgdpo_alpha=3.0, beta=0.5)
    a = TokenDPOTrainer(model=tiny_model_path, args=TokenDPOConfig(**base_args(tmp_path / "a", **common)),
                        train_dataset=offline, processing_class=tiny_tokenizer)  # fmt: skip
    a.train()
    b = TokenDPOTrainer(model=tiny_model_path, args=TokenDPOConfig(**base_args(tmp_path / "b", **common)),
                        train_dataset=dataset, processing_class=tiny_tokenizer, guidance_model=guidance)  # fmt: skip
    b.train()
    assert_logs_equal(a.state.log_history, b.state.log_history, atol=1e-5)
    assert_params_equal(a.model, b.model, atol=1e-5)
    assert a.state.log_history[0]["token_rewards/max"] > 0.01  # the rewards are not trivially zero


def test_guidance_model_requires_tgdpo(models, rows, tiny_tokenizer, tiny_model_path, tmp_path):
    args = DPOConfig(**base_args(tmp_path))
    with pytest.raises(ValueError, match="token_loss_type='tgdpo'"):
        TokenDPOTrainer(model=tiny_model_path, args=args, train_dataset=rows, processing_class=tiny_tokenizer,
                        guidance_model=models[0])  # fmt: skip


def test_critical_weights_eos_rule_with_chat_template(models, tiny_tokenizer):
    """With a chat template the completion ends `<|im_end|>` + "\\n": both get weight 1, the content does not."""
    from datasets import Dataset

    rows = Dataset.from_list([{
        "prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
        "chosen": [{"role": "assistant", "content": "It is 5."}],
        "rejected": [{"role": "assistant", "content": "It is 6."}],
    }])  # fmt: skip
    out = add_critical_token_weights(rows, *models, tiny_tokenizer)
    ids = tokenize_preference_dataset(rows, tiny_tokenizer)[0]["rejected_ids"]
    eos = ids.index(tiny_tokenizer.eos_token_id)
    weights = out[0]["rejected_token_weights"]
    assert eos < len(ids) - 1, "the template puts a suffix after <|im_end|>"
    assert weights[eos:] == [1.0] * (len(ids) - eos)
    assert all(w < 1.0 for w in weights[:eos])
