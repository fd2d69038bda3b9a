"""Per-token columns: alignment through truncation/padding/shift, validation messages, column survival."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer
from trl_tokenlevel.data import DataCollatorForTokenPreference, tokenize_preference_dataset

from ..trainers.dpo_utils import base_args


def _examples(with_weights="ones"):
    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7], "chosen_ids": [9, 10, 11], "rejected_ids": [12, 13]},  # one-token prompt
    ]
    for example in examples:
        for side in ("chosen", "rejected"):
            n = len(example[f"{side}_ids"])
            example[f"{side}_token_weights"] = (
                [1.0] * n if with_weights == "ones" else [float(10 + i) for i in range(n)]
            )
    return examples


@pytest.mark.parametrize("max_length", [None, 3, 4])
@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_all_ones_weights_equal_completion_mask(max_length, truncation_mode, pad_to_multiple_of):
    collator = DataCollatorForTokenPreference(
        pad_token_id=0, max_length=max_length, truncation_mode=truncation_mode, pad_to_multiple_of=pad_to_multiple_of
    )
    batch = collator(_examples())
    assert batch["token_weights"].dtype == torch.float32
    torch.testing.assert_close(batch["token_weights"], batch["completion_mask"].float(), atol=0, rtol=0)


def test_values_follow_their_tokens_through_truncation_and_shift():
    collator = DataCollatorForTokenPreference(pad_token_id=0, max_length=3, truncation_mode="keep_end")
    batch = collator(_examples(with_weights="ranks"))
    # Row 1 (chosen, one-token prompt [7], completion [9, 10, 11]) keeps its last 3 ids: [9, 10, 11].
    assert batch["input_ids"][1].tolist() == [9, 10, 11]
    assert batch["token_weights"][1].tolist() == [10.0, 11.0, 12.0]
    # After the causal shift the weight of the token at position p sits at p - 1, like TRL's per-token log-probs.
    shifted = batch["token_weights"][:, 1:]
    assert shifted[1].tolist() == [11.0, 12.0]
    # Rejected rows follow the chosen rows: row 2 is prompt [1,2,3] + [6] cut to [2, 3, 6] with weight on 6 only.
    assert batch["input_ids"][2].tolist() == [2, 3, 6]
    assert batch["token_weights"][2].tolist() == [0.0, 0.0, 10.0]


def test_one_token_prompt_alignment():
    batch = DataCollatorForTokenPreference(pad_token_id=0)(_examples(with_weights="ranks"))
    # The batch is 5 wide (prompt 3 + completion 2 in row 0): row 1 is right-padded by one.
    assert batch["input_ids"][1].tolist() == [7, 9, 10, 11, 0]
    assert batch["token_weights"][1].tolist() == [0.0, 10.0, 11.0, 12.0, 0.0]
    assert batch["completion_mask"][1].tolist() == [0, 1, 1, 1, 0]


def test_missing_side_gets_neutral_value():
    examples = _examples()
    for example in examples:
        del example["chosen_token_weights"]
        example["rejected_token_weights"] = [0.5] * len(example["rejected_ids"])
    batch = DataCollatorForTokenPreference(pad_token_id=0)(examples)
    chosen, rejected = batch["token_weights"].chunk(2)
    chosen_mask, rejected_mask = batch["completion_mask"].chunk(2)
    torch.testing.assert_close(chosen, chosen_mask.float())
    torch.testing.assert_close(rejected, 0.5 * rejected_mask.float())


def test_collator_names_row_and_lengths():
    examples = _examples()
    examples[1]["rejected_token_weights"] = [1.0]
    with pytest.raises(ValueError, match=r"'rejected_token_weights', row 1: has 1 values .* has 2 tokens"):
        DataCollatorForTokenPreference(pad_token_id=0)(examples)


def test_tokenize_helper_matches_trainer(tiny_preference_dataset, tiny_tokenizer, tiny_model_path, tmp_path):
    dataset = tiny_preference_dataset.select(range(6))
    tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer)
    weights = [[1.0] * len(ids) for ids in tokenized["rejected_ids"]]
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="cdpo", max_length=None))
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                              train_dataset=dataset.add_column("rejected_token_weights", weights))  # fmt: skip
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert trainer.train_dataset[column] == tokenized[column]
    # EOS is part of the completion the columns must cover.
    assert all(ids[-1] == tiny_tokenizer.eos_token_id for ids in tokenized["chosen_ids"])


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda w: w[:-1], r"'rejected_token_weights', row 3: has \d+ values but the tokenized completion 'rejected_ids' has \d+ tokens"),
        (lambda w: w[:-1] + [float("nan")], r"'rejected_token_weights', row 3, token \d+: value nan is not finite"),
        (lambda w: w[:-1] + [float("inf")], r"row 3, token \d+: value inf is not finite"),
    ],
)  # fmt: skip
def test_bad_columns_fail_before_training(
    corrupt, message, tiny_preference_dataset, tiny_tokenizer, tiny_model_path, tmp_path
):
    dataset = tiny_preference_dataset.select(range(6))
    tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer)
    weights = [[1.0] * len(ids) for ids in tokenized["rejected_ids"]]
    weights[3] = corrupt(weights[3])
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="cdpo"))
    with pytest.raises(ValueError, match=message):
        TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                        train_dataset=dataset.add_column("rejected_token_weights", weights))  # fmt: skip


def test_wrong_type_is_named(tiny_preference_dataset, tiny_tokenizer, tiny_model_path, tmp_path):
    dataset = tiny_preference_dataset.select(range(4))
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="cdpo"))
    with pytest.raises(ValueError, match=r"'rejected_token_weights', row 0: expected a list of floats .* got float"):
        TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                        train_dataset=dataset.add_column("rejected_token_weights", [0.5] * 4))  # fmt: skip


def test_row_is_the_users_row_after_trl_drops_rows(tiny_tokenizer, tiny_model_path, tmp_path):
    """TRL drops rows whose prompt fills max_length; the error must still name the row of the user's dataset."""
    rows = [{"prompt": "Q: " + "sun " * 40, "chosen": " a.", "rejected": " b."}] + [
        {"prompt": "Q: What is 1 plus 1?\nA:", "chosen": " 2.", "rejected": " 3."} for _ in range(3)
    ]
    dataset = Dataset.from_list(rows)
    tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer)
    weights = [[1.0] * len(ids) for ids in tokenized["rejected_ids"]]
    weights[2] = weights[2] + [1.0]
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="cdpo", max_length=16))
    with pytest.raises(ValueError, match=r"row 2:"):
        TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                        train_dataset=dataset.add_column("rejected_token_weights", weights))  # fmt: skip


