"""The built-in tiny SFT dataset, in each of TRL's SFT dataset formats."""

from __future__ import annotations

import json
from importlib import resources

from datasets import Dataset

SFT_FORMATS = ("prompt_completion", "conversational", "conversational_prompt_completion", "language_modeling")


def load_tiny_sft_dataset(format: str = "prompt_completion") -> Dataset:
    """240 rows of three toy tasks (addition, repeating words, counting a word), as in the tiny preference data.

    Args:
        format: TRL dataset type. `"prompt_completion"` (default): columns `prompt`, `completion` (TRL then trains on
            the completion only). `"conversational"`: `messages` with a user and an assistant turn (use
            `assistant_only_loss=True` to train on the assistant turn). `"conversational_prompt_completion"`:
            `prompt` and `completion` as message lists. `"language_modeling"`: one `text` column (prompt and
            completion joined; every token is trained).
    """
    if format not in SFT_FORMATS:
        raise ValueError(f"format must be one of {SFT_FORMATS}, got {format!r}.")
    text = resources.files(__package__).joinpath("tiny_sft.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if format == "conversational":
        rows = [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows
        ]
    elif format == "conversational_prompt_completion":
        rows = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows
        ]
    elif format == "language_modeling":
        rows = [{"text": r["prompt"] + r["completion"]} for r in rows]
    return Dataset.from_list(rows)
