"""Per-token dataset columns for preference data: tokenization helper, validation and the collator that carries them.

A per-token column holds one float per token of the tokenized completion, exactly as `DPOTrainer` tokenizes it
(EOS or end-of-turn included). The collator places it like `completion_mask`: zeros over the prompt, the same
per-sequence truncation, right padding with zeros; `tensor[:, 1:]` then lines up with TRL's per-token log-probs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

# Collated batch key -> (chosen column, rejected column, neutral value for a side the dataset does not give).
# Each batch key is a (2B, L) float tensor [chosen rows; rejected rows] aligned with `input_ids`.
TOKEN_COLUMN_FAMILIES = {
    "token_weights": ("chosen_token_weights", "rejected_token_weights", 1.0),
    "token_rewards": ("chosen_token_rewards", "rejected_token_rewards", 0.0),
    # Written by `TokenDPOTrainer` when it precomputes per-token reference log-probs.
    "ref_token_logps": ("ref_chosen_token_logps", "ref_rejected_token_logps", 0.0),
}
TOKEN_BATCH_KEYS = tuple(TOKEN_COLUMN_FAMILIES)
WEIGHT_COLUMNS = TOKEN_COLUMN_FAMILIES["token_weights"][:2]
# Token weights above this magnitude are accepted with a warning (by design: the loss stays finite, but such weights are
# almost always a unit or normalisation mistake).
LARGE_WEIGHT = 1e3
# Temporary column naming the user's row through TRL's tokenization (which may drop rows), for error messages. A
# streamed dataset keeps it up to the collator, which validates its rows lazily.
ROW_ID_COLUMN = "__trl_tokenlevel_row__"
# Dataset column -> the completion ids column it must align with.
TOKEN_COLUMNS = {
    column: ids_column
    for chosen, rejected, _ in TOKEN_COLUMN_FAMILIES.values()
    for column, ids_column in ((chosen, "chosen_ids"), (rejected, "rejected_ids"))
}


def _tokenizer_of(processing_class: PreTrainedTokenizerBase | ProcessorMixin) -> PreTrainedTokenizerBase:
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def tokenize_preference_dataset(
    dataset: Dataset, processing_class: PreTrainedTokenizerBase | ProcessorMixin, num_proc: int | None = None
) -> Dataset:
    """Return `dataset` with `prompt_ids`, `chosen_ids` and `rejected_ids` exactly as `DPOTrainer` tokenizes them.

    Use it to compute your own per-token columns: a `chosen_token_*` list must have `len(row["chosen_ids"])` entries
    (EOS / end-of-turn included), one per completion token, in order. No row is dropped and nothing is truncated here:
    truncation to `max_length` happens in the collator, identically for the ids and the per-token columns.

    Example:
    ```python
    >>> tokenized = tokenize_preference_dataset(dataset, tokenizer)
    >>> dataset = dataset.add_column("rejected_token_weights", [[1.0] * len(ids) for ids in tokenized["rejected_ids"]])
    ```
    """
    tokenizer = _tokenizer_of(processing_class)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Call TRL's own preprocessing (prompt extraction, EOS for plain text, chat template, prompt/completion split) so
    # the ids can never drift from the trainer's. `max_length=None` keeps every row.
    shim = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=num_proc, max_length=None, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(shim, dataset, processing_class, args, "preference")


def check_token_values(
    column: str, row: int | str, values: Any, expected_length: int, length_meaning: str, fix: str, unit: str = "token"
) -> None:
    """Raise `ValueError` naming the column, the row, both lengths and `fix` unless `values` is a list of
    `expected_length` finite floats. `length_meaning` completes "has N values but ..." (e.g. "the tokenized completion
    'chosen_ids' has 7 tokens"); `unit` names a position in errors about one value."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(
            f"Column {column!r}, row {row}: expected a list of floats (one per {unit}), got {type(values).__name__}. "
            f"{fix}"
        )
    if len(values) != expected_length:
        raise ValueError(f"Column {column!r}, row {row}: has {len(values)} values but {length_meaning}. {fix}")
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"Column {column!r}, row {row}, {unit} {position}: expected a float, got {type(value).__name__} "
                f"({value!r}). {fix}"
            )
        if not math.isfinite(value):
            raise ValueError(
                f"Column {column!r}, row {row}, {unit} {position}: value {value} is not finite. Replace NaN/inf "
                "(e.g. by 0 for a reward or 1 for a weight) before training."
            )


def _check_row(column: str, row: int | str, values: Any, expected_length: int, ids_column: str) -> None:
    check_token_values(
        column, row, values, expected_length,
        length_meaning=f"the tokenized completion {ids_column!r} has {expected_length} tokens",
        fix=(
            f"Compute one value per completion token with `trl_tokenlevel.data.tokenize_preference_dataset(dataset, "
            f"tokenizer)[{ids_column!r}]` (EOS / end-of-turn included)."
        ),
    )  # fmt: skip


