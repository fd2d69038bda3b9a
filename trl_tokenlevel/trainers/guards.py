"""Guards shared by the token trainers: a policy that fits its tokenizer, and a stop on non-finite weights before a
checkpoint of them is written."""

from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..checks import check_tokenizer_fits, lm_head_shape


def nonfinite_guard_enabled(args, token_mode: bool) -> bool:
    """`args.stop_on_nonfinite`, with None resolved to `token_mode` (plain TRL configs have no such field)."""
    setting = getattr(args, "stop_on_nonfinite", None)
    return token_mode if setting is None else bool(setting)


class NonFiniteWeightsGuard(TrainerCallback):
    """After every optimizer step (`on_step_end`, which `Trainer` calls before it logs, evaluates or saves), check the
    trainable weights; raise `FloatingPointError` if any is NaN/inf.

    Raising there means no checkpoint of the broken weights is ever written, and no rotation (`save_total_limit`)
    runs: the checkpoints already on disk stay as they are. One fused reduction per parameter and one host sync per
    step.
    """

    def __init__(self, extra_modules=()):
        # Modules trained beside the model (e.g. SparsePO's mask networks), checked with it.
        self.extra_modules = extra_modules

    def on_step_end(self, args, state, control, model=None, **kwargs):
        modules = [module for module in (model, *self.extra_modules) if module is not None]
        named = [(name, p) for module in modules for name, p in module.named_parameters() if p.requires_grad]
        if not named:
            return
        # FSDP2 parameters are DTensors: check each rank's own shard, then agree across ranks in one collective so
        # that every rank stops together (and DTensor and plain parameters, e.g. SparsePO's masks, mix freely).
        shards = [p.to_local() if isinstance(p, DTensor) else p for _, p in named]
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in shards])
        if any(isinstance(p, DTensor) for _, p in named):
            finite = finite.int()
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            finite = finite.bool()
        if bool(finite.all()):
            return
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        kept = "No checkpoint was written."
        if last:
            kept = f"The last checkpoint, {last}, was written before this step and is untouched."
        raise FloatingPointError(
            f"Optimizer step {state.global_step} left non-finite (NaN/inf) weights in {len(bad)} parameter(s), first "
            f"{bad[0]!r}: the loss or its gradients were not finite. Training stopped before saving them. {kept} "
            "Lower the learning rate, set max_grad_norm, check the per-token columns for extreme values, or use "
            "fp32/bf16 instead of fp16; resume from the last checkpoint. (stop_on_nonfinite=False turns this check off.)"
        )


def check_policy(model, processing_class) -> None:
    """Before TRL builds anything: a policy given as a model object has an LM head and embeds every tokenizer id."""
    if isinstance(model, str):
        return  # loaded by TRL with `AutoModelForCausalLM`, next to its own tokenizer
    lm_head_shape(model, "model")
    if processing_class is not None:
        check_tokenizer_fits(processing_class, model, "model")
