r"""Triton backend of `ops.fused.fused_token_statistics` (`backend="triton"`): the same outputs and gradients.

The math is the module docstring of `ops.fused`; this file only changes where it runs. With z = h W^T the policy's
logits (temperature 1), z^τ = z / τ, and z_t = h_t W_t^T / τ the teacher's:

Forward. The grid is (row blocks) x (vocabulary splits). A program takes `BLOCK_N` rows and walks its split of the
vocabulary in `BLOCK_V`-wide tiles; each tile of both heads is one `tl.dot` loop over the hidden axis (bf16 operands,
fp32 accumulation; fp32 operands in full "ieee" precision, never TF32) and never leaves registers. Per row it keeps
three online logsumexps, each as (running max m, Σ e^{z - m}), rescaled by e^{m_old - m_new} whenever the max grows,
exactly like `fused._Online`:

    policy at τ = 1     m_1, l_1,  plus Σ e^{z - m_1}·z (entropy), Σ z (mean logits), z[y], max_{v < y} z[v]
    policy at τ         m_τ, l_τ   (only when τ != 1; otherwise the τ = 1 sums stand in)
    teacher at τ        m_t, l_t,  plus z_t[y]
    KL sum              forward: Σ e^{z_t - m_t}·(z_t - z^τ);   reverse: Σ e^{z^τ - m_τ}·(z^τ - z_t)

Each program writes these partial sums for its split; `_merge_splits` combines the splits in torch (the usual
max-rescaled sum of logsumexp partials, the KL sum rescaled with its weighting head's factor) and finishes

    lse = m + log l,   log p(y) = z[y] - lse_1,   entropy = lse_1 - Σ e·z / l_1,   KL = KL sum / l_w - lse_w + lse_other

Splitting the vocabulary keeps the GPU busy when N is small (N / BLOCK_N programs alone would leave most SMs idle).

Backward. For each `[grad_rows, grad_cols]` chunk of (rows, vocabulary), one kernel recomputes the chunk's policy
tiles (and its teacher tiles, only in row blocks where some row has a KL gradient) and writes the gradient with
respect to the policy's logits into a chunk-sized buffer:

    grad_z = g_lp · (onehot(y) - p) + g_kl · dKL/dz^τ / τ,
    dKL(t||s)/dz^τ = p^τ - p_t,   dKL(s||t)/dz^τ = p^τ · (log p^τ - log p_t - KL)

then two cuBLAS products add the chunk's share to the gradients, accumulated in fp32:
grad_hidden[rows] += grad_z W[cols] and grad_weight[cols] += grad_z^T hidden[rows]. For bf16 heads the buffer is
bf16 (the logit gradient rounded to bf16, relative 2^-9 per entry, as TRL's fused head and the torch backend do; well
inside the 2e-2 bf16 gradient tolerance) and the products run on tensor cores with fp32 results. No atomics: the
gradient is the same, bit for bit, from run to run. The buffer holds `grad_rows x grad_cols` entries (4096 x 16384
bf16 = 128 MiB as shipped), about half of what TRL's own fused head allocates for its tile.

Scope: no bias, `logit_scale` 1 and no softcap on either head (the Qwen/Llama/SmolLM heads the trainers meet);
fp32 or bf16 inputs. Anything else raises a ValueError that points to `backend="torch"`, which supports everything.
It runs on CUDA tensors, or on CPU tensors when `TRITON_INTERPRET=1` was set before this module was first imported
(Triton's interpreter executes the kernels with numpy: for tests, not for speed).

What a faster version would do (unmeasured; needs a GPU): autotune BLOCK_*/num_warps/num_stages and the chunk shape,
and use TMA/wgmma-sized tiles on Hopper.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked import _addmm_fp32, _gathered, _spans

# The partial sums one forward program writes per (statistic, vocabulary split, row); see the module docstring.
_STATS = ("m1", "l1", "weighted_z", "z_total", "picked", "max_before", "m_tau", "l_tau", "m_t", "l_t", "picked_t",
          "kl_sum")  # fmt: skip
_S = {name: i for i, name in enumerate(_STATS)}

# GPU tile shape and warps per program, and the backward's (rows, vocabulary) chunk (not tuned; see the module
# docstring). `tl.dot` needs every block dimension >= 16. Tests shrink them to get ragged multi-tile, multi-chunk
# cases on small shapes, and may fix `vocab_splits`.
BLOCKS = {"block_n": 64, "block_v": 128, "block_k": 64, "num_warps": 8, "grad_rows": 4096, "grad_cols": 16384}


@triton.jit
def _dot(a, b, acc, LOW_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation: bf16 operands when LOW_PRECISION, else fp32 operands in IEEE precision."""
    if LOW_PRECISION:
        a = a.to(tl.bfloat16)
        b = b.to(tl.bfloat16)
        if INTERPRET:
            # Triton's interpreter has no bf16 arithmetic: its `tl.dot` multiplies the uint16 bit patterns it stores
            # bf16 in (3.9; triton-lang/triton#11584). Products of two bf16 values are exact in fp32, so the same
            # numbers in fp32 give what the GPU's bf16 dot gives.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _logits_tile(h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, rows, cols, n_rows, vocab, width,
                 LOW_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    """fp32 `[BLOCK_N, BLOCK_V]` tile of h @ W^T; rows >= n_rows and columns >= vocab come out as 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=(rows[:, None] < n_rows) & (ks[None, :] < width), other=0.0)  # fmt: skip
        w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=(cols[:, None] < vocab) & (ks[None, :] < width), other=0.0)  # fmt: skip
        acc = _dot(h, tl.trans(w), acc, LOW_PRECISION, INTERPRET)
    return acc


@triton.jit
def _fold(z, running_max, running_sum):
    """One tile into an online logsumexp (max m, Σ e^{z - m}): returns e = exp(z - m_new), the rescale
    exp(m - m_new), m_new and the new sum. The first tile of a split always has a finite column, so m_new is finite
    and exp(-inf - m_new) = 0."""
    new_max = tl.maximum(running_max, tl.max(z, 1))
    rescale = tl.exp(running_max - new_max)
    e = tl.exp(z - new_max[:, None])
    return e, rescale, new_max, running_sum * rescale + tl.sum(e, 1)


@triton.jit
def _forward_kernel(h_ptr, w_ptr, th_ptr, tw_ptr, targets_ptr, partials_ptr,
                    stride_hn, stride_hk, stride_wv, stride_wk, stride_thn, stride_thk, stride_twv, stride_twk,
                    n_rows, vocab, width, t_width, vocab_per_split, temperature,
                    REVERSE: tl.constexpr, TEMPERED: tl.constexpr, LOW_S: tl.constexpr, LOW_T: tl.constexpr,
                    INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    # int64 offsets: V x H can exceed 2^31 elements (a 256k vocabulary at H = 8192).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.load(targets_ptr + rows, mask=rows < n_rows, other=0)
    neg_inf = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m1, l1, weighted_z, z_total, picked, max_before = neg_inf, zero, zero, zero, zero, neg_inf
    m_tau, l_tau, m_t, l_t, picked_t, kl_sum = neg_inf, zero, neg_inf, zero, zero, zero
    v_start = split.to(tl.int64) * vocab_per_split
    v_end = tl.minimum(v_start + vocab_per_split, vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        inside = cols[None, :] < v_end
        # Raw tiles are 0 in the padding columns; the -inf copies are for the maxima and exponentials only, so that
        # the weighted sums below multiply finite values by e = 0 there (0 · inf would be NaN).
        z = _logits_tile(h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, rows, cols, n_rows, vocab, width,
                         LOW_S, INTERPRET, BLOCK_N, BLOCK_V, BLOCK_K)  # fmt: skip
        z_t = _logits_tile(th_ptr, stride_thn, stride_thk, tw_ptr, stride_twv, stride_twk, rows, cols, n_rows, vocab,
                           t_width, LOW_T, INTERPRET, BLOCK_N, BLOCK_V, BLOCK_K) / temperature  # fmt: skip
        z_masked = tl.where(inside, z, -float("inf"))
        is_target = (cols[None, :] == y[:, None]) & inside
        picked += tl.sum(tl.where(is_target, z, 0.0), 1)
        picked_t += tl.sum(tl.where(is_target, z_t, 0.0), 1)
        # First-argmax rule (TRL's `is_top1`): the target must beat every column before it strictly.
        max_before = tl.maximum(max_before, tl.max(tl.where(cols[None, :] < y[:, None], z_masked, -float("inf")), 1))
        z_total += tl.sum(z, 1)

        e1, rescale1, m1, l1 = _fold(z_masked, m1, l1)
        weighted_z = weighted_z * rescale1 + tl.sum(e1 * z, 1)
        if TEMPERED:
            z_tau = z / temperature
            e_tau, rescale_tau, m_tau, l_tau = _fold(z_masked / temperature, m_tau, l_tau)
        else:
            z_tau, e_tau, rescale_tau = z, e1, rescale1
        e_t, rescale_t, m_t, l_t = _fold(tl.where(inside, z_t, -float("inf")), m_t, l_t)
        if REVERSE:
            kl_sum = kl_sum * rescale_tau + tl.sum(e_tau * (z_tau - z_t), 1)
        else:
            kl_sum = kl_sum * rescale_t + tl.sum(e_t * (z_t - z_tau), 1)

    out = partials_ptr + split * n_rows + rows
    stride = n_splits * n_rows  # between statistics; the order is `_STATS`
    keep = rows < n_rows
    tl.store(out + 0 * stride, m1, mask=keep)
    tl.store(out + 1 * stride, l1, mask=keep)
    tl.store(out + 2 * stride, weighted_z, mask=keep)
    tl.store(out + 3 * stride, z_total, mask=keep)
    tl.store(out + 4 * stride, picked, mask=keep)
    tl.store(out + 5 * stride, max_before, mask=keep)
    tl.store(out + 6 * stride, m_tau, mask=keep)
    tl.store(out + 7 * stride, l_tau, mask=keep)
    tl.store(out + 8 * stride, m_t, mask=keep)
    tl.store(out + 9 * stride, l_t, mask=keep)
    tl.store(out + 10 * stride, picked_t, mask=keep)
    tl.store(out + 11 * stride, kl_sum, mask=keep)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, th_ptr, tw_ptr, targets_ptr, lse_ptr, lse_tau_ptr, t_lse_ptr, kl_ptr, g_lp_ptr,
                        g_kl_ptr, out_ptr,
                        stride_hn, stride_hk, stride_wv, stride_wk, stride_thn, stride_thk, stride_twv, stride_twk,
                        stride_on, n_rows, n_cols, col_start, width, t_width, temperature,
                        REVERSE: tl.constexpr, TEMPERED: tl.constexpr, LOW_S: tl.constexpr, LOW_T: tl.constexpr,
                        HAS_KL: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr):  # fmt: skip
    """grad_z of one chunk into `out [n_rows, n_cols]`; every pointer starts at the chunk (rows, columns `col_start`+)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64 offsets, as in the forward
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    y = tl.load(targets_ptr + rows, mask=row_ok, other=0) - col_start  # the target's column within the chunk
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0)
    z = _logits_tile(h_ptr, stride_hn, stride_hk, w_ptr, stride_wv, stride_wk, rows, cols, n_rows, n_cols, width,
                     LOW_S, INTERPRET, BLOCK_N, BLOCK_V, BLOCK_K)  # fmt: skip
    p = tl.exp(z - lse[:, None])
    grad_z = g_lp[:, None] * ((cols[None, :] == y[:, None]).to(tl.float32) - p)
    if HAS_KL:
        g_kl = tl.load(g_kl_ptr + rows, mask=row_ok, other=0.0)
        # Row blocks without a KL gradient (TDPO2's chosen rows, sg(D_w)) skip the teacher's tile.
        if tl.max(tl.abs(g_kl), 0) > 0:
            if TEMPERED:
                log_p_tau = z / temperature - tl.load(lse_tau_ptr + rows, mask=row_ok, other=0.0)[:, None]
                p_tau = tl.exp(log_p_tau)
            else:
                log_p_tau = z - lse[:, None]
                p_tau = p
            z_t = _logits_tile(th_ptr, stride_thn, stride_thk, tw_ptr, stride_twv, stride_twk, rows, cols, n_rows,
                               n_cols, t_width, LOW_T, INTERPRET, BLOCK_N, BLOCK_V, BLOCK_K)  # fmt: skip
            log_p_t = z_t / temperature - tl.load(t_lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
            if REVERSE:
                kl = tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
                d_kl = tl.where(p_tau > 0, p_tau * (log_p_tau - log_p_t - kl[:, None]), 0.0)
            else:
                d_kl = p_tau - tl.exp(log_p_t)
            grad_z += g_kl[:, None] * d_kl / temperature
    keep = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], grad_z.to(out_ptr.dtype.element_ty), mask=keep)


