"""SPINE's TTRL majority-vote pseudo-reward (spec §2).

``R_i = 1[y_i = mode({y_j})]`` over one prompt's sampled answers; see :func:`ttrl_majority_vote_rewards`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import torch

from trl_tokenlevel.ops.selection import _check_choice

VOTE_TIE_BREAKS = ("first", "none")


def ttrl_majority_vote_rewards(answers: Sequence[Hashable | None], *, tie_break: str = "first") -> torch.Tensor:
    """TTRL majority-vote pseudo-rewards ``R_i = 1[y_i = mode({y_j})]`` for one prompt's sampled answers (spec §2).

    Paper: SPINE, https://huggingface.co/papers/2511.17938 (pseudo-labels from TTRL). ``None`` marks an unparseable
    answer: it gets 0 and does not vote. Ties between the most frequent answers: ``tie_break="first"`` (default) picks
    the first seen; ``"none"`` gives every answer 0. No parseable answer: all zeros (the caller skips the group).
    Returns float32 rewards (G,).
    """
    _check_choice("tie_break", tie_break, VOTE_TIE_BREAKS)
    votes = Counter(answer for answer in answers if answer is not None)
    rewards = torch.zeros(len(answers))
    if not votes:
        return rewards
    top = max(votes.values())
    leaders = [answer for answer in votes if votes[answer] == top]  # Counter keeps first-seen order
    if len(leaders) > 1 and tie_break == "none":
        return rewards
    majority = leaders[0]
    for i, answer in enumerate(answers):
        if answer is not None and answer == majority:
            rewards[i] = 1.0
    return rewards
