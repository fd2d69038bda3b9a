"""The shipped demo preference pairs (`demo_preference.jsonl`) and the first-wrong-token measurement of the demo job."""

from __future__ import annotations

import pytest

from trl_tokenlevel.data.builtin import load_demo_preference_dataset
from trl_tokenlevel.data.builtin.make_demo_preference import heldout_problems, train_problems
from trl_tokenlevel.data.builtin.tasks import split_of


@pytest.mark.parametrize("split", ["train", "test"])
def test_pairs_are_labelled_by_correctness(split):
    rows = load_demo_preference_dataset(split)
    assert len(rows) > 10
    for row in rows:
        assert row["chosen"][0]["content"] == row["answer"]
        assert row["rejected"][0]["content"].strip() != row["answer"]
        assert split_of(row["key"]) == split


def test_training_pairs_come_from_the_generator_problems_and_never_from_heldout_ones():
    train_keys = set(load_demo_preference_dataset("train")["key"])
    heldout_keys = {problem.key for problem in heldout_problems()}
    assert train_keys <= {problem.key for problem in train_problems()}
    assert set(load_demo_preference_dataset("test")["key"]) <= heldout_keys
    assert not train_keys & heldout_keys


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be"):
        load_demo_preference_dataset("valid")


@pytest.mark.real_model
def test_most_negative_token_reward_is_compared_with_the_first_wrong_token(demo_model_folder):
    from transformers import AutoTokenizer

    from trl_tokenlevel.scripts.demo import most_negative_on_first_wrong

    tokenizer = AutoTokenizer.from_pretrained(demo_model_folder)
    row = {"prompt": [{"role": "user", "content": "Larger of 71 and 32:"}], "task": "compare", "answer": "71",
           "key": "compare:71,32"}  # fmt: skip
    ids = tokenizer("72<|im_end|>\n", add_special_tokens=False)["input_ids"]  # "7", "2", end of turn, "\n"
    assert len(ids) == 4
    on_wrong = [0.1, -0.9, -0.2, 0.0]  # the first wrong token is "2"
    elsewhere = [-0.9, -0.1, -0.2, 0.0]
    hits, total, chance = most_negative_on_first_wrong([row, row], [ids, ids], [on_wrong, elsewhere], tokenizer)
    assert (hits, total) == (1, 2) and chance == pytest.approx(0.25)
