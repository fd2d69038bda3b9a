r"""One tiled pass over the policy's and the reference's (or teacher's) LM heads for the full-distribution losses.

TDPO, SparsePO, MaPO and AlignDistil need, at every completion position n, the policy's log-probability of the
target token AND a full-vocabulary KL between the policy and a reference (or teacher) distribution. Computing them
separately (TRL's fused log-prob head, then a chunked KL) multiplies the policy's logits `h @ W.T` two to three times
in the forward and twice in the backward, and the reference's likewise. `fused_token_statistics` reads each
`[token_chunk, vocab_chunk]` tile of both heads ONCE in the forward and once in the backward, and produces every
per-token quantity those losses and their metrics use:

    log_probs_n   = z_n[y_n] - logsumexp_v z_n[v]                                 (policy, temperature 1, gradient)
    kl_n          forward: KL(t || s)_n = E_t[z^τ_t - z^τ_s] - lse(z^τ_t) + lse(z^τ_s)         (gradient)
                  reverse: KL(s || t)_n = E_s[z^τ_s - z^τ_t] - lse(z^τ_s) + lse(z^τ_t)
    ref_log_probs_n = z^τ_t[y_n] - lse(z^τ_t)                                       (teacher, no gradient)
    entropy_n     = lse(z_n) - E_p[z_n]                                             (policy, metric, no gradient)
    mean_logits_n = mean_v z_n[v];   is_top1_n = (argmax_v z_n[v] == y_n)           (metrics, as TRL's fused head)

with z the transformed logits (`ops.chunked` module docstring: bias, logit scale, softcap) and z^τ = z / τ. The KL
needs no second pass: the expectation E_t[d] = Σ_v e^{z_t - m} d / Σ_v e^{z_t - m} is accumulated online with the
same running-max rescaling as the logsumexp. Everything is accumulated in fp32 (fp64 for fp64 inputs) whatever the
input dtype; autocast is disabled inside.

The backward recomputes each tile once (the teacher's only for token chunks whose KL has a gradient) and applies, per
row, the gradient of `g_lp · log_prob + g_kl · KL` with respect to the policy's logits:

    d log p(y) / dz        = onehot(y) - p
    d KL(t || s) / dz^τ_s  = p^τ_s - p^τ_t
    d KL(s || t) / dz^τ_s  = p^τ_s · (log p^τ_s - log p^τ_t - KL)

then the softcap/scale chain rule and fp32 GEMMs into grad_hidden / grad_weight / grad_bias. Memory is
O(token_chunk · vocab_chunk) on top of the inputs and the `[V, H]` weight gradient.

Backends: `"torch"` is the plain-torch tiling below, on any device, for every transform. `"triton"`
(`ops.fused_triton`) runs the same equations in Triton kernels on CUDA (the forward folds both heads' tiles in
registers; the backward writes the logit gradient chunk by chunk and leaves the two products to cuBLAS); it supports heads without bias, logit scale or softcap (any temperature,
both directions, fp32/bf16) and raises a ValueError naming the option otherwise. Its parity with "torch" is tested
with Triton's CPU interpreter (`tests/ops/test_fused_triton.py`); its speed on a GPU is unmeasured, so the trainers'
`token_kernel="auto"` never picks it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .chunked import (
    _check_head,
    _check_pair,
    _check_positive_int,
    _check_targets,
    _check_temperature,
    _check_transform,
    _compute_dtype,
    _finite_or_zero,
    _full,
    _gathered,
    _Head,
    _no_autocast,
    _spans,
)

__all__ = ["FusedTokenStatistics", "fused_token_statistics"]

_BACKENDS = ("torch", "triton")


class FusedTokenStatistics(NamedTuple):
    """Per-row outputs of `fused_token_statistics`, each `[N]` (fp32; fp64 for fp64 inputs)."""

    log_probs: torch.Tensor  # policy log p(y) at temperature 1; gradient to the policy head
    kl: torch.Tensor  # KL at `temperature` in the requested direction; gradient to the policy head
    ref_log_probs: torch.Tensor  # teacher log p(y) at `temperature`; no gradient
    entropy: torch.Tensor  # policy entropy at temperature 1; no gradient (metrics)
    mean_logits: torch.Tensor  # mean over the vocabulary of the policy's logits; no gradient (metrics)
    is_top1: torch.Tensor  # bool: the target is the policy's first argmax (metrics)


class _Online:
    """Running logsumexp of one head, kept as (max m, Σ exp(z - m)), plus optional sums that share its exp weights.

    `fold(z)` returns `e = exp(z - m_new)` and the factor `exp(m_old - m_new)` that any other sum weighted by the same
    exponentials must be multiplied by. A shift of 0 stands in while the max is still -inf (rows whose first tiles are
    all masked), so that no exp(-inf - -inf) = NaN appears.
    """

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device):
        self.max = torch.full((rows,), -math.inf, dtype=dtype, device=device)
        self.sum = torch.zeros(rows, dtype=dtype, device=device)

    def fold(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_max = torch.maximum(self.max, z.amax(dim=-1))
        shift = _finite_or_zero(new_max)
        rescale = torch.exp(self.max - shift)
        e = torch.exp(z - shift.unsqueeze(-1))
        self.sum = self.sum * rescale + e.sum(dim=-1)
        self.max = new_max
        return e, rescale

    def lse(self) -> torch.Tensor:
        return _finite_or_zero(self.max) + torch.log(self.sum)


def _weighted(e: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_v e·values over the last axis, with 0 where e == 0 (masked slots: 0 · ±inf would be NaN)."""
    return torch.where(e > 0, e * values, 0.0).sum(dim=-1)


