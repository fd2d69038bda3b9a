"""Pieces that do not fit together are refused at construction (both sides and the fix named); files that do not fit
(per-token reference cache, SparsePO masks) name the file and what to do."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import load_from_disk
from transformers import LlamaModel

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer, TokenGRPOTrainer, TokenSFTConfig, TokenSFTTrainer
from trl_tokenlevel.data import tokenize_preference_dataset
from trl_tokenlevel.data.builtin import load_tiny_grpo_dataset, load_tiny_sft_dataset
from trl_tokenlevel.signals.masks import SparsePOMask
from trl_tokenlevel.tiny import build_tiny_model

from ..trainers.dpo_utils import base_args, load
from ..trainers.test_token_grpo_parity import grpo_args
from .support import assert_refused, output_dir_with_checkpoint

FIX_MODEL = r"same tokenizer and vocabulary|same architecture|AutoModelForCausalLM|resize_token_embeddings"


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    """Misfits for the tiny policy (vocabulary len(tokenizer), hidden 64): built once."""
    wider = build_tiny_model(tiny_tokenizer, seed=1)
    wider.resize_token_embeddings(len(tiny_tokenizer) + 64)
    narrower = build_tiny_model(tiny_tokenizer, seed=2)
    narrower.resize_token_embeddings(len(tiny_tokenizer) - 8)
    return {
        "vocab": len(tiny_tokenizer),
        "other_vocab": wider,
        "small_embedding": narrower,
        "other_hidden": build_tiny_model(tiny_tokenizer, hidden_size=32, seed=3),
        "headless": LlamaModel(build_tiny_model(tiny_tokenizer, seed=4).config),
    }


@pytest.fixture(scope="module")
def weighted_pairs(tiny_preference_dataset, tiny_tokenizer):
    dataset = tiny_preference_dataset.select(range(4))
    tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer)
    return dataset.add_column("rejected_token_weights", [[1.0] * len(ids) for ids in tokenized["rejected_ids"]])


def _dpo_refused(tmp_path, tokenizer, dataset, names, model, **kwargs):
    out = output_dir_with_checkpoint(tmp_path)
    overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in ("token_loss_type",)}
    args = TokenDPOConfig(**base_args(out, max_steps=1, **overrides))
    assert_refused(lambda: TokenDPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=dataset,
                                           **kwargs), ValueError, out, names, FIX_MODEL)  # fmt: skip


def test_reference_with_other_vocabulary(models, weighted_pairs, tiny_model_path, tiny_tokenizer, tmp_path):
    _dpo_refused(tmp_path, tiny_tokenizer, weighted_pairs, ["`ref_model`", "`model`", f"{models['vocab'] + 64} tokens", f"covers {models['vocab']}"], tiny_model_path,
                 token_loss_type="tdpo2", ref_model=models["other_vocab"])  # fmt: skip


def test_sparsepo_reference_with_other_hidden_size(models, weighted_pairs, tiny_model_path, tiny_tokenizer, tmp_path):
    _dpo_refused(tmp_path, tiny_tokenizer, weighted_pairs, ["`ref_model` has hidden size 32", "`model` has 64"],
                 tiny_model_path, token_loss_type="sparsepo", ref_model=models["other_hidden"])  # fmt: skip


def test_guidance_model_with_other_vocabulary(
    models, tiny_preference_dataset, tiny_model_path, tiny_tokenizer, tmp_path
):
    _dpo_refused(tmp_path, tiny_tokenizer, tiny_preference_dataset.select(range(4)), ["`guidance_model`", f"{models['vocab'] + 64} tokens"],
                 tiny_model_path, token_loss_type="tgdpo", guidance_model=models["other_vocab"])  # fmt: skip


def test_aligndistil_teacher_with_other_vocabulary(
    models, tiny_preference_dataset, tiny_model_path, tiny_tokenizer, tmp_path
):
    teachers = (load(tiny_model_path), models["other_vocab"])
    _dpo_refused(tmp_path, tiny_tokenizer, tiny_preference_dataset.select(range(4)), ["`reverse-DPO teacher`", f"{models['vocab'] + 64} tokens"],
                 tiny_model_path, token_loss_type="aligndistil", aligndistil_teachers=teachers)  # fmt: skip


def test_dpo_policy_without_output_embeddings(models, weighted_pairs, tiny_tokenizer, tmp_path):
    _dpo_refused(tmp_path, tiny_tokenizer, weighted_pairs, ["`model` (LlamaModel) has no output embeddings"],
                 models["headless"], token_loss_type="cdpo")  # fmt: skip


def test_dpo_tokenizer_larger_than_embedding(models, weighted_pairs, tiny_tokenizer, tmp_path):
    _dpo_refused(tmp_path, tiny_tokenizer, weighted_pairs, [f"{models['vocab']} tokens", f"{models['vocab'] - 8} rows"], models["small_embedding"],
                 token_loss_type="cdpo")  # fmt: skip


@pytest.mark.parametrize("model_key,names", [("headless", ["has no output embeddings"]),
                                             ("small_embedding", ["tokens but `model`'s input embedding has"])])  # fmt: skip
def test_sft_policy_misfit(model_key, names, models, tiny_tokenizer, tmp_path):
    out = output_dir_with_checkpoint(tmp_path)
    args = TokenSFTConfig(**base_args(out, max_steps=1, token_loss_type="chord_phi"))
    assert_refused(lambda: TokenSFTTrainer(model=models[model_key], args=args, processing_class=tiny_tokenizer,
                                           train_dataset=load_tiny_sft_dataset().select(range(4))),
                   ValueError, out, names, FIX_MODEL)  # fmt: skip


def _grpo_args(out, **overrides):
    return grpo_args(out, max_steps=1, max_completion_length=4, **overrides)


def test_grpo_policy_without_output_embeddings(models, tiny_tokenizer, tmp_path):
    out = output_dir_with_checkpoint(tmp_path)
    args = _grpo_args(out, token_selection="entropy_quantile")
    assert_refused(lambda: TokenGRPOTrainer(model=models["headless"], reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                            args=args, processing_class=tiny_tokenizer,
                                            train_dataset=load_tiny_grpo_dataset().select(range(4))),
                   ValueError, out, ["has no output embeddings"], FIX_MODEL)  # fmt: skip


def test_grpo_token_reward_model_with_other_vocabulary(models, tiny_model_path, tiny_tokenizer, tmp_path):
    out = output_dir_with_checkpoint(tmp_path)
    args = _grpo_args(out, token_reward_source="rto")
    assert_refused(lambda: TokenGRPOTrainer(model=tiny_model_path, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                                            args=args, processing_class=tiny_tokenizer,
                                            train_dataset=load_tiny_grpo_dataset().select(range(4)),
                                            token_reward_model=models["other_vocab"]),
                   ValueError, out, ["`token_reward_model`", f"{models['vocab'] + 64} tokens"], FIX_MODEL)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def dataset_on_disk(weighted_pairs, tmp_path):
    """A dataset loaded from disk: its caches (TRL's tokenization, our per-token reference) are files beside it."""
    weighted_pairs.save_to_disk(str(tmp_path / "data"))
    return load_from_disk(str(tmp_path / "data")), str(tmp_path / "data")


@pytest.mark.parametrize("damage", ["truncated", "other_rows"])
def test_stale_per_token_reference_cache(
    damage, dataset_on_disk, tiny_model_path, tiny_tokenizer, tmp_path, monkeypatch
):
    """The cache is keyed by the prepared dataset's fingerprint and the reference's hash; a file under that name that
    is truncated (interrupted write) or holds other rows must not be used."""
    dataset, _ = dataset_on_disk
    read = TokenDPOTrainer._read_ref_cache
    used = []
    monkeypatch.setattr(TokenDPOTrainer, "_read_ref_cache",
                        staticmethod(lambda *call: used.append(call) or read(*call)))  # fmt: skip
    out = output_dir_with_checkpoint(tmp_path)
    args = TokenDPOConfig(**base_args(out, max_steps=1, token_loss_type="cdpo", precompute_ref_log_probs=True))
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer, train_dataset=dataset)
    cache, prepared, _ = used[0]
    if damage == "truncated":
        with open(cache, "r+b") as handle:
            handle.truncate(os.path.getsize(cache) // 2)
        names = [cache, "unreadable"]
    else:
        from datasets import Dataset

        os.remove(cache)
        Dataset.from_dict({"ref_chosen_token_logps": [[0.0]], "ref_rejected_token_logps": [[0.0]]}).map(
            lambda row: row, cache_file_name=cache
        )
        names = [cache, "has 1 rows", "has 4 rows", "stale"]
    # The same prepared dataset and reference meet the damaged file (as a rerun or the eval split would).
    assert_refused(lambda: trainer._precompute_ref_logps(prepared, "train", 2), ValueError, out, names,
                   r"Delete .* run again")  # fmt: skip


def test_sparsepo_mask_file_from_another_model(weighted_pairs, tiny_model_path, tiny_tokenizer, tmp_path):
    out = output_dir_with_checkpoint(tmp_path)
    args = TokenDPOConfig(**base_args(out, max_steps=1, token_loss_type="sparsepo"))
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                              train_dataset=weighted_pairs)  # fmt: skip
    checkpoint = os.path.join(out, "checkpoint-1")
    trainer.save_model(checkpoint)  # the policy and its masks, as a checkpoint holds them
    path = os.path.join(checkpoint, "sparsepo_mask.pt")
    torch.save([SparsePOMask(num_layers=3, hidden_size=32).state_dict()], path)  # masks of another model
    assert_refused(lambda: trainer._load_from_checkpoint(checkpoint), ValueError, out,
                   [path, "saved for another model", "(3, 32)"], r"Resume with the model")  # fmt: skip
