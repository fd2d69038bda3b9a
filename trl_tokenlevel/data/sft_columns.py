"""Per-token columns for SFT data: tokenization helper, validation, alignment and the collator that carries them.

A `token_weights` column holds one float per **loss token** of an example, in order: the tokens whose label is not
-100 after TRL's `SFTTrainer` tokenizes it (the completion tokens for prompt-completion data with the default
completion-only loss, the assistant tokens with `assistant_only_loss=True`, every token otherwise; EOS / end-of-turn
included). Dataset preparation turns it into one value per **position** (0 where the label is -100), which then goes
through TRL's truncation and packing exactly like `input_ids`; the collator pads it with zeros, so `tensor[:, 1:]`
lines up with the fused LM head's per-token log-probabilities.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, SFTTrainer
from trl.trainer.utils import global_then_local_main_first, pad

from .token_columns import ROW_ID_COLUMN, check_token_values, column_names

TOKEN_WEIGHTS_COLUMN = "token_weights"

_FIX = (
    "Compute one value per loss token with "
    "`trl_tokenlevel.data.sft_columns.tokenize_sft_dataset(dataset, tokenizer, ...)`: a row needs "
    "`sum(label != -100 for label in row['labels'])` values, in order (EOS / end-of-turn included)."
)


def _tokenizer_of(processing_class: PreTrainedTokenizerBase | ProcessorMixin) -> PreTrainedTokenizerBase:
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def tokenize_sft_dataset(
    dataset: Dataset,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    *,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    dataset_text_field: str = "text",
    num_proc: int | None = None,
) -> Dataset:
    """Return `dataset` with `input_ids` and `labels` exactly as `SFTTrainer` builds them, before truncation.

    Pass the same `completion_only_loss` / `assistant_only_loss` / `dataset_text_field` as in your config. The loss
    tokens of a row are the positions whose label is not -100; a `token_weights` list needs one value per loss token.
    No row is dropped and nothing is truncated: truncation to `max_length` (and packing) happens in the trainer,
    identically for the ids and the weights.

    Example:
    ```python
    >>> tokenized = tokenize_sft_dataset(dataset, tokenizer)
    >>> weights = [[1.0] * sum(label != -100 for label in labels) for labels in tokenized["labels"]]
    >>> dataset = dataset.add_column("token_weights", weights)
    ```
    """
    tokenizer = _tokenizer_of(processing_class)
    first = next(iter(dataset))
    if completion_only_loss is None:
        completion_only_loss = "prompt" in first and "completion" in first
    chat_template = None
    if assistant_only_loss and not has_generation_markers(processing_class.chat_template):
        chat_template = get_training_chat_template(processing_class)
    # Call TRL's own preparation (ChatML conversion, EOS for plain text, chat template, completion and assistant
    # masks, labels) so that the labels can never drift from the trainer's. `max_length=None`: nothing is truncated.
    shim = SimpleNamespace(_tokenizer=tokenizer, completion_only_loss=completion_only_loss, chat_template=chat_template)
    args = SimpleNamespace(
        dataset_num_proc=num_proc,
        dataset_text_field=dataset_text_field,
        assistant_only_loss=assistant_only_loss,
        max_length=None,
        truncation_mode="keep_start",
        shuffle_dataset=False,
        seed=0,
    )
    return SFTTrainer._prepare_dataset(shim, dataset, processing_class, args, False, None, "sft")


def check_token_weights_row(values: Any, labels: list[int], row: int | str, column: str = TOKEN_WEIGHTS_COLUMN) -> None:
    """Raise `ValueError` naming the column, the row, both lengths and the fix unless `values` fits `labels`.

    Negative weights are refused: `−w·log p` with `w < 0` is unbounded below (it pushes p to 0 without limit). All-zero
    rows are accepted (they contribute nothing); a dataset whose weights are all zero is refused by
    `check_weight_totals`.
    """
    num_loss_tokens = sum(label != -100 for label in labels)
    meaning = f"the tokenized example has {num_loss_tokens} loss tokens (labels != -100, out of {len(labels)} tokens)"
    check_token_values(column, row, values, num_loss_tokens, meaning, _FIX, unit="loss token")
    negative = next((position for position, value in enumerate(values) if value < 0), None)
    if negative is not None:
        raise ValueError(
            f"Column {column!r}, row {row}, loss token {negative}: weight {values[negative]} is negative. The loss "
            "−w·log p is unbounded below for w < 0 (it drives the token's probability to 0 without limit). Use "
            "weights >= 0 (0 ignores a token)."
        )


def check_weight_totals(dataset: Dataset, dataset_name: str, column: str = TOKEN_WEIGHTS_COLUMN) -> None:
    """Refuse a map-style dataset whose weights are all zero (training would change nothing); warn about all-zero
    rows (accepted by design: the loss is normalised by the token count, so they only dilute it)."""
    zero_rows = [row for row, values in enumerate(dataset[column]) if not any(values)]
    if zero_rows and len(zero_rows) == len(dataset):
        raise ValueError(
            f"Column {column!r}: every weight of the {dataset_name} dataset is 0, so the loss and its gradients are "
            "identically zero and training would change nothing. Give the tokens to learn a positive weight."
        )
    if zero_rows:
        warnings.warn(
            f"Column {column!r}: {len(zero_rows)} of {len(dataset)} rows of the {dataset_name} dataset have only zero "
            f"weights (first: prepared row {zero_rows[0]}); they add nothing to the loss but still count in its "
            "token normaliser.",
            stacklevel=2,
        )


def align_token_weights(values: list[float], labels: list[int]) -> list[float]:
    """One weight per loss token -> one weight per position (0.0 where the label is -100)."""
    weights = iter(values)
    return [float(next(weights)) if label != -100 else 0.0 for label in labels]


def prepare_token_weights(
    dataset: Dataset | IterableDataset,
    args,
    packing: bool,
    dataset_name: str,
    main_first: Callable = global_then_local_main_first,
) -> Dataset | IterableDataset:
    """Finish TRL's SFT preparation for a dataset that carries `token_weights`.

    `dataset` must already be tokenized with labels and **not** truncated (TRL's `_prepare_dataset` with
    `max_length=None`, no packing, no shuffling). This validates every row (row numbers from `ROW_ID_COLUMN` when
    present), aligns the weights to positions, then applies TRL's remaining steps to `input_ids`, `labels` and the
    weights together: truncation to `args.max_length` and removal of fully masked rows (without packing), or packing,
    then shuffling. The steps mirror `trl.SFTTrainer._prepare_dataset` (TRL 1.16).
    """
    map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
    is_map_style = isinstance(dataset, Dataset)

    def describe(text: str) -> dict:
        return {"desc": f"{text} {dataset_name} dataset"} if is_map_style else {}

    def align(example):
        row = example.get(ROW_ID_COLUMN, "?")
        check_token_weights_row(example[TOKEN_WEIGHTS_COLUMN], example["labels"], row)
        return {TOKEN_WEIGHTS_COLUMN: align_token_weights(example[TOKEN_WEIGHTS_COLUMN], example["labels"])}

    with main_first():
        has_row_ids = ROW_ID_COLUMN in column_names(dataset)
        dataset = dataset.map(align, **map_kwargs, **describe("Aligning token weights in"))
        if has_row_ids:
            dataset = dataset.remove_columns(ROW_ID_COLUMN)

        if args.max_length is not None and not packing:
            if args.truncation_mode == "keep_start":
                keep = slice(None, args.max_length)
            elif args.truncation_mode == "keep_end":
                keep = slice(-args.max_length, None)
            else:
                raise ValueError(
                    f"Unsupported truncation mode: {args.truncation_mode}, expected 'keep_start' or 'keep_end'"
                )

            def truncate(example):
                return {key: example[key][keep] for key in ("input_ids", "labels", TOKEN_WEIGHTS_COLUMN)}

            dataset = dataset.map(truncate, **map_kwargs, **describe("Truncating"))
            dataset = dataset.filter(
                lambda example: any(label != -100 for label in example["labels"]),
                **map_kwargs,
                **describe("Dropping fully masked examples from"),
            )

        if packing:
            if args.max_length is None:
                raise ValueError("When packing is enabled, `max_length` can't be `None`.")
            # `pack_dataset` cuts every list column at the same offsets, so the weights stay aligned with the ids.
            dataset = dataset.select_columns(["input_ids", "labels", TOKEN_WEIGHTS_COLUMN])
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            dataset = pack_dataset(
                dataset, args.max_length, args.packing_strategy, {**map_kwargs, **describe("Packing")}
            )
    if is_map_style:
        check_weight_totals(dataset, dataset_name)
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return dataset


@dataclass
class DataCollatorForTokenSFT(DataCollatorForLanguageModeling):
    """`DataCollatorForLanguageModeling` that also carries a per-position `token_weights` column.

    Returns `token_weights` as a float tensor shaped like `labels`: right-padded with zeros (or, with
    `padding_free=True`, concatenated into one row like the ids). Each example's list must have one value per
    position of `input_ids`, which `TokenSFTTrainer`'s dataset preparation guarantees; with
    `skip_prepare_dataset=True` the dataset must provide it that way (0 where the label is -100).
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if TOKEN_WEIGHTS_COLUMN not in examples[0]:
            return output
        tensors = []
        for index, example in enumerate(examples):
            values = example[TOKEN_WEIGHTS_COLUMN]
            if values is None or len(values) != len(example["input_ids"]):
                got = "no values" if values is None else f"{len(values)} values"
                raise ValueError(
                    f"Column {TOKEN_WEIGHTS_COLUMN!r}, batch example {index}: has {got} but `input_ids` has "
                    f"{len(example['input_ids'])} tokens. After TokenSFTTrainer's dataset preparation the column holds "
                    "one weight per position; with `skip_prepare_dataset=True` provide it that way (0.0 where the "
                    "label is -100), or let the trainer prepare the dataset."
                )
            tensors.append(torch.tensor(values, dtype=torch.float32))
        if self.padding_free:
            tensors = [torch.cat(tensors, dim=0)]
        output[TOKEN_WEIGHTS_COLUMN] = pad(
            tensors, padding_value=0.0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
        )
        return output
