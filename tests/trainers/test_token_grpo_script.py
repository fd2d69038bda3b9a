"""`trl_tokenlevel/scripts/grpo.py`: the built-in tiny job, method flags, YAML configs and the example script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from trl_tokenlevel.scripts import grpo

FAST = ["--tiny", "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2",
        "--max_completion_length", "8", "--logging_steps", "1"]  # fmt: skip


def test_builtin_tiny_job_with_a_method(tmp_path):
    out = tmp_path / "run"
    trainer = grpo.main(*grpo.parse_args(["--output_dir", str(out), *FAST, "--token_selection", "entropy_quantile"]))
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/addition_reward/mean", "rewards/token_bleu/mean", "token/selected_frac"} <= logged


def test_yaml_config_flag_override_and_chord_on_builtin_data(tmp_path):
    config = tmp_path / "config.yaml"
    out = tmp_path / "run"
    config.write_text(f"output_dir: {out}\ntoken_advantage: tempo\nchord: true\nbeta: 0.3\n")
    trainer = grpo.main(*grpo.parse_args(["--config", str(config), *FAST, "--beta", "0.0"]))
    args = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
    assert args.beta == 0.0 and args.token_advantage == "tempo" and args.max_steps == 2
    assert any("chord/mu" in entry for entry in trainer.state.log_history)  # built-in solutions are the expert data


def test_unknown_reward_function_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        grpo.main(*grpo.parse_args(["--output_dir", str(tmp_path), *FAST, "--reward_funcs", "nope"]))


@pytest.mark.slow
def test_example_runs(tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "grpo_verifiable_reward.py")
    result = subprocess.run([sys.executable, example, "--output_dir", str(tmp_path), "--steps", "2", "--method", "hapo"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward" in result.stdout
