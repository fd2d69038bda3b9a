"""The SFT and RL claims experiments: their reward, verdict and config checks (fast, no model).

Their `--quick` forms run with the real model in `tests/test_claims.py`."""

import pytest

from bench.claims import rl, sft
from bench.claims.common import mean_ci


def test_correctness_reward_is_exact_match_on_conversational_and_plain_completions():
    completions = [[{"role": "assistant", "content": " 42<|im_end|>"}], [{"role": "assistant", "content": "41"}], "42"]
    assert rl.correctness_reward(completions, answer=["42", "42", "42"]) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("differences", "expected"),
    [
        ([0.0, 0.02, -0.01], "reproduced"),  # CI inside (-0.05, +inf): matches
        ([0.2, 0.3, 0.25], "reproduced"),  # beats
        ([-0.3, -0.25, -0.35], "not reproduced"),  # whole CI below 0
        ([-0.3, 0.3, 0.0], "inconclusive"),  # too wide to tell
    ],
)
def test_non_inferiority_verdict(differences, expected):
    assert rl.non_inferiority(mean_ci(differences), margin=0.05) == expected
    assert rl.non_inferiority(mean_ci(differences[:1]), margin=0.05) == "inconclusive"  # one seed is no result


@pytest.mark.parametrize(("module", "baseline"), [(sft, "sft"), (rl, "grpo")])
def test_methods_must_start_with_the_baseline(module, baseline, monkeypatch):
    others = [m for m in module.METHOD_ARGS if m != baseline]
    monkeypatch.setenv("BENCH_CLAIMS_SET", f'{{"methods": {others[:1]!r}}}'.replace("'", '"'))
    with pytest.raises(ValueError, match=f"start with the baseline '{baseline}'"):
        module.run(quick=True, seeds=[0])
