"""The built-in tiny GRPO dataset: addition prompts with a verifiable answer.

Used by `trl-tokenlevel grpo` with no flags, by the GRPO tests and by `bench/grpo_token_overhead.py`. The phrasing is
the one of the tiny preference and SFT data, so the tiny tokenizer trained on those covers it.
"""

from __future__ import annotations

import json
from importlib import resources

from datasets import Dataset

GRPO_FORMATS = ("standard", "conversational")


def load_tiny_grpo_dataset(format: str = "standard") -> Dataset:
    """240 addition problems `"Q: What is a plus b?\\nA:"` (1 ≤ a, b ≤ 40, all pairs distinct).

    Columns (TRL's prompt-only format, plus what the reward functions read; GRPO passes every column to them):
    - `prompt`: the question (a string, or with `format="conversational"` a one-message user conversation);
    - `answer`: the sum as a string, read by `trl_tokenlevel.rewards.grpo_rewards.addition_reward`;
    - `solution`: a reference completion `" a plus b is c."`, used as the TensorBLEU reference and as CHORD's expert
      demonstration.
    """
    if format not in GRPO_FORMATS:
        raise ValueError(f"format must be one of {GRPO_FORMATS}, got {format!r}.")
    text = resources.files(__package__).joinpath("tiny_grpo.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if format == "conversational":
        rows = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in rows]
    return Dataset.from_list(rows)