# `@triton.jit` decides when it decorates (this module's import) whether to compile for the GPU or to build a function
# for the CPU interpreter (TRITON_INTERPRET=1).
INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


def _merge_splits(partials: torch.Tensor, vocab: int, reverse: bool, tempered: bool):
    """Combine the per-split partial sums `[len(_STATS), splits, N]` into the six outputs plus lse, lse_τ, lse_t."""
    stat = {name: partials[i] for name, i in _S.items()}

    def logsumexp(maxima, sums):  # splits of one head -> (lse, total sum at the common max, each split's rescale)
        top = maxima.amax(dim=0)
        rescale = torch.exp(maxima - top)
        total = (sums * rescale).sum(dim=0)
        return top + torch.log(total), total, rescale

    lse, l1, rescale1 = logsumexp(stat["m1"], stat["l1"])
    lse_tau, l_tau, rescale_tau = logsumexp(stat["m_tau"], stat["l_tau"]) if tempered else (lse, l1, rescale1)
    t_lse, l_t, rescale_t = logsumexp(stat["m_t"], stat["l_t"])
    picked = stat["picked"].sum(dim=0)  # only the target's split holds a non-zero entry
    if reverse:
        kl = (stat["kl_sum"] * rescale_tau).sum(dim=0) / l_tau - lse_tau + t_lse
    else:
        kl = (stat["kl_sum"] * rescale_t).sum(dim=0) / l_t - t_lse + lse_tau
    outputs = (
        picked - lse,  # log_probs
        kl,
        stat["picked_t"].sum(dim=0) - t_lse,  # ref_log_probs
        lse - (stat["weighted_z"] * rescale1).sum(dim=0) / l1,  # entropy
        stat["z_total"].sum(dim=0) / vocab,  # mean_logits
        (picked >= stat["m1"].amax(dim=0)) & (picked > stat["max_before"].amax(dim=0)),  # is_top1
    )
    return outputs, lse, lse_tau, t_lse


