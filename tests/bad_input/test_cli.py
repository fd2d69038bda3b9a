"""The command line: bad flags, values and files fail while parsing, naming the flag (or file) and the fix, before any
model is built or anything is written."""

from __future__ import annotations

import re

import pytest

from trl_tokenlevel.cli import main

from .support import assert_refused, output_dir_with_checkpoint

# (command line after the output folder, exception, names, fix)
CASES = {
    "dpo_negative_tdpo_alpha": (["dpo", "--token_loss_type", "tdpo2", "--tdpo_alpha", "-1"], ValueError,
                                ["tdpo_alpha=-1.0"], r"Set tdpo_alpha"),
    "dpo_beta_zero": (["dpo", "--token_loss_type", "cdpo", "--beta", "0"], ValueError, ["beta=0.0"], r"Set beta"),
    "grpo_pivot": (["grpo", "--hapo_entropy_pivot", "1.5"], ValueError, ["hapo_entropy_pivot=1.5"],
                   r"Set hapo_entropy_pivot"),
    "grpo_band_order": (["grpo", "--band_low", "3", "--band_high", "1"], ValueError, ["band_low=3.0", "band_high=1.0"],
                        r"Set band_low <= band_high"),
    "sft_otr_samples": (["sft", "--otr_num_samples", "0"], ValueError, ["otr_num_samples=0"], r"Set otr_num_samples"),
    "sft_negative_otr_coef": (["sft", "--token_loss_type", "otr", "--otr_coef", "-2"], ValueError, ["otr_coef=-2.0"],
                              r"Set otr_coef"),
    "route_missing_router": (["route", "generate", "--router_path", "{tmp}/no-router"], FileNotFoundError,
                             ["no-router"], r"route train-router"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_cli_value(case, tmp_path, capsys):
    argv, exception, names, fix = CASES[case]
    out = output_dir_with_checkpoint(tmp_path)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in [*argv, "--output_dir", out]]
    # With --debug the exception itself propagates (its type is checked) ...
    assert_refused(lambda: main([*argv, "--debug"]), exception, out, names, fix)
    # ... without it the user sees one line naming the same field and fix, and exit status 1.
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert all(name in error for name in names) and re.search(fix, error), error


@pytest.mark.parametrize("argv,flag", [(["dpo", "--token_loss_type", "tdpo9"], "--token_loss_type"),
                                       (["dpo", "--beta", "high"], "--beta"),
                                       (["sft", "--otr_estimator", "exact"], "--otr_estimator")])  # fmt: skip
def test_cli_flag_type_or_choice(argv, flag, tmp_path, capsys):
    """argparse refuses a wrong type or choice with exit status 2, naming the flag and (for choices) the valid ones."""
    out = output_dir_with_checkpoint(tmp_path)
    assert_refused(lambda: main([*argv, "--output_dir", out]), SystemExit, out, [], r"2")
    error = capsys.readouterr().err
    assert flag in error and ("invalid choice" in error or "invalid" in error), error
