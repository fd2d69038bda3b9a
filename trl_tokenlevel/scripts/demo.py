"""What the default jobs on the demo model (SmolLM2-135M-Instruct) share: the model, held-out greedy accuracy, and
where a rejected answer first goes wrong.

The held-out problems are `make_demo_preference.heldout_problems()`: test-split problems (or, to choose settings,
valid-split ones), hash-disjoint from every training row. Every rank runs these evaluations (sharded models need all
ranks in each forward); only the main process prints.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from trl_tokenlevel.data.builtin.make_demo_preference import MAX_NEW_TOKENS, N_SHOTS, heldout_problems
from trl_tokenlevel.data.builtin.tasks import Problem, first_wrong_token, is_correct, to_messages


def problem_of(row: dict) -> Problem:
    """The `Problem` behind a built-in preference row (its question is the last user message)."""
    question = [message for message in row["prompt"] if message["role"] == "user"][-1]["content"]
    return Problem(row["task"], question, row["answer"], row["key"])


class HeldoutAccuracy(NamedTuple):
    """Greedy exact-match accuracy on the held-out "Larger of a and b:" problems, overall and by where the larger number
    stands. The base model favours one position, and the test and valid problem sets hold different shares of each, so
    a change of that bias alone moves the overall accuracy; `balanced` (the mean of the two) does not reward it."""

    overall: float
    first: float  # problems whose larger number comes first
    second: float
    n_first: int
    n_second: int

    @property
    def n(self) -> int:
        return self.n_first + self.n_second

    @property
    def balanced(self) -> float:
        return (self.first + self.second) / 2


def larger_comes_first(problem: Problem) -> bool:
    return re.findall(r"\d+", problem.question)[0] == problem.answer


def greedy_accuracy(model, tokenizer, problems: list[Problem]) -> HeldoutAccuracy:
    """Exact-match accuracy of greedy answers to `problems` (compare problems), overall and by position."""
    from trl_tokenlevel.data.onpolicy import sample_completions

    prompts = [to_messages(problem, n_shots=N_SHOTS) for problem in problems]
    answers = sample_completions(model, tokenizer, prompts, num_samples=1, temperature=0.0,
                                 max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts))  # fmt: skip
    right = [is_correct(problem, group[0]) for problem, group in zip(problems, answers, strict=True)]
    in_front = [larger_comes_first(problem) for problem in problems]
    first = [ok for ok, front in zip(right, in_front) if front]
    second = [ok for ok, front in zip(right, in_front) if not front]
    return HeldoutAccuracy(sum(right) / len(right), sum(first) / max(len(first), 1), sum(second) / max(len(second), 1),
                           len(first), len(second))  # fmt: skip


def print_heldout_accuracy(
    trainer, tokenizer, when: str, split: str = "test", before: HeldoutAccuracy | None = None
) -> HeldoutAccuracy:
    """Measure `greedy_accuracy` of the trainer's model on the held-out problems of `split` ("test", or "valid" for
    choosing settings) and print it (main process), with the accuracy by position of the larger number."""
    accuracy = greedy_accuracy(trainer.model, tokenizer, heldout_problems(split))
    name = "Held-out" if split == "test" else "Validation"
    change = "" if before is None else f" (before training: {before.overall:.1%})"
    balanced_change = "" if before is None else f" (before training: {before.balanced:.1%})"
    trainer.accelerator.print(
        f"{name} greedy accuracy {when} ({accuracy.n} problems): {accuracy.overall:.1%}{change}\n"
        f"  larger number first: {accuracy.first:.1%} of {accuracy.n_first}, second: {accuracy.second:.1%} of "
        f"{accuracy.n_second}; balanced accuracy {accuracy.balanced:.1%}{balanced_change}"
    )
    return accuracy


def most_negative_on_first_wrong(rows, rejected_ids: list[list[int]], rejected_rewards: list[list[float]], tokenizer):
    """`(hits, total, chance)`: in how many rejected answers the most negative token reward sits on the first wrong
    token (`tasks.first_wrong_token`), and the hit rate of a token picked uniformly at random from each answer."""
    hits, chance = 0, 0.0
    for row, ids, rewards in zip(rows, rejected_ids, rejected_rewards, strict=True):
        wrong = first_wrong_token(problem_of(row), ids, tokenizer)
        hits += int(min(range(len(rewards)), key=rewards.__getitem__) == wrong)
        chance += 1 / len(rewards)
    return hits, len(rejected_ids), chance / max(len(rejected_ids), 1)


def training_problem_dataset(with_completion: bool):
    """The training problems of the demo data as a conversational dataset: `prompt` and `answer` (GRPO's prompt-only
    format; rewards read `answer`), plus the gold `completion` with `with_completion` (SFT's prompt-completion)."""
    from datasets import Dataset

    from trl_tokenlevel.data.builtin.make_demo_preference import train_problems

    rows = []
    for problem in train_problems():
        row = {"prompt": to_messages(problem, n_shots=N_SHOTS), "answer": problem.answer}
        if with_completion:
            row["completion"] = [{"role": "assistant", "content": problem.answer}]
        rows.append(row)
    return Dataset.from_list(rows)
