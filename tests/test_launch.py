"""The launch lines of README and docs/launch.md, as written, on CPU: two processes per trainer script (gloo DDP)
through `accelerate launch` with the shipped config, and through torchrun. Each job is the `--tiny` smoke job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP = ROOT / "examples" / "accelerate_configs" / "cpu_ddp.yaml"
FAST = {
    "dpo": ["--max_steps", "2", "--heatmap_examples", "2"],
    "grpo": ["--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "4"],
    "sft": ["--max_steps", "2"],
}


def _run(command: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.mark.parametrize("script", ["dpo", "grpo", "sft"])
def test_accelerate_launch_two_cpu_processes(script, tmp_path):
    out = tmp_path / "run"
    output = _run(
        [_bin("accelerate"), "launch", "--config_file", str(CPU_DDP), "--main_process_port", str(free_port()),
         "-m", f"trl_tokenlevel.scripts.{script}", "--tiny", "--output_dir", str(out), *FAST[script]],
        tmp_path,
    )  # fmt: skip
    assert f"Model saved to {out} (2 processes)" in output
    assert (out / "model.safetensors").exists()
    if script == "dpo":  # written once, by the main process, after every rank scored the held-out pairs
        assert (out / "token_rewards.html").read_text().count("class='row'") == 4


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    output = _run(
        [_bin("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
         "trl_tokenlevel.scripts.dpo", "--tiny", "--output_dir", str(out), *FAST["dpo"]],
        tmp_path,
    )  # fmt: skip
    assert f"Model saved to {out} (2 processes)" in output
    assert (out / "token_rewards.html").exists()


@pytest.mark.parametrize(
    "config", sorted((ROOT / "examples" / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.stem
)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 2 and loaded.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert loaded.use_cpu == (config.stem == "cpu_ddp")