def _checked_tensor(column: str, row: int | str, values: Any, expected_length: int, ids_column: str) -> torch.Tensor:
    """`values` as a float32 tensor; anything `_check_row` would reject raises its message. The common case (a valid
    row, already checked when the dataset was prepared) costs one conversion, one `isfinite` and one type scan (torch
    would silently turn a streamed `True` into 1.0)."""
    try:
        tensor = torch.tensor(values, dtype=torch.float32)
    except (TypeError, ValueError):
        tensor = None
    if (
        tensor is None
        or tensor.shape != (expected_length,)
        or not torch.isfinite(tensor).all()
        or any(type(value) is bool for value in values)
    ):
        _check_row(column, row, values, expected_length, ids_column)
    return tensor


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """The columns of `dataset`. A streamed dataset whose features are unknown (`IterableDataset.from_generator`, or
    any `map` over a stream) reports none, so its first row is read (streams restart on every iteration)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset), {}))


def validate_token_columns(dataset: Dataset | IterableDataset, row_ids: list[int] | None = None) -> list[str]:
    """Check every per-token column of a tokenized preference dataset; return the names found.

    Raises `ValueError` naming the column, the row (`row_ids[i]` if given, i.e. the row of the user's dataset), both
    lengths and the fix, for a length mismatch, a non-list, a non-number or a NaN/inf. An `IterableDataset` is
    checked lazily by the collator instead, with the same messages (it cannot be scanned up front without consuming
    it); only its column names are read here.
    """
    if isinstance(dataset, IterableDataset):
        return [name for name in TOKEN_COLUMNS if name in column_names(dataset)]
    present = [name for name in TOKEN_COLUMNS if name in dataset.column_names]
    if not present:
        return present
    ids_columns = sorted({TOKEN_COLUMNS[name] for name in present})
    largest = {}  # weight column -> (|value|, row) of its largest weight
    index = 0
    for batch in dataset.select_columns(present + ids_columns).iter(batch_size=1024):
        size = len(batch[ids_columns[0]])
        for offset in range(size):
            row = row_ids[index + offset] if row_ids is not None else index + offset
            for name in present:
                ids_column = TOKEN_COLUMNS[name]
                values = batch[name][offset]
                _check_row(name, row, values, len(batch[ids_column][offset]), ids_column)
                if name in WEIGHT_COLUMNS and values:
                    largest[name] = max(largest.get(name, (0.0, row)), (max(abs(v) for v in values), row))
        index += size
    for name, (value, row) in largest.items():
        if value > LARGE_WEIGHT:
            warnings.warn(
                f"Column {name!r}, row {row}: a token weight of magnitude {value:g} (> {LARGE_WEIGHT:g}). Weights "
                "multiply log-ratios inside a sigmoid, so such values saturate it and make the gradients of the "
                "other tokens vanish; the run goes on, but check how the weights were computed (e.g. normalise them).",
                stacklevel=2,
            )
    return present


@dataclass
class DataCollatorForTokenPreference(DataCollatorForPreference):
    """`DataCollatorForPreference` that also carries per-token columns.

    For each family of per-token columns present in the examples (weights, rewards, precomputed reference log-probs)
    it returns one `(2B, L)` float tensor, `[chosen rows; rejected rows]` like `input_ids`: zeros over the prompt, the
    completion values, the same `max_length`/`truncation_mode` slice as the ids, right-padded with zeros. A family
    given for one side only is filled on the other side with its neutral value (weight 1, reward 0) over the
    completion tokens. Every row is checked here too (cheaply when valid), so a streamed dataset fails with the same
    message as an in-memory one, naming the dataset row when the example carries `ROW_ID_COLUMN`.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for key, (chosen_column, rejected_column, neutral) in TOKEN_COLUMN_FAMILIES.items():
            if chosen_column in examples[0] or rejected_column in examples[0]:
                rows = [
                    *self._completion_rows(examples, chosen_column, "chosen_ids", neutral),
                    *self._completion_rows(examples, rejected_column, "rejected_ids", neutral),
                ]
                output[key] = self._truncate_and_pad(rows)
        return output

    @staticmethod
    def _completion_rows(examples, column: str, ids_column: str, neutral: float) -> list[torch.Tensor]:
        rows = []
        for index, example in enumerate(examples):
            completion_length = len(example[ids_column])
            values = example.get(column)
            if values is None:
                completion = torch.full((completion_length,), neutral, dtype=torch.float32)
            else:
                row = example.get(ROW_ID_COLUMN, index)
                completion = _checked_tensor(column, row, values, completion_length, ids_column)
            rows.append(torch.cat([torch.zeros(len(example["prompt_ids"])), completion]))
        return rows

    def _truncate_and_pad(self, rows: list[list[float]]) -> torch.Tensor:
        if self.max_length is not None:
            # The same slice the parent applied to the ids (it has already validated `truncation_mode`).
            keep = (
                slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            )
            rows = [row[keep] for row in rows]
        return pad(rows, padding_value=0.0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
