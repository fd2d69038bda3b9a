"""What the default jobs on the demo model (SmolLM2-135M-Instruct) share: the model, held-out greedy accuracy, and
where a rejected answer first goes wrong.

The held-out problems are `make_demo_preference.heldout_problems()`: test-split problems (or, to choose settings,
valid-split ones), hash-disjoint from every training row. Every rank runs these evaluations (sharded models need all ranks in each forward); only the main process
prints.
"""

from __future__ import annotations

from trl_tokenlevel.data.builtin.make_demo_preference import MAX_NEW_TOKENS, N_SHOTS, heldout_problems
from trl_tokenlevel.data.builtin.tasks import Problem, first_wrong_token, to_messages


def problem_of(row: dict) -> Problem:
    """The `Problem` behind a built-in preference row (its question is the last user message)."""
    question = [message for message in row["prompt"] if message["role"] == "user"][-1]["content"]
    return Problem(row["task"], question, row["answer"], row["key"])


def greedy_accuracy(model, tokenizer, problems: list[Problem]) -> tuple[float, int]:
    """`(accuracy, n)`: exact-match accuracy of greedy answers to `problems`."""
    from trl_tokenlevel.data.onpolicy import accuracy, sample_completions

    prompts = [to_messages(problem, n_shots=N_SHOTS) for problem in problems]
    answers = sample_completions(model, tokenizer, prompts, num_samples=1, temperature=0.0,
                                 max_new_tokens=MAX_NEW_TOKENS, batch_size=len(prompts))  # fmt: skip
    return accuracy(problems, [group[0] for group in answers]), len(problems)


def print_heldout_accuracy(trainer, tokenizer, when: str, split: str = "test", before: float | None = None) -> float:
    """Measure `greedy_accuracy` of the trainer's model on the held-out problems of `split` ("test", or "valid" for
    choosing settings) and print it (main process); returns the accuracy."""
    accuracy, n = greedy_accuracy(trainer.model, tokenizer, heldout_problems(split))
    change = "" if before is None else f" (before training: {before:.1%})"
    name = "Held-out" if split == "test" else "Validation"
    trainer.accelerator.print(f"{name} greedy accuracy {when} ({n} problems): {accuracy:.1%}{change}")
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