def _low_precision(*tensors: torch.Tensor) -> bool:
    """Whether a head's products can run with bf16 operands (both of its tensors are bf16)."""
    return all(t.dtype == torch.bfloat16 for t in tensors)


def _vocab_splits(rows: int, vocab: int, block_n: int, block_v: int, device: torch.device) -> int:
    """Enough vocabulary splits for about 4 programs per SM (1 in the interpreter), each at least one tile wide."""
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, triton.cdiv(rows, block_n)), triton.cdiv(vocab, block_v)))


class TritonFusedFunction(torch.autograd.Function):
    """`fused._FusedFunction` on Triton kernels (no bias, logit scale 1, no softcap; checked by the caller)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, t_hidden, t_weight, reverse, temperature, blocks):
        n, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        tempered = temperature != 1.0
        blocks = dict(blocks)  # the backward uses the tile shape of this forward
        block_n, block_v, block_k = blocks["block_n"], blocks["block_v"], blocks["block_k"]
        targets = targets.contiguous()  # read as a flat array
        if n == 0:  # an all-masked batch: nothing to launch; distinct empty tensors (autograd marks them one by one)
            outputs = (*(hidden.new_empty(0, dtype=torch.float32) for _ in range(5)), hidden.new_empty(0, dtype=bool))
            lse = lse_tau = t_lse = outputs[0]
        else:
            splits = blocks.get("vocab_splits") or _vocab_splits(n, vocab, block_n, block_v, device)
            # Each split is a whole number of tiles and none is empty.
            per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
            splits = triton.cdiv(vocab, per_split)
            partials = torch.empty(len(_STATS), splits, n, dtype=torch.float32, device=device)
            with _gathered(weight, t_weight):
                _forward_kernel[(triton.cdiv(n, block_n), splits)](
                    hidden, weight, t_hidden, t_weight, targets, partials,
                    *hidden.stride(), *weight.stride(), *t_hidden.stride(), *t_weight.stride(),
                    n, vocab, hidden.shape[1], t_hidden.shape[1], per_split, temperature,
                    REVERSE=reverse, TEMPERED=tempered, LOW_S=_low_precision(hidden, weight),
                    LOW_T=_low_precision(t_hidden, t_weight), INTERPRET=INTERPRETED,
                    BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=blocks["num_warps"],
                )  # fmt: skip
            outputs, lse, lse_tau, t_lse = _merge_splits(partials, vocab, reverse, tempered)
        kl = outputs[1]
        ctx.save_for_backward(hidden, weight, targets, t_hidden, t_weight, lse, lse_tau, t_lse, kl)
        ctx.config = (reverse, temperature, blocks)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*outputs[2:])
        # `kl` is saved for the backward: hand out a copy, so in-place edits by the caller cannot corrupt it.
        return (outputs[0], kl.clone(), *outputs[2:])

    @staticmethod
    def backward(ctx, grad_logps, grad_kl, *_):
        hidden, weight, targets, t_hidden, t_weight, lse, lse_tau, t_lse, kl = ctx.saved_tensors
        reverse, temperature, blocks = ctx.config
        need_h, need_w = ctx.needs_input_grad[:2]
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if n and (need_h or need_w) and (grad_logps is not None or grad_kl is not None):
            zeros = torch.zeros(n, dtype=torch.float32, device=hidden.device)
            g_lp = zeros if grad_logps is None else grad_logps.float().contiguous()
            g_kl = zeros if grad_kl is None else grad_kl.float().contiguous()
            low_s = _low_precision(hidden, weight)
            chunk_rows, chunk_cols = min(n, blocks["grad_rows"]), min(vocab, blocks["grad_cols"])
            buffer = torch.empty(chunk_rows, chunk_cols, dtype=torch.bfloat16 if low_s else torch.float32,
                                 device=hidden.device)  # fmt: skip
            block_n, block_v = blocks["block_n"], blocks["block_v"]
            with _gathered(weight, t_weight):
                for r0, r1 in _spans(n, chunk_rows):
                    for v0, v1 in _spans(vocab, chunk_cols):
                        grad_z = buffer[: r1 - r0, : v1 - v0]
                        h, w, h_t, w_t = hidden[r0:r1], weight[v0:v1], t_hidden[r0:r1], t_weight[v0:v1]
                        _grad_logits_kernel[(triton.cdiv(r1 - r0, block_n), triton.cdiv(v1 - v0, block_v))](
                            h, w, h_t, w_t, targets[r0:r1], lse[r0:r1], lse_tau[r0:r1], t_lse[r0:r1], kl[r0:r1],
                            g_lp[r0:r1], g_kl[r0:r1], grad_z,
                            *h.stride(), *w.stride(), *h_t.stride(), *w_t.stride(), grad_z.stride(0),
                            r1 - r0, v1 - v0, v0, hidden.shape[1], t_hidden.shape[1], temperature,
                            REVERSE=reverse, TEMPERED=temperature != 1.0, LOW_S=low_s,
                            LOW_T=_low_precision(t_hidden, t_weight), HAS_KL=grad_kl is not None,
                            INTERPRET=INTERPRETED, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_K=blocks["block_k"],
                            num_warps=blocks["num_warps"],
                        )  # fmt: skip
                        if need_h:
                            _addmm_fp32(grad_h[r0:r1], grad_z, w)
                        if need_w:
                            _addmm_fp32(grad_w[v0:v1], grad_z.t(), h)
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            *(None,) * 6,
        )
