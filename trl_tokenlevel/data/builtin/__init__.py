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


__all__ = ["load_tiny_grpo_dataset", "load_tiny_preference_dataset", "load_tiny_sft_dataset"]
