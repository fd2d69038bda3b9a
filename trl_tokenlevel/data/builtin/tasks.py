"""Verifiable tasks for the real demo model: arithmetic, sorting, comparing, copying, counting.

Everything is built deterministically in code (no download). Each problem belongs to exactly one split, decided by a
hash of the problem itself (not by the order it was drawn in), so `train`, `valid` and `test` stay disjoint whatever
`n`, `seed` or caller asks for them; a held-out evaluation never contains a training prompt.

A problem is asked as a short chat: `n_shots` solved examples from a fixed pool (train split) then the question, and
the expected completion is the bare answer (`"68"`, `"2, 5, 7"`). SmolLM2's tokenizer splits numbers into single
digits, so the first wrong character of a wrong answer is one token: the token a token-level method should blame.

Typical use::

    problems = make_problems("add", 200, split="train", digits=2)
    prompt = to_messages(problems[0])              # [{"role": "user", ...}, ...]
    is_correct(problems[0], "68")
    first_wrong_char(problems[0], "78")            # 0; None when correct
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

SPLITS = {"train": (0, 70), "valid": (70, 80), "test": (80, 100)}  # percent buckets of the problem hash
TASKS = ("add", "sub", "mul", "sort", "compare", "copy", "count")
_COUNT_WORDS = ("cat", "dog", "sun", "tree", "cup")


@dataclass(frozen=True)
class Problem:
    task: str
    question: str  # the user message
    answer: str  # the exact expected completion
    key: str  # what identifies the problem (operands), hashed for the split

    def to_dict(self) -> dict:
        return asdict(self)


def split_of(key: str) -> str:
    """`train`/`valid`/`test` from a stable hash of the problem key (70/10/20)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100
    return next(name for name, (low, high) in SPLITS.items() if low <= bucket < high)


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _draw(task: str, rng: random.Random, digits: int, length: int) -> Problem:
    if task in ("add", "sub", "mul"):
        a, b = _number(rng, digits), _number(rng, digits)
        if task == "sub" and b > a:
            a, b = b, a  # answers stay non-negative
        symbol = {"add": "+", "sub": "-", "mul": "*"}[task]
        value = {"add": a + b, "sub": a - b, "mul": a * b}[task]
        return Problem(task, f"{a} {symbol} {b} =", str(value), f"{task}:{a}{symbol}{b}")
    if task == "sort":
        values = [_number(rng, digits) for _ in range(length)]
        listed = ", ".join(map(str, values))
        return Problem(task, f"Sort: {listed}", ", ".join(map(str, sorted(values))), f"sort:{listed}")
    if task == "compare":
        a, b = _number(rng, digits), _number(rng, digits)
        while b == a:
            b = _number(rng, digits)
        return Problem(task, f"Larger of {a} and {b}:", str(max(a, b)), f"compare:{a},{b}")
    if task == "copy":
        values = " ".join(str(rng.randint(0, 9)) for _ in range(length))
        return Problem(task, f"Repeat: {values}", values, f"copy:{values}")
    if task == "count":
        words = [rng.choice(_COUNT_WORDS) for _ in range(length + 2)]
        target = rng.choice(words)
        listed = " ".join(words)
        return Problem(
            task, f"How many times is {target} in: {listed}", str(words.count(target)), f"count:{target}:{listed}"
        )
    raise ValueError(f"task must be one of {TASKS}, got {task!r}.")


def make_problems(
    task: str, n: int, split: str = "train", seed: int = 0, digits: int = 2, length: int = 3
) -> list[Problem]:
    """`n` distinct problems of `task` in `split`, drawn with `random.Random(seed)`.

    Args:
        task: one of `TASKS`.
        digits: digits per operand (arithmetic, compare, sort values).
        length: list length for `sort`/`copy`; `count` lists `length + 2` words.

    Raises:
        ValueError: unknown task or split, or fewer than `n` distinct problems exist in the split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}.")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    rng = random.Random(f"{task}:{digits}:{length}:{seed}")
    problems: dict[str, Problem] = {}
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(
                f"Only {len(problems)} distinct {task!r} problems with digits={digits}, length={length} fall in split "
                f"{split!r}; asked for {n}. Ask for fewer, or raise `digits`/`length`."
            )
        problem = _draw(task, rng, digits, length)
        if problem.key not in problems and split_of(problem.key) == split:
            problems[problem.key] = problem
    return list(problems.values())


def shots_for(task: str, n_shots: int, digits: int = 2, length: int = 3) -> list[Problem]:
    """The fixed solved examples shown before a question (train split, their own seed)."""
    return make_problems(task, n_shots, split="train", seed=-1, digits=digits, length=length) if n_shots else []


def to_messages(problem: Problem, n_shots: int = 2, shots: Sequence[Problem] | None = None) -> list[dict]:
    """The conversational prompt: solved examples as earlier turns, then the question."""
    if shots is None:
        shots = [shot for shot in shots_for(problem.task, n_shots + 1) if shot.key != problem.key][:n_shots]
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": shot.question}, {"role": "assistant", "content": shot.answer}]
    return messages + [{"role": "user", "content": problem.question}]


def normalize(completion: str) -> str:
    """The answer part of a completion: stripped, end-of-turn markers removed."""
    return re.sub(r"<\|im_end\|>|<\|endoftext\|>", "", completion).strip()


def is_correct(problem: Problem, completion: str) -> bool:
    return normalize(completion) == problem.answer


def first_wrong_char(problem: Problem, completion: str) -> int | None:
    """Index in `normalize(completion)` of the first character that departs from the answer; None when correct.

    A completion that stops early (a strict prefix of the answer) is wrong at its end: the index is its length, i.e.
    the end-of-turn token that should have been another character.
    """
    text = normalize(completion)
    if text == problem.answer:
        return None
    for index, (got, expected) in enumerate(zip(text, problem.answer)):
        if got != expected:
            return index
    return min(len(text), len(problem.answer))


def first_wrong_token(problem: Problem, completion_ids: Sequence[int], tokenizer) -> int | None:
    """Index in `completion_ids` of the token holding the first wrong character (None when correct).

    Found by decoding growing prefixes, so it is right for any tokenizer; leading whitespace the completion may start
    with is skipped as `normalize` skips it. A too-short answer (a strict prefix of the right one) goes wrong where it
    stops: at the first token after its last character, which under a chat template is the end-of-turn token, not the
    newline the template puts after it (the last token when nothing follows).
    """
    text = tokenizer.decode(list(completion_ids), skip_special_tokens=True)
    wrong = first_wrong_char(problem, text)
    if wrong is None:
        return None
    offset = len(text) - len(text.lstrip())
    answer_end = offset + len(normalize(text))
    inside = offset + wrong < answer_end
    # A mistake inside the text is held by the first token whose prefix covers it; one past the end of the answer by
    # the token after the one that completes the answer.
    covers = offset + wrong + 1 if inside else answer_end
    for index in range(len(completion_ids)):
        if len(tokenizer.decode(list(completion_ids[: index + 1]), skip_special_tokens=True)) >= covers:
            return index if inside else min(index + 1, len(completion_ids) - 1)
    return len(completion_ids) - 1


__all__ = [
    "Problem",
    "SPLITS",
    "TASKS",
    "first_wrong_char",
    "first_wrong_token",
    "is_correct",
    "make_problems",
    "normalize",
    "shots_for",
    "split_of",
    "to_messages",
]
