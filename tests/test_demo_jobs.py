"""The default jobs on the real demo model, shortened to one or two steps: they print held-out accuracy before and
after, and the DPO job writes the heatmap and measures where the most negative token reward sits (minutes on CPU)."""

from __future__ import annotations

import re

import pytest

from trl_tokenlevel.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@pytest.mark.parametrize("command", ["dpo", "grpo", "sft"])
def test_demo_job(command, demo_model_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRL_TOKENLEVEL_DEMO_MODEL", demo_model_folder)
    out = tmp_path / "run"
    assert main([command, "--output_dir", str(out), "--max_steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"Held-out greedy accuracy before training \(48 problems\): \d+\.\d%", printed)
    assert re.search(r"Held-out greedy accuracy after training \(48 problems\): \d+\.\d% \(before", printed)
    by_position = re.findall(r"larger number first: (\d+\.\d)% of (\d+), second: (\d+\.\d)% of (\d+); balanced accuracy "
                             r"(\d+\.\d)%", printed)  # fmt: skip
    assert len(by_position) == 2  # before and after
    for first, n_first, second, n_second, balanced in by_position:
        assert int(n_first) + int(n_second) == 48
        assert float(balanced) == pytest.approx((float(first) + float(second)) / 2, abs=0.06)
    assert (out / "adapter_model.safetensors").exists()
    if command == "dpo":
        assert (out / "token_rewards.html").read_text().count("class='row'") == 12  # 6 held-out pairs
        assert re.search(r"first wrong token: \d+/37 held-out rejected answers", printed)