class _FusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, t_hidden, t_weight, t_bias, reverse, temperature, scale, cap,
                t_scale, t_cap, token_chunk, vocab_chunk):  # fmt: skip
        dtype = _compute_dtype(hidden, weight, bias, t_hidden, t_weight, t_bias)
        n, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        policy = _Head(hidden, weight, bias, scale, cap, 1.0, dtype)
        teacher = _Head(t_hidden, t_weight, t_bias, t_scale, t_cap, temperature, dtype)
        tempered = temperature != 1.0

        def new():
            return torch.empty(n, dtype=dtype, device=device)

        lse, lse_tau, t_lse, kl, ref_logps, entropy, mean_logits = (new() for _ in range(7))
        target_z = new()
        is_top1 = torch.empty(n, dtype=torch.bool, device=device)
        with _no_autocast(device), _gathered(weight, bias, t_weight, t_bias):
            for r0, r1 in _spans(n, token_chunk):
                h, h_t, y = policy.rows(r0, r1), teacher.rows(r0, r1), targets[r0:r1]
                rows = r1 - r0
                # Policy at temperature 1 (log-probs and metrics), policy at τ (KL; the same when τ = 1), teacher at τ.
                s1 = _Online(rows, dtype, device)
                s_tau = _Online(rows, dtype, device) if tempered else s1
                t = _Online(rows, dtype, device)
                weighted_z = torch.zeros(rows, dtype=dtype, device=device)  # Σ e1·z: entropy
                kl_sum = torch.zeros(rows, dtype=dtype, device=device)  # Σ e_w·(z_w - z_other), w the KL's weights
                z_total = torch.zeros(rows, dtype=dtype, device=device)
                picked = torch.zeros(rows, dtype=dtype, device=device)
                picked_t = torch.zeros(rows, dtype=dtype, device=device)
                max_before_target = torch.full((rows,), -math.inf, dtype=dtype, device=device)
                for v0, v1 in _spans(vocab, vocab_chunk):
                    z, _ = policy.tile(h, v0, v1)
                    z_t, _ = teacher.tile(h_t, v0, v1)
                    local = y - v0
                    inside = (local >= 0) & (local < v1 - v0)
                    index = local.clamp(0, v1 - v0 - 1).unsqueeze(1)
                    picked = torch.where(inside, z.gather(1, index).squeeze(1), picked)
                    picked_t = torch.where(inside, z_t.gather(1, index).squeeze(1), picked_t)
                    # First-argmax rule (TRL's `is_top1`): the max over the slots before the target must be smaller.
                    before = torch.arange(v1 - v0, device=device) < local.unsqueeze(1)
                    max_before_target = torch.maximum(max_before_target, z.masked_fill(~before, -math.inf).amax(-1))
                    z_total += z.sum(dim=-1)

                    e1, rescale = s1.fold(z)
                    weighted_z = weighted_z * rescale + _weighted(e1, z)
                    z_tau = z / temperature if tempered else z
                    e_tau, rescale_tau = s_tau.fold(z_tau) if tempered else (e1, rescale)
                    e_t, rescale_t = t.fold(z_t)
                    if reverse:
                        kl_sum = kl_sum * rescale_tau + _weighted(e_tau, z_tau - z_t)
                    else:
                        kl_sum = kl_sum * rescale_t + _weighted(e_t, z_t - z_tau)
                lse[r0:r1], lse_tau[r0:r1], t_lse[r0:r1] = s1.lse(), s_tau.lse(), t.lse()
                target_z[r0:r1] = picked
                ref_logps[r0:r1] = picked_t - t_lse[r0:r1]
                entropy[r0:r1] = lse[r0:r1] - weighted_z / s1.sum
                mean_logits[r0:r1] = z_total / vocab
                is_top1[r0:r1] = (picked >= s1.max) & (picked > max_before_target)
                if reverse:
                    kl[r0:r1] = kl_sum / s_tau.sum - lse_tau[r0:r1] + t_lse[r0:r1]
                else:
                    kl[r0:r1] = kl_sum / t.sum - t_lse[r0:r1] + lse_tau[r0:r1]
        log_probs = target_z - lse
        ctx.save_for_backward(hidden, weight, bias, targets, t_hidden, t_weight, t_bias, lse, lse_tau, t_lse, kl)
        ctx.config = (reverse, temperature, scale, cap, t_scale, t_cap, token_chunk, vocab_chunk, dtype)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(ref_logps, entropy, mean_logits, is_top1)
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        # `kl` is saved for the backward: hand out a copy, so in-place edits by the caller cannot corrupt it.
        return (log_probs.to(out_dtype), kl.to(out_dtype, copy=True), ref_logps.to(out_dtype), entropy.to(out_dtype),
                mean_logits.to(out_dtype), is_top1)  # fmt: skip

    @staticmethod
    def backward(ctx, grad_logps, grad_kl, *_):
        hidden, weight, bias, targets, t_hidden, t_weight, t_bias, lse, lse_tau, t_lse, kl = ctx.saved_tensors
        reverse, temperature, scale, cap, t_scale, t_cap, token_chunk, vocab_chunk, dtype = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=device) if need_b else None
        if (need_h or need_w or need_b) and (grad_logps is not None or grad_kl is not None):
            policy = _Head(hidden, weight, bias, scale, cap, 1.0, dtype)
            teacher = _Head(t_hidden, t_weight, t_bias, t_scale, t_cap, temperature, dtype)
            g_lp = None if grad_logps is None else grad_logps.to(dtype).unsqueeze(-1)
            g_kl = None if grad_kl is None else grad_kl.to(dtype).unsqueeze(-1)
            with _no_autocast(device), _gathered(weight, bias, t_weight, t_bias):
                for r0, r1 in _spans(n, token_chunk):
                    h, h_t, y = policy.rows(r0, r1), teacher.rows(r0, r1), targets[r0:r1]
                    rows_lse = lse[r0:r1].unsqueeze(-1)
                    # Rows whose KL gets no gradient need no teacher tile: in TDPO2 the chosen rows (sg(D_w)), which
                    # the trainer stacks before the rejected ones, so whole token chunks skip the teacher head.
                    kl_rows = g_kl is not None and bool(g_kl[r0:r1].any())
                    for v0, v1 in _spans(vocab, vocab_chunk):
                        z, th = policy.tile(h, v0, v1)
                        p = torch.exp(z - rows_lse)
                        grad_z = torch.zeros_like(z)
                        if g_lp is not None:
                            one_hot = torch.arange(v0, v1, device=device) == y.unsqueeze(-1)
                            grad_z += g_lp[r0:r1] * (one_hot.to(dtype) - p)
                        if kl_rows:
                            if temperature == 1.0:
                                log_p_tau, p_tau = z - rows_lse, p
                            else:
                                log_p_tau = z / temperature - lse_tau[r0:r1].unsqueeze(-1)
                                p_tau = torch.exp(log_p_tau)
                            log_p_t = teacher.tile(h_t, v0, v1)[0] - t_lse[r0:r1].unsqueeze(-1)
                            if reverse:
                                gap = log_p_tau - log_p_t - kl[r0:r1].unsqueeze(-1)
                                d_kl = torch.where(p_tau > 0, p_tau * gap, 0.0)
                            else:
                                d_kl = p_tau - torch.exp(log_p_t)
                            grad_z += g_kl[r0:r1] * d_kl / temperature
                        grad_raw = policy.chain(grad_z, th)
                        policy.add_tile_grads(grad_raw, h, grad_h, grad_w, grad_b, slice(r0, r1), slice(v0, v1))
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            *(None,) * 12,
        )


