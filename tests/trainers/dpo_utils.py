"""Shared helpers for the DPO trainer tests: train stock and token trainers from the same seed and compare."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

# Logged values that depend on wall time, not on the math.
TIMING_KEYS = ("runtime", "per_second", "total_flos")


def base_args(tmp_path, **overrides) -> dict:
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        seed=7,
        max_length=64,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    args.update(overrides)
    return args


def numeric_logs(log_history) -> list[dict]:
    return [
        {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not any(t in k for t in TIMING_KEYS)}
        for entry in log_history
    ]


def assert_logs_equal(expected, actual, atol=1e-6, ignore_prefixes=()) -> None:
    expected, actual = numeric_logs(expected), numeric_logs(actual)
    assert len(expected) == len(actual)
    for step, (a, b) in enumerate(zip(expected, actual)):
        keys_a = {k for k in a if not k.startswith(ignore_prefixes)} if ignore_prefixes else set(a)
        keys_b = {k for k in b if not k.startswith(ignore_prefixes)} if ignore_prefixes else set(b)
        assert keys_a == keys_b, f"step {step}: metric names differ: {keys_a ^ keys_b}"
        for key in keys_a:
            assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=atol), f"step {step} {key}: {a[key]} vs {b[key]}"


def assert_params_equal(model_a, model_b, atol=1e-6) -> None:
    params_b = dict(model_b.named_parameters())
    for name, param in model_a.named_parameters():
        torch.testing.assert_close(param, params_b[name], atol=atol, rtol=0, msg=f"parameter {name} differs")


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