@pytest.mark.parametrize("token_loss_type,needs", [("cdpo", "rejected_token_weights"), ("treg", "chosen_token_rewards"),
                                                     ("tgdpo", "guidance_model"), ("weighted", "chosen_token_weights")])  # fmt: skip
def test_missing_columns_are_named(
    token_loss_type, needs, tiny_preference_dataset, tiny_tokenizer, tiny_model_path, tmp_path
):
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type=token_loss_type))
    with pytest.raises(ValueError, match=needs):
        TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer,
                        train_dataset=tiny_preference_dataset.select(range(4)))  # fmt: skip


@pytest.mark.parametrize("remove_unused_columns,num_workers", [(True, 0), (False, 0), (True, 2)])
def test_columns_survive_dataloading(
    remove_unused_columns, num_workers, tiny_preference_dataset, tiny_tokenizer, tiny_model_path, tmp_path
):
    dataset = tiny_preference_dataset.select(range(8))
    tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer)
    dataset = dataset.add_column("rejected_token_weights", [[0.5] * len(ids) for ids in tokenized["rejected_ids"]])
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="cdpo", remove_unused_columns=remove_unused_columns,
                                      dataloader_num_workers=num_workers, max_steps=2))  # fmt: skip
    trainer = TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer, train_dataset=dataset)
    batch = next(iter(trainer.get_train_dataloader()))
    _, rejected = batch["token_weights"].chunk(2)
    _, rejected_mask = batch["completion_mask"].chunk(2)
    torch.testing.assert_close(rejected, 0.5 * rejected_mask.float())
    trainer.train()
    assert trainer.state.log_history[0]["token_weights/rejected_mean"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "overrides,match",
    [({"token_loss_type": "tdpo9"}, "not a token-level loss"), ({"token_loss_type": "cdpo", "loss_type": "ipo"}, "loss_type='sigmoid'"),
     ({"token_loss_type": "cdpo", "ld_alpha": 0.5}, "ld_alpha"), ({"token_loss_type": "cdpo", "use_weighting": True}, "use_weighting"),
     ({"token_loss_type": "cdpo", "cdpo_aggregation": "mean"}, "cdpo_aggregation"),
     ({"token_loss_type": "weighted", "guidance_model_name_or_path": "x"}, "only used with token_loss_type='tgdpo'")],
)  # fmt: skip
def test_config_contradictions_fail_early(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        TokenDPOConfig(**base_args(tmp_path, **overrides))


def test_one_sided_reference_columns_fail(tiny_preference_dataset, tiny_tokenizer, tiny_model_path, tmp_path):
    dataset = tiny_preference_dataset.select(range(4))
    tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer)
    dataset = dataset.add_column("rejected_token_weights", [[1.0] * len(ids) for ids in tokenized["rejected_ids"]])
    dataset = dataset.add_column("ref_chosen_token_logps", [[-1.0] * len(ids) for ids in tokenized["chosen_ids"]])
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="cdpo"))
    with pytest.raises(ValueError, match="'ref_chosen_token_logps' but not its other side"):
        TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer, train_dataset=dataset)


def test_loss_weights_are_refused_for_token_losses(tmp_path):
    with pytest.raises(ValueError, match="loss_weights"):
        TokenDPOConfig(**base_args(tmp_path, token_loss_type="cdpo", loss_weights=[5.0]))


def test_unused_columns_are_reported(tiny_preference_dataset, tiny_tokenizer, tiny_model_path, tmp_path, caplog):
    dataset = tiny_preference_dataset.select(range(4))
    tokenized = tokenize_preference_dataset(dataset, tiny_tokenizer)
    for column, ids in (("chosen_token_rewards", "chosen_ids"), ("rejected_token_weights", "rejected_ids")):
        dataset = dataset.add_column(column, [[0.5] * len(x) for x in tokenized[ids]])
    args = TokenDPOConfig(**base_args(tmp_path, token_loss_type="tgdpo"))
    with caplog.at_level("WARNING"):
        TokenDPOTrainer(model=tiny_model_path, args=args, processing_class=tiny_tokenizer, train_dataset=dataset)
    assert "does not read the columns ['rejected_token_weights']" in caplog.text
