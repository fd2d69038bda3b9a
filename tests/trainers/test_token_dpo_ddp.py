"""Two CPU processes (gloo DDP) with batch 1 each train exactly like one process with batch 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.ports import free_port

WORKER = os.path.join(os.path.dirname(__file__), "ddp_token_dpo.py")


def _run(nproc, per_device, model_path, out, token_loss_type="cdpo"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if nproc == 1:
        command = [sys.executable, WORKER, model_path, str(out), str(per_device), token_loss_type]
    else:
        torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), WORKER, model_path, str(out),
                   str(per_device), token_loss_type]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_two_process_ddp_matches_single_process(tiny_model_path, tmp_path):
    single = _run(1, 2, tiny_model_path, tmp_path / "single")
    ddp = _run(2, 1, tiny_model_path, tmp_path / "ddp")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert ddp["param_norm"] == pytest.approx(single["param_norm"], abs=1e-5)
    assert ddp["param_sum"] == pytest.approx(single["param_sum"], abs=1e-4)
