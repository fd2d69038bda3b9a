"""FSDP2 (`fully_shard`, gloo, 2 CPU processes): the tiled full-distribution ops give one process's loss and gradients.

Covers both ways the ops meet a sharded LM head: still unsharded after the root forward (FSDP2's default for the root
group), and sharded again (a DTensor the ops gather themselves; its gradient must be reduced across ranks and averaged
like FSDP2's own). Trainer-level FSDP2 is tested in test_fsdp2_trainers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.ports import free_port

WORKER = os.path.join(os.path.dirname(__file__), "fsdp2_ops_worker.py")


def _run(tmp_path, nproc, *args):
    out = tmp_path / f"{nproc}-{'-'.join(args)}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        command = [sys.executable, WORKER, str(out), *args]
    else:
        torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), WORKER, str(out), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("tying", "when"), [("tied", "resharded"), ("untied", "after_forward")])
def test_fsdp2_matches_one_process(tmp_path, tying, when):
    if not __import__("torch").distributed.is_available():
        pytest.skip("torch.distributed is not available")
    single = _run(tmp_path, 1, tying)
    sharded = _run(tmp_path, 2, tying, when)
    assert sharded["world"] == 2 and sharded["dtensor"] == (when == "resharded")
    assert sharded["loss"] == pytest.approx(single["loss"], abs=1e-6)
    assert sharded["grads"].keys() == single["grads"].keys()
    for name, (grad_sum, grad_norm) in single["grads"].items():
        assert sharded["grads"][name][1] == pytest.approx(grad_norm, rel=1e-5, abs=1e-7), name
        assert sharded["grads"][name][0] == pytest.approx(grad_sum, abs=1e-5), name