def fused_token_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    *,
    direction: str = "forward",
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    token_chunk: int = 1024,
    vocab_chunk: int = 8192,
    backend: str = "torch",
) -> FusedTokenStatistics:
    r"""Policy log-probs, teacher log-probs, full-vocabulary KL and the policy's metric statistics in one tiled pass.

    See the module docstring for the equations. "forward" with teacher = reference is TDPO's KL(π_ref ‖ π_θ)
    (preference.md §1); "reverse" is AlignDistil's KL(π_θ ‖ π*) (§6). `temperature` applies to the KL and to
    `ref_log_probs`; the policy's `log_probs`, `entropy`, `mean_logits` and `is_top1` are at temperature 1, like TRL's
    DPO head. Gradients reach `hidden`, `weight` and `bias` through `log_probs` and `kl`; the teacher is a constant.

    Args:
        hidden (`torch.Tensor`): `[N, H]` policy hidden states of the scored positions (already shifted and masked).
        weight, bias: policy LM head `[V, H]`, `[V]` or `None`.
        targets (`torch.LongTensor`): `[N]` target token ids in `[0, V)`.
        teacher_hidden, teacher_weight, teacher_bias: the reference/teacher head (`H_t` may differ from `H`).
        direction (`str`): `"forward"` = KL(teacher ‖ policy), `"reverse"` = KL(policy ‖ teacher).
        temperature, logit_scale, softcap, teacher_logit_scale, teacher_softcap: the logits transforms.
        token_chunk, vocab_chunk (`int`): tile shape.
        backend (`str`): `"torch"` (any device and transform) or `"triton"` (CUDA; no bias, logit scale 1, no
            softcap; `token_chunk`/`vocab_chunk` are not used, its tile shape is `ops.fused_triton.BLOCKS`).

    Returns:
        [`FusedTokenStatistics`] of `[N]` tensors.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {_BACKENDS} for the fused pass, got {backend!r}.")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"`direction` must be 'forward' (KL(teacher||policy)) or 'reverse', got {direction!r}.")
    _check_temperature(temperature)
    _check_transform("", logit_scale, softcap)
    _check_transform("teacher_", teacher_logit_scale, teacher_softcap)
    _check_positive_int("token_chunk", token_chunk)
    _check_positive_int("vocab_chunk", vocab_chunk)
    weight, bias = _full(weight), _full(bias)
    teacher_weight, teacher_bias = _full(teacher_weight), _full(teacher_bias)
    _check_head("", hidden, weight, bias)
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    _check_pair("policy", hidden, weight, "teacher", teacher_hidden, teacher_weight)
    _check_targets(targets, hidden.shape[0], weight.shape[0])
    if backend == "triton":
        check_triton_head("", bias, logit_scale, softcap)
        check_triton_head("teacher_", teacher_bias, teacher_logit_scale, teacher_softcap)
        _check_triton_tensors(hidden, weight, teacher_hidden, teacher_weight)
        check_triton_available(hidden.device)
        from .fused_triton import BLOCKS, TritonFusedFunction

        outputs = TritonFusedFunction.apply(
            hidden, weight, targets, teacher_hidden.detach(), teacher_weight.detach(), direction == "reverse",
            float(temperature), BLOCKS,
        )  # fmt: skip
        return FusedTokenStatistics(*outputs)
    teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
    outputs = _FusedFunction.apply(
        hidden, weight, bias, targets, teacher_hidden.detach(), teacher_weight.detach(), teacher_bias,
        direction == "reverse", float(temperature), logit_scale, softcap, teacher_logit_scale, teacher_softcap,
        token_chunk, vocab_chunk,
    )  # fmt: skip
    return FusedTokenStatistics(*outputs)


def check_triton_available(device: torch.device) -> None:
    """backend="triton" needs the `triton` package, and CUDA tensors unless Triton's CPU interpreter is on."""
    try:
        from .fused_triton import INTERPRETED
    except ImportError as error:
        raise ValueError(
            f"backend='triton' for the fused pass needs the `triton` package ({error}): install it with "
            "`pip install 'trl-tokenlevel[triton]'`, or use backend='torch'."
        ) from error
    if torch.device(device).type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"backend='triton' for the fused pass needs CUDA, got device {device} (or, for testing on CPU, "
            "TRITON_INTERPRET=1 set before `trl_tokenlevel.ops.fused_triton` is first imported). Use backend='torch' "
            "on this device."
        )


