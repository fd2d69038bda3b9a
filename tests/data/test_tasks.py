"""Built-in verifiable tasks and on-policy preference pairs."""

import pytest
from transformers import AutoTokenizer

from trl_tokenlevel.data.builtin import tasks
from trl_tokenlevel.data.onpolicy import accuracy, build_preference_pairs, sample_completions


@pytest.mark.parametrize("task", tasks.TASKS)
def test_splits_are_disjoint_and_deterministic(task):
    train = tasks.make_problems(task, 40, split="train", digits=2)
    test = tasks.make_problems(task, 20, split="test", digits=2, seed=5)
    assert {p.key for p in train}.isdisjoint({p.key for p in test})
    assert len({p.key for p in train}) == 40
    assert train == tasks.make_problems(task, 40, split="train", digits=2)
    assert all(tasks.split_of(p.key) == "test" for p in test)
    assert all(tasks.is_correct(p, p.answer) for p in train + test)


def test_answers_are_the_arithmetic():
    for p in tasks.make_problems("add", 10, digits=3) + tasks.make_problems("sub", 10) + tasks.make_problems("mul", 10):
        a, symbol, b, _ = p.question.split()
        assert int(p.answer) == eval(f"{int(a)} {symbol} {int(b)}")  # noqa: S307 - our own digits
    for p in tasks.make_problems("sort", 10, length=4):
        values = [int(v) for v in p.question.removeprefix("Sort: ").split(", ")]
        assert p.answer == ", ".join(map(str, sorted(values)))


def test_too_many_problems_for_a_small_space_is_a_clear_error():
    with pytest.raises(ValueError, match="Ask for fewer"):
        tasks.make_problems("add", 100, split="test", digits=1)


def test_first_wrong_char_and_token():
    problem = tasks.Problem("add", "47 + 38 =", "85", "add:47+38")
    assert tasks.first_wrong_char(problem, " 85<|im_end|>") is None
    assert tasks.first_wrong_char(problem, "75") == 0
    assert tasks.first_wrong_char(problem, "86") == 1
    assert tasks.first_wrong_char(problem, "8") == 1  # stopped early: the end of turn is the mistake
    assert tasks.first_wrong_char(problem, "851") == 2


@pytest.mark.real_model
def test_first_wrong_token_on_the_demo_tokenizer(demo_model_folder):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_folder)
    problem = tasks.Problem("sort", "Sort: 7, 2, 5", "2, 5, 7", "sort:7, 2, 5")
    ids = tokenizer("2, 7, 5", add_special_tokens=False)["input_ids"]
    index = tasks.first_wrong_token(problem, ids, tokenizer)
    assert tokenizer.decode(ids[index]).strip() == "7"
    assert tasks.first_wrong_token(problem, tokenizer("2, 5, 7")["input_ids"], tokenizer) is None


@pytest.mark.real_model
def test_a_too_short_answer_goes_wrong_at_the_end_of_turn_token(demo_model_folder):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_folder)
    problem = tasks.Problem("compare", "Larger of 72 and 22:", "72", "compare:72,22")
    # As the DPO collator sees a ChatML completion: the answer, <|im_end|>, then the template's newline.
    ids = tokenizer("7<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[tasks.first_wrong_token(problem, ids, tokenizer)]) == "<|im_end|>"
    # Nothing after the answer: the last token is the best guess.
    assert tasks.first_wrong_token(problem, tokenizer("7", add_special_tokens=False)["input_ids"], tokenizer) == 0
    wrong_digit = tokenizer("73<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(wrong_digit[tasks.first_wrong_token(problem, wrong_digit, tokenizer)]) == "3"


def test_messages_have_the_shots_then_the_question():
    problem = tasks.make_problems("add", 1, split="test")[0]
    messages = tasks.to_messages(problem, n_shots=2)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == problem.question
    shots = tasks.shots_for("add", 2)
    assert [messages[0]["content"], messages[1]["content"]] == [shots[0].question, shots[0].answer]
    assert all(tasks.split_of(shot.key) == "train" for shot in shots)


def test_pairs_take_a_right_and_a_wrong_sample():
    problems = tasks.make_problems("add", 3, digits=1)
    right = [p.answer for p in problems]
    samples = [[right[0], "99", "98"], ["1" + right[1], "5" + right[1]], [right[2], right[2]]]
    rows = build_preference_pairs(problems, samples)
    assert len(rows) == 1  # the second has no right sample, the third no wrong one
    assert rows[0]["chosen"][0]["content"] == right[0] and rows[0]["rejected"][0]["content"] in ("99", "98")
    assert rows[0]["sample_accuracy"] == pytest.approx(1 / 3)
    rows = build_preference_pairs(problems, samples, fallback_to_gold=True)
    assert [r["chosen_source"] for r in rows] == ["policy", "gold"]
    assert accuracy(problems, right) == 1.0


def test_sampling_is_seeded_and_greedy_repeats(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = [tasks.to_messages(p, n_shots=0) for p in tasks.make_problems("add", 3, digits=1)]
    first = sample_completions(model, tokenizer, prompts, num_samples=3, max_new_tokens=4, seed=1)
    again = sample_completions(model, tokenizer, prompts, num_samples=3, max_new_tokens=4, seed=1, batch_size=3)
    assert len(first) == 3 and all(len(group) == 3 for group in first)
    assert first == again
    greedy = sample_completions(model, tokenizer, prompts, num_samples=2, temperature=0, max_new_tokens=4)
    assert all(group[0] == group[1] for group in greedy)
    assert tokenizer.padding_side == "right"
