"""Reward functions for `trl.GRPOTrainer` / `TokenGRPOTrainer` (TRL's `reward_funcs` calling convention).

Every reward here is a callable `f(prompts, completions, completion_ids, **kwargs) -> list[float | None]`: TRL passes
the completions as text (or as message lists for conversational prompts), their token ids, and every dataset column
as a keyword argument (plus `trainer_state`, `log_metric` and `log_extra`). Callable classes carry a `__name__`, which
TRL uses for the `rewards/<name>/mean` metrics.

- :func:`addition_reward`: verifiable 0/1 reward for the built-in addition task (`answer` column).
- :class:`TokenBLEUReward`: TensorBLEU (spec §17) over completion token ids against reference ids or texts.
- :class:`MajorityVoteReward`: TTRL/SPINE majority-vote pseudo-reward (spec §2), no labels needed; groups prompts
  across ranks.
- :class:`SoftChoiceReward`: TW-GRPO soft multi-choice reward (spec §8).
- :class:`RMTLengthReward`: RMT triangular length reward around a decaying token budget (spec §9, [recon]);
- :class:`RMTNextTokenReward`: RMT's next-token match reward on corpus prompts (spec §9).

The math lives in `trl_tokenlevel.rewards.token_bleu` and `trl_tokenlevel.ops.advantages`; this file parses text and
adapts calling conventions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..ops.advantages import rmt_length_reward, rmt_token_budget, ttrl_majority_vote_rewards, tw_grpo_soft_reward
from .token_bleu import tensor_sentence_bleu

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or the content of the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion:
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # content blocks
            return "".join(block.get("text", "") for block in content if isinstance(block, dict))
        return str(content)
    return ""


def extract_last_number(text: str) -> str | None:
    """The last number in `text` (e.g. `"12 plus 13 is 25."` -> `"25"`), or None when there is none."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[-1]
    return value[:-2] if value.endswith(".0") else value