def check_triton_head(prefix: str, bias: torch.Tensor | None, logit_scale: float, softcap: float | None) -> None:
    """The logits transform the Triton kernels implement: none (no bias, logit scale 1, no softcap)."""
    unsupported = [
        text
        for text, used in (
            (f"`{prefix}bias` (a tensor)", bias is not None),
            (f"`{prefix}logit_scale`={logit_scale!r}", logit_scale != 1),
            (f"`{prefix}softcap`={softcap!r}", softcap is not None),
        )
        if used
    ]
    if unsupported:
        raise ValueError(
            f"backend='triton' for the fused pass supports LM heads without bias, logit scale or softcap; got "
            f"{', '.join(unsupported)}. Use backend='torch' (token_kernel='torch'), which supports every logits "
            "transform."
        )


def _check_triton_tensors(hidden, weight, t_hidden, t_weight) -> None:
    for name, tensor in (("hidden", hidden), ("weight", weight), ("teacher_hidden", t_hidden),
                         ("teacher_weight", t_weight)):  # fmt: skip
        if tensor.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"backend='triton' for the fused pass takes float32 or bfloat16 tensors, got `{name}` in "
                f"{tensor.dtype}. Use backend='torch' (fp64 and fp16 included)."
            )
        if tensor.device != hidden.device:
            raise ValueError(
                f"backend='triton': `{name}` is on {tensor.device} but `hidden` is on {hidden.device}; put both heads "
                "and their hidden states on one device."
            )
