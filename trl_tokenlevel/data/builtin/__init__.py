"""Small datasets shipped with the package, for the default CLI jobs, the tests and the CPU benchmarks."""

from __future__ import annotations

import json
from importlib import resources

from datasets import Dataset

from .grpo import load_tiny_grpo_dataset  # noqa: F401
from .sft import load_tiny_sft_dataset  # noqa: F401


def load_tiny_preference_dataset() -> Dataset:
    """240 (prompt, chosen, rejected) rows of three toy tasks: addition, repeating words, counting a word.

    Chosen and rejected completions differ in one or two tokens (the wrong number or word), which is exactly where a
    token-level method should put its credit; the HTML heatmap of the default `dpo` job shows it.
    """
    text = resources.files(__package__).joinpath("tiny_preference.jsonl").read_text(encoding="utf-8")
    return Dataset.from_list([json.loads(line) for line in text.splitlines() if line.strip()])


def load_demo_preference_dataset(split: str = "train") -> Dataset:
    """On-policy preference pairs of the demo model (SmolLM2-135M-Instruct) on "Larger of a and b:", by correctness.

    Conversational `prompt` (two solved examples, then the question), `chosen` (the right answer) and `rejected` (one of
    the model's own wrong answers), plus `task`, `answer`, `key`, `chosen_source`, `first_wrong_char`,
    `sample_accuracy` and `split`. `split="train"` rows train the default `trl-tokenlevel dpo` job; `split="test"` rows
    come from hash-disjoint held-out problems. Made by `python -m trl_tokenlevel.data.builtin.make_demo_preference`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    text = resources.files(__package__).joinpath("demo_preference.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return Dataset.from_list([row for row in rows if row["split"] == split])


__all__ = [
    "load_demo_preference_dataset",
    "load_tiny_grpo_dataset",
    "load_tiny_preference_dataset",
    "load_tiny_sft_dataset",
]
