"""`trl_tokenlevel.scripts.sft`: built-in tiny job per method, YAML configs, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from trl_tokenlevel.scripts import sft


@pytest.fixture(autouse=True, scope="module")
def _frozen_gc():
    # `Trainer.train()` ends with `gc.collect()`, whose cost grows with every object the session has created.
    import gc

    gc.freeze()
    yield
    gc.unfreeze()


def run(argv):
    return sft.main(*sft.parse_args(["--tiny", *argv]))


@pytest.mark.parametrize(
    "extra",
    [[], ["--token_loss_type", "otr", "--otr_num_samples", "16"], ["--token_selection", "sstoken"],
     ["--token_loss_type", "chord_phi"]],
    ids=["stock", "otr", "sstoken", "chord_phi"],
)  # fmt: skip
def test_builtin_tiny_job(extra, tmp_path):
    out = tmp_path / "run"
    trainer = run(["--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1", *extra])
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert trainer.state.global_step == 2
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_yaml_config_and_flag_override(tmp_path):
    config = tmp_path / "config.yaml"
    out = tmp_path / "run"
    config.write_text(f"output_dir: {out}\nmax_steps: 2\ntoken_loss_type: otr\notr_num_samples: 4\notr_beta: -0.3\n")
    run(["--config", str(config), "--otr_beta", "-0.2"])
    args = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
    assert args.otr_beta == -0.2 and args.otr_num_samples == 4 and args.max_steps == 2


def test_weighted_without_column_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="needs a 'token_weights' column"):
        run(["--output_dir", str(tmp_path), "--max_steps", "1", "--token_loss_type", "weighted"])
