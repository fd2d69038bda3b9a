"""The `trl-tokenlevel` command: built-in tiny job, token losses with offline signals, YAML configs."""

from __future__ import annotations

import os

import pytest

from trl_tokenlevel.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "dpo" in capsys.readouterr().out


def test_unknown_command_fails(capsys):
    assert main(["ppo"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--token_loss_type", "treg", "--token_signal", "treg"]])
def test_builtin_tiny_job(extra, tmp_path):
    out = tmp_path / "run"
    assert main(["dpo", "--tiny", "--output_dir", str(out), "--max_steps", "3", "--heatmap_examples", "2", *extra]) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    page = (out / "token_rewards.html").read_text()
    assert page.count("class='row'") == 4  # 2 held-out pairs, chosen and rejected


def test_yaml_config_and_flag_override(tmp_path):
    config = tmp_path / "config.yaml"
    out = tmp_path / "run"
    config.write_text(f"output_dir: {out}\nmax_steps: 2\nbeta: 0.3\nheatmap_examples: 1\n")
    assert main(["dpo", "--tiny", "--config", str(config), "--beta", "0.2"]) == 0
    args = __import__("torch").load(os.path.join(out, "training_args.bin"), weights_only=False)
    assert args.beta == 0.2 and args.max_steps == 2


def test_token_loss_without_signal_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="rejected_token_weights"):
        main(["dpo", "--tiny", "--output_dir", str(tmp_path), "--max_steps", "1", "--token_loss_type", "cdpo"])
