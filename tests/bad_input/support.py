"""Shared checks of the bad-input suite: the exception type, a message that names the field or file and the fix,
and an output folder (with an existing checkpoint) left exactly as it was."""

from __future__ import annotations

import hashlib
import math
import os
import re

import pytest


def snapshot(folder) -> dict[str, str]:
    """Relative path -> content hash of every file under `folder` (missing folder: empty)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = hashlib.sha1(handle.read()).hexdigest()
    return files


def output_dir_with_checkpoint(tmp_path) -> str:
    """An output folder that already holds a checkpoint from an earlier run, which no bad input may touch."""
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (out / "checkpoint-1" / "model.safetensors").write_bytes(b"weights of an earlier run")
    return str(out)


def assert_refused(action, exception, out_dir, names, fix) -> str:
    """`action()` raises `exception` whose message contains every string in `names` and matches the regex `fix`;
    `out_dir` is unchanged. Returns the message."""
    before = snapshot(out_dir)
    with pytest.raises(exception) as info:
        action()
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    assert re.search(fix, message), f"no fix ({fix!r}) in: {message}"
    assert snapshot(out_dir) == before, "the output folder changed"
    return message


def assert_finite_loss(trainer) -> None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
