"""The `trl-tokenlevel` command: built-in tiny job, token losses with offline signals, YAML configs."""

from __future__ import annotations

import os
import re

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


def test_token_loss_without_signal_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRL_TOKENLEVEL_DEBUG", raising=False)
    argv = ["dpo", "--tiny", "--output_dir", str(tmp_path), "--max_steps", "1", "--token_loss_type", "cdpo"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "trl-tokenlevel dpo: error:" in err and "rejected_token_weights" in err and "--debug" in err
    assert "Traceback" not in err
    # With the debug flag (anywhere on the line) or variable, the exception and its traceback come through.
    with pytest.raises(ValueError, match="rejected_token_weights"):
        main([*argv, "--debug"])
    monkeypatch.setenv("TRL_TOKENLEVEL_DEBUG", "1")
    with pytest.raises(ValueError, match="rejected_token_weights"):
        main(argv)


def test_env_lists_the_stack(capsys):
    import torch
    import trl

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^- torch: +{re.escape(torch.__version__)}$", out, re.M)
    assert re.search(rf"^- trl: +{re.escape(trl.__version__)}$", out, re.M)
    assert torch.__version__ in out and trl.__version__ in out and "Accelerator:" in out and "bitsandbytes:" in out


def test_local_jsonl_dataset(tiny_preference_dataset, tmp_path):
    data = tmp_path / "pairs.jsonl"
    tiny_preference_dataset.select(range(12)).to_json(str(data))
    out = tmp_path / "run"
    assert main(["dpo", "--tiny", "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "1",
                 "--heatmap_examples", "0"]) == 0  # fmt: skip
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_of_every_format(suffix, tiny_preference_dataset, tmp_path):
    from trl_tokenlevel.scripts.common import load_named_dataset

    rows = tiny_preference_dataset.select(range(5))
    path = str(tmp_path / f"data{suffix}")
    {".json": rows.to_json, ".jsonl": rows.to_json, ".csv": rows.to_csv, ".parquet": rows.to_parquet}[suffix](path)
    loaded = load_named_dataset(path)
    assert list(loaded) == ["train"] and loaded["train"].to_list() == rows.to_list()


def test_saved_dataset_folder(tiny_preference_dataset, tmp_path):
    from trl_tokenlevel.scripts.common import load_named_dataset

    rows = tiny_preference_dataset.select(range(3))
    rows.save_to_disk(str(tmp_path / "one"))
    assert load_named_dataset(str(tmp_path / "one"))["train"].to_list() == rows.to_list()


def test_missing_file_and_split_are_one_message(tiny_preference_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRL_TOKENLEVEL_DEBUG", raising=False)
    assert main(["dpo", "--tiny", "--dataset_name", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "nope.jsonl" in err and "Traceback" not in err
    data = tmp_path / "pairs.csv"
    tiny_preference_dataset.select(range(4)).to_csv(str(data))
    assert main(["dpo", "--tiny", "--dataset_name", str(data), "--dataset_train_split", "validation",
                 "--output_dir", str(tmp_path)]) == 1  # fmt: skip
    assert "splits are ['train']" in capsys.readouterr().err