def extract_tagged_answer(text: str) -> str | None:
    """The content of the last `<answer>...</answer>` tag, stripped; None without a tag."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def addition_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """Verifiable reward of the built-in addition task: 1.0 if the last number of the completion equals `answer`.

    Reads the dataset column `answer` (see `trl_tokenlevel.data.builtin.grpo.load_tiny_grpo_dataset`).
    """
    return [
        1.0 if extract_last_number(completion_text(completion)) == str(gold).strip() else 0.0
        for completion, gold in zip(completions, answer, strict=True)
    ]


class TokenBLEUReward:
    """TensorBLEU as a GRPO reward: per-completion token-id BLEU against one or more references (spec §17).

    Paper: "TensorBLEU", https://huggingface.co/papers/2510.05485. Scores `completion_ids` (TRL's completion token
    ids) with `trl_tokenlevel.rewards.token_bleu.tensor_sentence_bleu`, on the ids' device, in one batched call. This
    is token-id BLEU (for rewards and development), not SacreBLEU.

    References come from the dataset column `reference_column` (default `"solution"`), per row: a string, a list of
    token ids, or a list of strings / id lists (several references). Strings are tokenized with `tokenizer`
    (`add_special_tokens=False`), which must be the policy's tokenizer. Token ids in `ignore_token_ids` (default: the
    tokenizer's EOS, which ends every terminated completion) are removed from the candidates first.

    Args:
        tokenizer: the policy tokenizer (needed only for text references).
        reference_column: dataset column with the references.
        max_n, weights, smoothing, epsilon, add_k: as in `tensor_sentence_bleu` (defaults BLEU-4, uniform weights,
            floor smoothing ε = 0.1).
        ignore_token_ids: ids dropped from candidates and references (None: the tokenizer's EOS if any).
        device: where to compute (default: CPU; pass "cuda" on GPU machines).
    """

    __name__ = "token_bleu"

    def __init__(
        self,
        tokenizer=None,
        reference_column: str = "solution",
        max_n: int = 4,
        weights: Sequence[float] | None = None,
        smoothing: str = "floor",
        epsilon: float = 0.1,
        add_k: float = 1.0,
        ignore_token_ids: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
    ):
        self.tokenizer = tokenizer
        self.reference_column = reference_column
        self.bleu_kwargs = dict(max_n=max_n, weights=weights, smoothing=smoothing, epsilon=epsilon, add_k=add_k)
        if ignore_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
            ignore_token_ids = [] if eos is None else [eos]
        self.ignore_token_ids = set(ignore_token_ids)
        self.device = torch.device(device)

    def _ids(self, reference) -> list[int]:
        if isinstance(reference, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"TokenBLEUReward got text references in column {self.reference_column!r} but no tokenizer; "
                    "pass the policy's tokenizer, or store reference token ids."
                )
            reference = self.tokenizer(reference, add_special_tokens=False)["input_ids"]
        return [int(token) for token in reference if int(token) not in self.ignore_token_ids]

    def _references(self, row) -> list[list[int]]:
        if isinstance(row, str) or (isinstance(row, (list, tuple)) and row and isinstance(row[0], int)):
            return [self._ids(row)]
        if isinstance(row, (list, tuple)):
            return [self._ids(reference) for reference in row]
        raise ValueError(f"Unsupported reference {row!r} in column {self.reference_column!r}.")

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if self.reference_column not in kwargs:
            columns = sorted(k for k in kwargs if k not in ("trainer_state", "log_metric", "log_extra"))
            raise ValueError(
                f"TokenBLEUReward reads the references from the dataset column {self.reference_column!r}, which the "
                f"batch does not have (columns: {columns})."
            )
        if completion_ids is None:
            raise ValueError("TokenBLEUReward needs `completion_ids` (TRL passes them to every reward function).")
        candidates = [[int(t) for t in ids if int(t) not in self.ignore_token_ids] for ids in completion_ids]
        references = [self._references(row) for row in kwargs[self.reference_column]]
        pad = -1  # never a real token id
        width_c = max(1, max(len(c) for c in candidates))
        num_refs = max(len(r) for r in references)
        width_r = max(1, max(len(ref) for refs in references for ref in refs))
        cand = torch.full((len(candidates), width_c), pad, dtype=torch.long)
        refs = torch.full((len(candidates), num_refs, width_r), pad, dtype=torch.long)
        for i, ids in enumerate(candidates):
            cand[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            for j, ref in enumerate(references[i]):
                refs[i, j, : len(ref)] = torch.tensor(ref, dtype=torch.long)
        scores = tensor_sentence_bleu(cand.to(self.device), refs.to(self.device), pad, **self.bleu_kwargs)
        return scores.float().cpu().tolist()


def _gather_objects(values: list) -> tuple[list, int]:
    """Concatenate a per-rank list over all ranks; returns (all values, offset of this rank's values)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, 0
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    offset = sum(len(chunk) for chunk in gathered[: dist.get_rank()])
    return [value for chunk in gathered for value in chunk], offset


class MajorityVoteReward:
    """TTRL / SPINE majority-vote pseudo-reward: `R_i = 1[y_i = mode of the group's answers]` (spec §2).

    Paper: SPINE, https://huggingface.co/papers/2511.17938 (pseudo-labels from TTRL). No labels: the completions of a
    prompt vote with their extracted answers; unparseable answers (None) get 0 and do not vote. Ties:
    `tie_break="first"` (default, first seen) or `"none"` (every answer 0). A group is the set of completions that
    share a prompt; TRL may spread a group over several ranks, so the answers are all-gathered first (every rank must
    call the reward, as TRL does). Two groups of the same prompt in one batch vote together.

    Args:
        extract_answer: text -> hashable answer or None (default: the last number, `extract_last_number`).
        tie_break: `"first"` or `"none"`.
    """

    __name__ = "majority_vote"

    def __init__(
        self, extract_answer: Callable[[str], Hashable | None] = extract_last_number, tie_break: str = "first"
    ):
        self.extract_answer = extract_answer
        self.tie_break = tie_break

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        answers = [self.extract_answer(completion_text(completion)) for completion in completions]
        keys = [repr(prompt) for prompt in prompts]
        all_pairs, offset = _gather_objects(list(zip(keys, answers)))
        groups: dict[str, list[int]] = {}
        for index, (key, _) in enumerate(all_pairs):
            groups.setdefault(key, []).append(index)
        rewards = [0.0] * len(all_pairs)
        for rows in groups.values():
            votes = ttrl_majority_vote_rewards([all_pairs[i][1] for i in rows], tie_break=self.tie_break)
            for row, vote in zip(rows, votes.tolist()):
                rewards[row] = vote
        return rewards[offset : offset + len(completions)]


class SoftChoiceReward:
    """TW-GRPO soft multi-choice reward (spec §8, official `accuracy_reward`).

    Paper: https://huggingface.co/papers/2505.24718. 1.0 if the answer is verified, otherwise `|A|/|G*|` when the
    predicted comma-separated set A is a subset of the gold set G*, else 0. The predicted answer is the last
    `<answer>...</answer>` tag, or the last number when there is no tag (`extract_answer` overrides this).
    "Verified" is exact equality of the normalised answer sets; the official code's symbolic check
    (`math_verify`) is used when that package is installed.

    Args:
        answer_column: dataset column with the gold answer (default `"answer"`).
        extract_answer: text -> answer string or None.
    """

    __name__ = "soft_choice"

    def __init__(self, answer_column: str = "answer", extract_answer: Callable[[str], str | None] | None = None):
        self.answer_column = answer_column
        self.extract_answer = extract_answer or (lambda text: extract_tagged_answer(text) or extract_last_number(text))
        try:  # optional symbolic verification, as in the official code
            from math_verify import parse, verify

            self._symbolic = lambda gold, pred: bool(verify(parse(gold), parse(pred)))
        except ImportError:
            self._symbolic = None

    @staticmethod
    def _normalized_set(text: str) -> frozenset[str]:
        return frozenset(item.strip().lower() for item in text.split(",") if item.strip())

    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float]:
        if self.answer_column not in kwargs:
            raise ValueError(f"SoftChoiceReward reads the gold answer from the column {self.answer_column!r}.")
        rewards = []
        for completion, gold in zip(completions, kwargs[self.answer_column], strict=True):
            predicted = self.extract_answer(completion_text(completion))
            if predicted is None:
                rewards.append(0.0)
                continue
            gold = str(gold)
            verified = self._normalized_set(predicted) == self._normalized_set(gold)
            if not verified and self._symbolic is not None:
                verified = self._symbolic(gold, predicted)
            rewards.append(tw_grpo_soft_reward(predicted, gold, verified=verified))
        return rewards


class RMTLengthReward:
    """RMT length reward around a token budget that shrinks during training (spec §9; [recon] shape, no defaults).

    Paper: "Reinforcement Mid-Training", https://huggingface.co/papers/2509.24375. At optimizer step t of T
    (`trainer_state.global_step`, `trainer_state.max_steps`, or `total_steps` when given):
    `B_t = max(B_min, B_0·γ^x)` (`rmt_token_budget`, exponent form as a knob), and the reward of a completion of
    length ℓ tokens is `weight · max(0, 1 − |ℓ − B_t|/width)` (`rmt_length_reward`, width defaults to B_t). The budget
    is logged as `rmt/budget` through TRL's `log_metric`.
    """

    __name__ = "rmt_length"

    def __init__(
        self,
        budget_init: int,
        budget_min: int = 1,
        gamma: float = 0.5,
        k: float = 1.0,
        exponent_form: str = "as_rendered",
        weight: float = 1.0,
        width: float | None = None,
        total_steps: int | None = None,
    ):
        self.budget_kwargs = dict(budget_init=budget_init, budget_min=budget_min, gamma=gamma, k=k,
                                  exponent_form=exponent_form)  # fmt: skip
        self.weight = weight
        self.width = width
        self.total_steps = total_steps

    def budget(self, step: int, total_steps: int) -> int:
        return rmt_token_budget(step, max(total_steps, 1), **self.budget_kwargs)

    def __call__(self, prompts=None, completions=None, completion_ids=None, trainer_state=None, log_metric=None,
                 **kwargs) -> list[float]:  # fmt: skip
        step = trainer_state.global_step if trainer_state is not None else 0
        total = self.total_steps or (trainer_state.max_steps if trainer_state is not None else 1)
        budget = self.budget(step, total)
        if log_metric is not None:
            log_metric("rmt/budget", float(budget))
        lengths = torch.tensor([len(ids) for ids in completion_ids], dtype=torch.float32)
        rewards = self.weight * rmt_length_reward(lengths, float(budget), length_reward_width=self.width)
        return rewards.tolist()


class RMTNextTokenReward:
    """RMT's verifiable reward: 1 when the completion's predicted next token matches the corpus token (spec §9).

    Paper: https://huggingface.co/papers/2509.24375. The prediction is the last `<answer>...</answer>` of the
    completion (`extract_answer`, default :func:`extract_tagged_answer`), compared with the dataset column
    `rmt_target` (built by `trl_tokenlevel.data.rmt.build_rmt_dataset`) after stripping whitespace; no answer: 0.
    """

    __name__ = "rmt_next_token"

    def __init__(self, extract_answer: Callable[[str], str | None] | None = None):
        self.extract_answer = extract_answer or extract_tagged_answer

    def __call__(self, prompts=None, completions=None, rmt_target=None, **kwargs) -> list[float]:
        if rmt_target is None:
            raise ValueError("RMTNextTokenReward needs the dataset column `rmt_target` (see build_rmt_dataset).")
        rewards = []
        for completion, target in zip(completions, rmt_target, strict=True):
            answer = self.extract_answer(completion_text(completion))
            rewards.append(float(answer is not None and answer.strip() == str(target).strip()))
        return rewards
