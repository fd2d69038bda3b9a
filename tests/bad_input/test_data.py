"""Datasets: per-token columns that do not fit are named (column, row, lengths, fix) before training, in memory and
streamed; valid streams train; extreme but meaningful values train with a warning and a finite loss."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset, IterableDataset

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer, TokenSFTConfig, TokenSFTTrainer
from trl_tokenlevel.data import tokenize_preference_dataset
from trl_tokenlevel.data.builtin import load_tiny_sft_dataset
from trl_tokenlevel.data.sft_columns import tokenize_sft_dataset

from ..trainers.dpo_utils import base_args
from .support import assert_finite_loss, assert_refused, output_dir_with_checkpoint

FIX_DPO = r"tokenize_preference_dataset|Replace NaN/inf"
FIX_SFT = r"tokenize_sft_dataset|weights >= 0|positive weight|Replace NaN/inf"


@pytest.fixture(scope="module")
def pairs(tiny_preference_dataset, tiny_tokenizer):
    dataset = tiny_preference_dataset.select(range(4))
    return dataset, tokenize_preference_dataset(dataset, tiny_tokenizer)


@pytest.fixture(scope="module")
def sft_rows(tiny_tokenizer):
    dataset = load_tiny_sft_dataset().select(range(4))
    tokenized = tokenize_sft_dataset(dataset, tiny_tokenizer)
    return dataset, [sum(label != -100 for label in labels) for labels in tokenized["labels"]]


def _stream(dataset, kind):
    if kind == "to_iterable":
        return dataset.to_iterable_dataset()
    return IterableDataset.from_generator(lambda: (yield from dataset))


def _dpo(model_path, tokenizer, out, dataset, **overrides):
    args = TokenDPOConfig(**base_args(out, **{"max_steps": 1, "token_loss_type": "cdpo", **overrides}))
    return TokenDPOTrainer(model=model_path, args=args, processing_class=tokenizer, train_dataset=dataset)


def _sft(model_path, tokenizer, out, dataset, **overrides):
    args = TokenSFTConfig(**base_args(out, **{"max_steps": 1, "token_loss_type": "weighted", **overrides}))
    return TokenSFTTrainer(model=model_path, args=args, processing_class=tokenizer, train_dataset=dataset)


# (how row 2's rejected weights are corrupted, what the message names)
DPO_ROW_CASES = {
    "too_short": (lambda w: w[:-1], ["'rejected_token_weights', row 2", "has"]),
    "too_long": (lambda w: w + [1.0], ["'rejected_token_weights', row 2"]),
    "nan": (lambda w: w[:-1] + [math.nan], ["row 2, token", "not finite"]),
    "inf": (lambda w: [math.inf] + w[1:], ["row 2, token 0", "not finite"]),
    "string": (lambda w: ["high"] + w[1:], ["row 2, token 0", "expected a float"]),
    "bool": (lambda w: [True] + w[1:], ["row 2, token 0", "expected a float"]),
}


@pytest.mark.parametrize("case", list(DPO_ROW_CASES))
def test_dpo_weight_column_row(case, pairs, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset, tokenized = pairs
    corrupt, names = DPO_ROW_CASES[case]
    weights = [[1.0] * len(ids) for ids in tokenized["rejected_ids"]]
    weights[2] = corrupt(weights[2])
    # A mixed-type row cannot even become an Arrow column: stream it (validated lazily by the collator).
    rows = [{**row, "rejected_token_weights": w} for row, w in zip(dataset, weights)]
    in_memory = case not in ("string", "bool")
    data = Dataset.from_list(rows) if in_memory else IterableDataset.from_generator(lambda: (yield from rows))
    out = output_dir_with_checkpoint(tmp_path)

    def run():
        trainer = _dpo(tiny_model_path, tiny_tokenizer, out, data, per_device_train_batch_size=4)
        try:
            trainer.train()
        finally:
            assert trainer.state.global_step == 0  # before any optimizer step

    assert_refused(run, ValueError, out, names, FIX_DPO)


def test_dpo_streamed_bad_row_names_the_dataset_row(pairs, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset, tokenized = pairs
    weights = [[1.0] * len(ids) for ids in tokenized["rejected_ids"]]
    weights[3] = weights[3][:-1]
    data = _stream(dataset.add_column("rejected_token_weights", weights), "from_generator")
    out = output_dir_with_checkpoint(tmp_path)
    trainer = _dpo(tiny_model_path, tiny_tokenizer, out, data, per_device_train_batch_size=4)
    message = assert_refused(trainer.train, ValueError, out, ["'rejected_token_weights', row 3: has"], FIX_DPO)
    assert trainer.state.global_step == 0, message


@pytest.mark.parametrize("token_loss_type,kind", [("weighted", "to_iterable"), ("cdpo", "from_generator"),
                                                  ("tgdpo", "to_iterable"), ("treg", "from_generator")])  # fmt: skip
def test_dpo_valid_stream_trains(token_loss_type, kind, pairs, tiny_model_path, tiny_tokenizer, tmp_path):
    """Valid input accepted: streamed per-token columns train every token-scalar DPO method."""
    dataset, tokenized = pairs
    family = "rewards" if token_loss_type in ("tgdpo", "treg") else "weights"
    values = [[0.5] * len(ids) for ids in tokenized["rejected_ids"]]
    data = _stream(dataset.add_column(f"rejected_token_{family}", values), kind)
    trainer = _dpo(tiny_model_path, tiny_tokenizer, str(tmp_path), data, token_loss_type=token_loss_type)
    trainer.train()
    assert trainer.state.global_step == 1
    assert_finite_loss(trainer)
    assert trainer.state.log_history[0][f"token_{family}/rejected_mean"] == pytest.approx(0.5)


def test_dpo_huge_weights_warn_and_train(pairs, tiny_model_path, tiny_tokenizer, tmp_path):
    """By design: weights far above 1 are accepted with a warning (the loss stays finite)."""
    dataset, tokenized = pairs
    weights = [[1.0] * len(ids) for ids in tokenized["rejected_ids"]]
    weights[1][0] = 1e6
    with pytest.warns(UserWarning, match=r"'rejected_token_weights', row 1: a token weight of magnitude 1e\+06"):
        trainer = _dpo(
            tiny_model_path, tiny_tokenizer, str(tmp_path), dataset.add_column("rejected_token_weights", weights)
        )
    trainer.train()
    assert_finite_loss(trainer)


def test_dpo_missing_column_for_stream(pairs, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset, _ = pairs
    out = output_dir_with_checkpoint(tmp_path)
    assert_refused(lambda: _dpo(tiny_model_path, tiny_tokenizer, out, _stream(dataset, "from_generator")), ValueError,
                   out, ["'rejected_token_weights'", "columns ['prompt', 'chosen', 'rejected']"],
                   "add_critical_token_weights")  # fmt: skip


# SFT `token_weights` (one per loss token)
def _sft_weights(counts, row, corrupt):
    weights = [[1.0] * count for count in counts]
    weights[row] = corrupt(weights[row])
    return weights


SFT_ROW_CASES = {
    "too_short": (lambda w: w[:-1], ["'token_weights', row 1: has", "loss tokens"]),
    "negative": (lambda w: [-0.5] + w[1:], ["'token_weights', row 1, loss token 0", "negative"]),
    "nan": (lambda w: [math.nan] + w[1:], ["'token_weights', row 1, loss token 0", "not finite"]),
}


@pytest.mark.parametrize("case", list(SFT_ROW_CASES))
@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
def test_sft_weight_column_row(case, streamed, sft_rows, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset, counts = sft_rows
    corrupt, names = SFT_ROW_CASES[case]
    data = dataset.add_column("token_weights", _sft_weights(counts, 1, corrupt))
    data = _stream(data, "to_iterable") if streamed else data
    out = output_dir_with_checkpoint(tmp_path)

    def run():
        trainer = _sft(tiny_model_path, tiny_tokenizer, out, data, per_device_train_batch_size=4)
        trainer.train()  # a stream is checked as its rows arrive: row 1 is in the first batch

    assert_refused(run, ValueError, out, names, FIX_SFT)


def test_sft_all_zero_weights_refused(sft_rows, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset, counts = sft_rows
    out = output_dir_with_checkpoint(tmp_path)
    data = dataset.add_column("token_weights", [[0.0] * count for count in counts])
    assert_refused(lambda: _sft(tiny_model_path, tiny_tokenizer, out, data), ValueError, out,
                   ["'token_weights'", "every weight of the train dataset is 0"], FIX_SFT)  # fmt: skip


def test_sft_all_zero_row_warns_and_trains(sft_rows, tiny_model_path, tiny_tokenizer, tmp_path):
    """By design: a row with only zero weights is accepted (it adds nothing), with a warning; the loss is finite."""
    dataset, counts = sft_rows
    weights = [[1.0] * count for count in counts]
    weights[2] = [0.0] * counts[2]
    with pytest.warns(UserWarning, match="1 of 4 rows of the train dataset have only zero weights"):
        trainer = _sft(tiny_model_path, tiny_tokenizer, str(tmp_path), dataset.add_column("token_weights", weights))
    trainer.train()
    assert_finite_loss(trainer)


def test_sft_missing_weight_column_streamed(sft_rows, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset, _ = sft_rows
    out = output_dir_with_checkpoint(tmp_path)
    assert_refused(lambda: _sft(tiny_model_path, tiny_tokenizer, out, _stream(dataset, "from_generator")), ValueError,
                   out, ["'token_weights'", "['prompt', 'completion']"], "tokenize_sft_dataset")  # fmt: skip


def test_sft_valid_stream_trains(sft_rows, tiny_model_path, tiny_tokenizer, tmp_path):
    dataset, counts = sft_rows
    data = _stream(dataset.add_column("token_weights", [[0.5] * c for c in counts]), "from_generator")
    trainer = _sft(tiny_model_path, tiny_tokenizer, str(tmp_path), data)
    trainer.train()
    assert_finite_loss(trainer)
