"""GRPO reward functions (`trl_tokenlevel.rewards.grpo_rewards`): spec worked examples through TRL's calling convention,
and the built-in task's verifiable reward."""

from __future__ import annotations

import pytest

from trl_tokenlevel.data.builtin.grpo import load_tiny_grpo_dataset
from trl_tokenlevel.rewards.grpo_rewards import (
    MajorityVoteReward,
    RMTLengthReward,
    SoftChoiceReward,
    TokenBLEUReward,
    addition_reward,
    extract_last_number,
)


class _State:
    def __init__(self, global_step, max_steps):
        self.global_step, self.max_steps = global_step, max_steps


def test_token_bleu_spec_example():
    """Spec §17: candidate [1,2,3,4,5] vs reference [1,2,3,5,6], floor ε = 0.1 → 0.285744."""
    reward = TokenBLEUReward(reference_column="reference", ignore_token_ids=[])
    scores = reward(prompts=["p"], completions=["c"], completion_ids=[[1, 2, 3, 4, 5]], reference=[[1, 2, 3, 5, 6]])
    assert scores == pytest.approx([0.285744], abs=5e-7)


def test_token_bleu_text_references_and_eos(tiny_tokenizer):
    reward = TokenBLEUReward(tiny_tokenizer)  # reads the `solution` column, drops EOS from candidates
    solution = " 12 plus 13 is 25."
    ids = tiny_tokenizer(solution, add_special_tokens=False)["input_ids"]
    other = tiny_tokenizer(" dog fish tree.", add_special_tokens=False)["input_ids"]
    scores = reward(prompts=["p", "p"], completions=["", ""], completion_ids=[ids + [tiny_tokenizer.eos_token_id], other],
                    solution=[solution, solution])  # fmt: skip
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] < 0.2
    # Several references per row: the best-matching counts are clipped per n-gram over references.
    multi = reward(prompts=["p"], completions=[""], completion_ids=[other], solution=[[solution, " dog fish tree."]])
    assert multi == pytest.approx([1.0])


def test_majority_vote_spec_example():
    """Spec §2: answers ["42", "41", "42", "42", None] → majority "42", rewards [1, 0, 1, 1, 0]."""
    completions = [" it is 42.", " 41", "so 42", "42", "no idea"]
    rewards = MajorityVoteReward()(prompts=["q"] * 5, completions=completions)
    assert rewards == [1.0, 0.0, 1.0, 1.0, 0.0]
    # Two prompts vote separately; conversational completions are read from the last message.
    conversational = [[{"role": "assistant", "content": text}] for text in ("1", "1", "2", "3", "3", "3")]
    rewards = MajorityVoteReward()(prompts=["a", "a", "a", "b", "b", "b"], completions=conversational)
    assert rewards == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert MajorityVoteReward(tie_break="none")(prompts=["q"] * 2, completions=["1", "2"]) == [0.0, 0.0]


def test_soft_choice_reward():
    reward = SoftChoiceReward()
    completions = ["<answer>A, B</answer>", "<answer>A,B,C</answer>", "<answer>A, D</answer>", "none", "It is 5"]
    gold = ["A, B, C", "A, B, C", "A, B, C", "A", "5"]
    assert reward(completions=completions, answer=gold) == pytest.approx([2 / 3, 1.0, 0.0, 0.0, 1.0])


def test_addition_reward_on_builtin_task():
    dataset = load_tiny_grpo_dataset()
    assert len(dataset) == 240 and set(dataset.column_names) == {"prompt", "answer", "solution"}
    row = dataset[0]
    assert extract_last_number(row["solution"]) == row["answer"]
    rewards = addition_reward(completions=[row["solution"], " 1 plus 1 is 3.", ""], answer=[row["answer"], "2", "2"])
    assert rewards == [1.0, 0.0, 0.0]
    conversational = load_tiny_grpo_dataset("conversational")
    assert conversational[0]["prompt"] == [{"role": "user", "content": row["prompt"]}]


def test_rmt_length_reward_budget_schedule():
    """Spec §9 worked example (as rendered, B_0 = 1024, B_min = 64, γ = 0.5, k = 1, T = 100): B(0) = 1024,
    B(100) = 512; the triangular reward peaks at the budget."""
    reward = RMTLengthReward(1024, budget_min=64, gamma=0.5)
    assert reward.budget(0, 100) == 1024 and reward.budget(100, 100) == 512
    logged = {}
    values = reward(completion_ids=[[0] * 512, [0] * 256, [0] * 2000], trainer_state=_State(100, 100),
                    log_metric=logged.__setitem__)  # fmt: skip
    assert values == pytest.approx([1.0, 0.5, 0.0])
    assert logged == {"rmt/budget": 512.0}
