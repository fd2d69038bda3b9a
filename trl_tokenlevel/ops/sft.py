"""Token-level SFT math: CHORD-φ weighting, One-Token Rollout (OTR) and ssToken selection.

Everything here works on per-token tensors or, where the full vocabulary is needed (OTR sampling and the expected OTR
loss), directly on hidden states and the LM-head weight in vocabulary tiles, so no `[N, V]` logits tensor is ever built.
Spec: `shared/specs/rl_sft_decoding.md` §7 (CHORD), §11 (OTR), §12 (ssToken).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# --------------------------------------------------------------------------------------------------------------------
# CHORD (§7)
# --------------------------------------------------------------------------------------------------------------------

CHORD_WEIGHTINGS = ("phi", "none", "is")


def chord_phi(probs: torch.Tensor) -> torch.Tensor:
    """CHORD token weight φ(p) = p·(1 − p).

    Paper: https://huggingface.co/papers/2508.11408 (CHORD, "token-wise weighting"). φ is largest at p = 0.5 and
    vanishes for tokens the policy already finds certain (p ≈ 1) or very unlikely (p ≈ 0).
    """
    return probs * (1.0 - probs)


def chord_sft_per_token_loss(log_probs: torch.Tensor, weighting: str = "phi", cutoff_prob: float = 1.0) -> torch.Tensor:
    """Per-token CHORD expert-SFT loss `−log π_θ(y_t) · sg(w(p_t))`, same shape as `log_probs`.

    Paper: https://huggingface.co/papers/2508.11408; reference code Trinity-RFT `chord_policy_loss.py::SFTPhiLossFn`.

    Args:
        log_probs: log π_θ(y_t) of the expert tokens (with gradient).
        weighting: `"phi"` (CHORD-φ, default): w = p(1 − p); `"none"` (CHORD-μ): w = 1, plain NLL; `"is"`: w = p, which
            equals DFT (TRL `loss_type="dft"`). The weight is always detached.
        cutoff_prob: c; `log π` is clamped to `≤ log c` before both the loss and the weight, so tokens above c get no
            gradient. c = 1 (default) is off.
    """
    if weighting not in CHORD_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {CHORD_WEIGHTINGS}, got {weighting!r}.")
    if not 0.0 < cutoff_prob <= 1.0:
        raise ValueError(f"cutoff_prob must be in (0, 1], got {cutoff_prob}.")
    if cutoff_prob < 1.0:
        log_probs = log_probs.clamp(max=math.log(cutoff_prob))
    if weighting == "none":
        return -log_probs
    probs = log_probs.detach().exp()
    weight = chord_phi(probs) if weighting == "phi" else probs
    return -log_probs * weight


def chord_sft_loss(
    log_probs: torch.Tensor,
    mask: torch.Tensor,
    weighting: str = "phi",
    cutoff_prob: float = 1.0,
    token_level: bool = True,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """CHORD expert-SFT loss `L_SFT`, reduced over the expert tokens of a `[B, T]` batch.

    Paper: https://huggingface.co/papers/2508.11408. `L_SFT = token-mean_t [−log π_θ(y_t) · sg(φ(p_t))]`.

    Args:
        log_probs: `[B, T]` log π_θ of the expert tokens.
        mask: `[B, T]` 1 on expert completion tokens.
        weighting, cutoff_prob: see `chord_sft_per_token_loss` (defaults φ on, no cutoff).
        token_level: True (default, `use_token_level_loss=True`): mean over all masked tokens of the batch; False:
            mean over rows of each row's token-mean (rows without tokens are skipped).
        normalizer: divide the sum (of tokens, or of row means) by this count instead of this batch's own: the
            expert tokens (or rows) of the whole optimisation step, over micro-batches and ranks, so that the
            micro-batch terms add up to the one-batch loss (`L = Σ_{micro, rank} sum / N_global`).

    Returns 0 (keeping the graph) when no token is masked: "no expert rows → SFT term 0".
    """
    per_token = chord_sft_per_token_loss(log_probs, weighting=weighting, cutoff_prob=cutoff_prob)
    mask = mask.to(per_token.dtype)
    if token_level:
        count = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
        return (per_token * mask).sum() / count
    counts = mask.sum(-1)
    has_tokens = counts > 0
    row_means = (per_token * mask).sum(-1) / counts.clamp(min=1.0)
    count = has_tokens.sum().clamp(min=1) if normalizer is None else normalizer
    return (row_means * has_tokens).sum() / count


def chord_mu(
    step: int,
    warmup_steps: int = 200,
    decay_steps: int = 400,
    mu_peak: float = 0.5,
    mu_valley: float = 0.02,
) -> float:
    """CHORD global mixing coefficient μ at optimizer step s (linear warmup, then cosine decay to a floor).

    Paper: https://huggingface.co/papers/2508.11408; Trinity-RFT `chord_policy_loss.py::mu_schedule_function`.

        μ = s/w · μ_peak                                        for s < w (branch skipped when w = 0)
        μ = μ_valley                                            for s ≥ w + d
        μ = (μ_peak − μ_valley)·½(1 + cos(π(s − w)/d)) + μ_valley  otherwise

    Defaults are `examples/mix_chord/mix_chord.yaml` (w = 200, d = 400, μ_peak = 0.5, μ_valley = 0.02). The loss
    function's own default is a constant μ = 0.1 (w = d = 0, μ_peak = μ_valley = 0.1).
    """
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError("warmup_steps and decay_steps must be >= 0.")
    if step < warmup_steps:
        return step / warmup_steps * mu_peak
    if step >= warmup_steps + decay_steps:
        return mu_valley
    progress = (step - warmup_steps) / decay_steps
    return (mu_peak - mu_valley) * 0.5 * (1.0 + math.cos(math.pi * progress)) + mu_valley


def chord_mix(grpo_loss: torch.Tensor, sft_loss: torch.Tensor, mu: float) -> torch.Tensor:
    """CHORD total loss `(1 − μ)·L_GRPO + μ·L_SFT` for unit batch weights.

    Paper: https://huggingface.co/papers/2508.11408. The official code also multiplies each side by its row count and
    a batch-size weight so that each side averages over its own global batch; that renormalisation depends on the
    trainer's batching and belongs there (`TokenGRPOTrainer` divides the SFT sum by the step's global expert count:
    `chord_sft_loss(..., normalizer=)`).
    """
    return (1.0 - mu) * grpo_loss + mu * sft_loss


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary-tiled LM-head projection (shared by OTR sampling and the expected OTR loss)
# --------------------------------------------------------------------------------------------------------------------


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # Half-precision inputs are projected in fp32; fp32/fp64 inputs keep their precision.
    return torch.promote_types(hidden.dtype, torch.float32)


def _tile_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Raw logits `hidden @ weight.T (+ bias)` of one (token tile, vocabulary tile): the only projection here."""
    logits = hidden @ weight.to(hidden.dtype).T
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    return logits


def _vocab_tiles(vocab_size: int, vocab_chunk: int) -> Iterable[tuple[int, int]]:
    for start in range(0, vocab_size, vocab_chunk):
        yield start, min(start + vocab_chunk, vocab_size)


def _check_head(hidden, weight, bias, vocab_chunk: int, token_chunk: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"Expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}."
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")
    if vocab_chunk < 1 or token_chunk < 1:
        raise ValueError(f"vocab_chunk and token_chunk must be >= 1, got {vocab_chunk} and {token_chunk}.")


# --------------------------------------------------------------------------------------------------------------------
# OTR: One-Token Rollout (§11)
# --------------------------------------------------------------------------------------------------------------------


# Noise tiles may hold at least this many elements (4 MiB in fp32), so small tiles do not loop over samples one by one.
_MIN_NOISE_TILE = 2**20


@torch.no_grad()
def gumbel_max_sample_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_samples: int = 256,
    temperature: float = 1.3,
    generator: torch.Generator | None = None,
    vocab_chunk: int = 8192,
    token_chunk: int = 1024,
) -> torch.Tensor:
    """Draw K exact samples per row from `softmax((W h + b) / T)` without building `[N, V]` logits.

    Paper: https://huggingface.co/papers/2509.26313 (OTR samples K = 256 tokens per position from the policy flattened
    with κ = 1.3, which are this function's defaults). Gumbel-max trick: with i.i.d. `g_v ~ Gumbel(0, 1)`,
    `argmax_v (z_v / T + g_v)` is distributed as `softmax(z / T)`. The argmax over the vocabulary is taken as a running
    max over vocabulary tiles, with independent noise for every (row, sample, vocabulary entry), so each tile is
    projected once per token tile and the result is exact for any tiling.

    Args:
        hidden: `[N, H]` hidden states (one row per position to sample at).
        weight: `[V, H]` LM-head weight; bias: `[V]` or None.
        num_samples: K ≥ 1 samples per row, drawn with replacement.
        temperature: T > 0 (κ in OTR).
        generator: optional `torch.Generator` on `hidden`'s device, for reproducible draws.
        vocab_chunk, token_chunk: tile sizes. Logits exist one `[token_chunk, vocab_chunk]` tile at a time; noise is
            drawn for as many samples at once as keep the noise tile within max(token_chunk × vocab_chunk, 2^20)
            elements.

    Returns `[N, K]` int64 token ids. Cost: N·K·V Gumbel draws in fp64 (compute grows with K), memory O(tile).
    """
    _check_head(hidden, weight, bias, vocab_chunk, token_chunk)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    dtype = _compute_dtype(hidden)
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    samples = torch.empty(num_rows, num_samples, dtype=torch.long, device=hidden.device)
    noise_budget = max(token_chunk * vocab_chunk, _MIN_NOISE_TILE)
    for row_start in range(0, num_rows, token_chunk):
        h = hidden[row_start : row_start + token_chunk].to(dtype)
        best = torch.full((h.shape[0], num_samples), -math.inf, dtype=dtype, device=h.device)
        best_index = torch.zeros(h.shape[0], num_samples, dtype=torch.long, device=h.device)
        for start, end in _vocab_tiles(vocab_size, vocab_chunk):
            scaled = _tile_logits(h, weight[start:end], None if bias is None else bias[start:end]) / temperature
            group = max(1, min(num_samples, noise_budget // scaled.numel()))
            for k0 in range(0, num_samples, group):
                k1 = min(k0 + group, num_samples)
                # fp64 uniforms: fp32 ones are multiples of 2^-24, which makes the Gumbel tail (where the winner of a
                # large, flat vocabulary lies) visibly coarse. u = 0 gives −inf noise: that entry never wins.
                uniform = torch.rand(
                    (h.shape[0], k1 - k0, end - start), generator=generator, dtype=torch.float64, device=h.device
                )
                perturbed = scaled.unsqueeze(1) - torch.log(-torch.log(uniform)).to(dtype)
                tile_max, tile_arg = perturbed.max(dim=-1)
                improved = tile_max > best[:, k0:k1]
                best[:, k0:k1] = torch.where(improved, tile_max, best[:, k0:k1])
                best_index[:, k0:k1] = torch.where(improved, tile_arg + start, best_index[:, k0:k1])
        samples[row_start : row_start + h.shape[0]] = best_index
    return samples


def otr_ensure_gold(samples: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[recon] knob `otr_include_gold` (default off): make every row's candidate set contain the ground truth.

    Paper: https://huggingface.co/papers/2509.26313. The spec allows "an optional knob to always include the ground
    truth" for positions where y_t was never sampled (otherwise only the β-term acts there); the exact rule is
    reconstructed: in rows whose K samples miss `labels`, the last sample is replaced by the label. Returns a new
    `[N, K]` tensor; score it (log-probs) after this call.
    """
    missing = ~(samples == labels.unsqueeze(-1)).any(dim=-1)
    out = samples.clone()
    out[missing, -1] = labels[missing]
    return out


def otr_rewards(
    samples: torch.Tensor, labels: torch.Tensor, beta: float = -0.1, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """OTR one-step reward `R(a, y_t) = 1 if a = y_t else β` for `[N, K]` sampled tokens against `[N]` gold tokens.

    Paper: https://huggingface.co/papers/2509.26313. β < 1; its value is not published: default −0.1 is [recon]
    (knob `otr_beta`). Returns `[N, K]` rewards in `dtype` (default: torch's default float dtype).
    """
    if beta >= 1:
        raise ValueError(f"OTR needs beta < 1 (a wrong token must earn less than the gold one), got {beta}.")
    rewards = torch.full(samples.shape, beta, dtype=dtype or torch.get_default_dtype(), device=samples.device)
    rewards[samples == labels.unsqueeze(-1)] = 1.0
    return rewards


OTR_BASELINES = ("none", "mean")


def otr_pg_loss(sampled_log_probs: torch.Tensor, rewards: torch.Tensor, baseline: str = "none") -> torch.Tensor:
    """Per-position OTR policy-gradient loss (Monte-Carlo form, `otr_estimator="mc"`, the default).

    Paper: https://huggingface.co/papers/2509.26313.

        L_t = −(1/K) Σ_j A_{t,j} · log π_θ(a_{t,j} | s_t),   A = R (baseline "none", default) or R − mean_j R ("mean")

    Args:
        sampled_log_probs: `[N, K]` log π_θ of the sampled tokens (with gradient). [unverified] knob
            `logprob_temperature`, default 1: the caller scores the samples at temperature 1 and no importance weight
            π/π' is applied.
        rewards: `[N, K]` from `otr_rewards` (detached).
        baseline: [recon] `"none"` is the spec's REINFORCE form; `"mean"` subtracts the per-position mean reward over
            the K samples (a variance-reduction choice; it cancels the β-term when no sample hits the gold token).

    Returns `[N]` per-position losses; the caller normalises (token-mean over valid SFT positions).
    """
    if baseline not in OTR_BASELINES:
        raise ValueError(f"baseline must be one of {OTR_BASELINES}, got {baseline!r}.")
    if sampled_log_probs.shape != rewards.shape:
        raise ValueError(
            f"sampled_log_probs {tuple(sampled_log_probs.shape)} and rewards {tuple(rewards.shape)} must match."
        )
    advantages = rewards.detach().to(sampled_log_probs.dtype)
    if baseline == "mean":
        advantages = advantages - advantages.mean(dim=-1, keepdim=True)
    return -(advantages * sampled_log_probs).mean(dim=-1)


def otr_expected_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    beta: float = -0.1,
    exploration_temperature: float = 1.3,
    logprob_temperature: float = 1.0,
    vocab_chunk: int = 8192,
    token_chunk: int = 1024,
) -> torch.Tensor:
    """Variance-free OTR loss (`otr_estimator="expected"`): the expectation of the MC loss over K → ∞ samples.

    Paper: https://huggingface.co/papers/2509.26313 (the expected form itself is [recon]).

        L_t = −[π'(y_t) log π(y_t) + β Σ_{v≠y_t} π'(v) log π(v)]
            = −[(1 − β)·π'(y_t)·log π(y_t) + β·Σ_v π'(v) log π(v)]

    with π' = softmax(z / κ) detached (κ = `exploration_temperature`, default 1.3) and log π = log_softmax(z / τ)
    (τ = `logprob_temperature`, [unverified] default 1). With β = 0 it is a DFT-like loss weighted by π'(y).

    Computed from hidden states and the LM head in `[token_chunk, vocab_chunk]` tiles with online log-sum-exp; the
    backward pass recomputes the tiles, so no `[N, V]` tensor exists in forward or backward. Gradients flow to
    `hidden`, `weight` and `bias`.

    Args:
        hidden: `[N, H]`; weight: `[V, H]`; bias: `[V]` or None; labels: `[N]` gold tokens (valid positions only).
        beta: OTR wrong-token reward, [recon] default −0.1.

    Returns `[N]` per-position losses.
    """
    _check_head(hidden, weight, bias, vocab_chunk, token_chunk)
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must have shape ({hidden.shape[0]},), got {tuple(labels.shape)}.")
    if labels.numel() and (labels.min() < 0 or labels.max() >= weight.shape[0]):
        raise ValueError("labels must be valid token ids: drop ignored (-100) positions before calling.")
    if exploration_temperature <= 0 or logprob_temperature <= 0:
        raise ValueError("exploration_temperature and logprob_temperature must be > 0.")
    return _OTRExpectedLoss.apply(
        hidden, weight, bias, labels, beta, exploration_temperature, logprob_temperature, vocab_chunk, token_chunk
    )


def _online_logsumexp_update(running_max, running_sum, tile):
    """One step of a streaming log-sum-exp over tiles.

    Returns the new running max, the new running sum of exp(· − max), the tile's weights exp(tile − new max) and the
    factor exp(old max − new max) that rescales any other running sum kept against the same max.
    """
    new_max = torch.maximum(running_max, tile.max(dim=-1).values)
    rescale = torch.exp(running_max - new_max)
    tile_weights = torch.exp(tile - new_max.unsqueeze(-1))
    return new_max, running_sum * rescale + tile_weights.sum(dim=-1), tile_weights, rescale


def _otr_expected_tile_forward(h, weight, bias, labels, beta, kappa, tau, vocab_chunk):
    """Forward on one token tile; returns the loss and what backward needs (both log-partition functions, π'(y))."""
    n = h.shape[0]
    neg_inf = torch.full((n,), -math.inf, dtype=h.dtype, device=h.device)
    explore_max, explore_sum, explore_weighted = neg_inf.clone(), h.new_zeros(n), h.new_zeros(n)
    policy_max, policy_sum = neg_inf.clone(), h.new_zeros(n)
    label_logit = h.new_zeros(n)
    for start, end in _vocab_tiles(weight.shape[0], vocab_chunk):
        z = _tile_logits(h, weight[start:end], None if bias is None else bias[start:end])
        explore_max, explore_sum, tile_weights, rescale = _online_logsumexp_update(explore_max, explore_sum, z / kappa)
        # Running Σ_v exp(z_v/κ − max)·z_v/τ, for Σ_v π'(v)·z_v/τ.
        explore_weighted = explore_weighted * rescale + (tile_weights * (z / tau)).sum(dim=-1)
        policy_max, policy_sum, _, _ = _online_logsumexp_update(policy_max, policy_sum, z / tau)
        in_tile = (labels >= start) & (labels < end)
        rows = in_tile.nonzero(as_tuple=True)[0]
        label_logit[rows] = z[rows, labels[rows] - start]
    explore_lse = explore_max + explore_sum.log()
    policy_lse = policy_max + policy_sum.log()
    explore_label_prob = torch.exp(label_logit / kappa - explore_lse)
    label_log_prob = label_logit / tau - policy_lse
    expected_log_prob = explore_weighted / explore_sum - policy_lse  # Σ_v π'(v) log π(v)
    loss = -((1.0 - beta) * explore_label_prob * label_log_prob + beta * expected_log_prob)
    return loss, explore_lse, policy_lse, explore_label_prob


class _OTRExpectedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, beta, kappa, tau, vocab_chunk, token_chunk):
        dtype = _compute_dtype(hidden)
        outputs = [
            _otr_expected_tile_forward(
                hidden[row_start : row_start + token_chunk].to(dtype),
                weight,
                bias,
                labels[row_start : row_start + token_chunk],
                beta,
                kappa,
                tau,
                vocab_chunk,
            )
            for row_start in range(0, hidden.shape[0], token_chunk)
        ]
        if outputs:
            loss, explore_lse, policy_lse, explore_label_prob = (torch.cat(parts) for parts in zip(*outputs))
        else:
            loss = explore_lse = policy_lse = explore_label_prob = hidden.new_zeros(0, dtype=dtype)
        ctx.save_for_backward(hidden, weight, bias, labels, explore_lse, policy_lse, explore_label_prob)
        ctx.hyper = (beta, kappa, tau, vocab_chunk, token_chunk)
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, explore_lse, policy_lse, explore_label_prob = ctx.saved_tensors
        beta, kappa, tau, vocab_chunk, token_chunk = ctx.hyper
        dtype = _compute_dtype(hidden)
        grad_hidden = torch.zeros_like(hidden, dtype=dtype)
        grad_weight = torch.zeros_like(weight, dtype=dtype) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=dtype) if bias is not None and ctx.needs_input_grad[2] else None
        grad_loss = grad_loss.to(dtype)
        for row_start in range(0, hidden.shape[0], token_chunk):
            rows = slice(row_start, row_start + token_chunk)
            h, y, g = hidden[rows].to(dtype), labels[rows], grad_loss[rows]
            # dL/dz_v = (1/τ)·[c·p_v − (1 − β)·π'(y)·1[v = y] − β·π'(v)],  c = (1 − β)·π'(y) + β,  p = softmax(z/τ).
            label_coef = (1.0 - beta) * explore_label_prob[rows]
            total_coef = label_coef + beta
            for start, end in _vocab_tiles(weight.shape[0], vocab_chunk):
                z = _tile_logits(h, weight[start:end], None if bias is None else bias[start:end])
                policy_probs = torch.exp(z / tau - policy_lse[rows].unsqueeze(-1))
                explore_probs = torch.exp(z / kappa - explore_lse[rows].unsqueeze(-1))
                grad_z = total_coef.unsqueeze(-1) * policy_probs - beta * explore_probs
                in_tile = ((y >= start) & (y < end)).nonzero(as_tuple=True)[0]
                grad_z[in_tile, y[in_tile] - start] -= label_coef[in_tile]
                grad_z = grad_z * (g / tau).unsqueeze(-1)
                grad_hidden[rows] += grad_z @ weight[start:end].to(dtype)
                if grad_weight is not None:
                    grad_weight[start:end] += grad_z.T @ h
                if grad_bias is not None:
                    grad_bias[start:end] += grad_z.sum(dim=0)
        return (
            grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------------------------
# ssToken (§12)
# --------------------------------------------------------------------------------------------------------------------

SS_SCOPES = ("sequence", "batch")


def retrospective_excess_loss(log_probs: torch.Tensor, history_log_probs: torch.Tensor) -> torch.Tensor:
    """ssToken retrospective excess loss `REL = L_his − L_θ = log π_θ(x_i | x_<i) − log π_his(x_i | x_<i)`.

    Paper: https://huggingface.co/papers/2510.18250. Positive REL: the current model has already improved on the token
    relative to the history model, i.e. it is still being learned. Both inputs are per-token label log-probs of the same
    shape; the result is detached (it is a selection score).
    """
    if log_probs.shape != history_log_probs.shape:
        raise ValueError(f"Shapes differ: {tuple(log_probs.shape)} vs {tuple(history_log_probs.shape)}.")
    return (log_probs - history_log_probs).detach()


def attention_prompt_mass(attentions: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """[recon] ssToken semantic score `S_att`: head-mean attention mass from each position to the prompt tokens.

    Paper: https://huggingface.co/papers/2510.18250 (the exact attention score is reconstructed).

        S_att[b, i] = (1/heads) Σ_h Σ_{j : prompt_mask[b, j]} A[b, h, i, j]

    Args:
        attentions: `[B, heads, L, L]` attention probabilities of one layer (default: the last), rows = query position,
            columns = key position, as returned by a transformers model with `output_attentions=True` (eager).
        prompt_mask: `[B, L]` bool/0-1, True on prompt tokens (non-padding positions whose label is -100).

    Returns `[B, L]` scores indexed by **token position**: the score of token x_i is row i. The label log-prob of x_i
    sits at position i − 1 after TRL's causal shift, so align with `scores[:, 1:]` against `labels[:, 1:]`.
    """
    if attentions.dim() != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attentions must be [B, heads, L, L], got {tuple(attentions.shape)}.")
    if prompt_mask.shape != (attentions.shape[0], attentions.shape[-1]):
        raise ValueError(f"prompt_mask must be [B, L] = {(attentions.shape[0], attentions.shape[-1])}.")
    key_mask = prompt_mask.to(attentions.dtype)[:, None, None, :]
    return (attentions * key_mask).sum(dim=-1).mean(dim=1)


def _masked_minmax(values: torch.Tensor, mask: torch.Tensor, scope: str) -> torch.Tensor:
    """`(x − min) / (max − min + 1e-8)` over the masked entries, per row (`"sequence"`) or over the whole batch."""
    dims = (-1,) if scope == "sequence" else tuple(range(values.dim()))
    lowest = values.masked_fill(~mask, math.inf).amin(dim=dims, keepdim=True)
    highest = values.masked_fill(~mask, -math.inf).amax(dim=dims, keepdim=True)
    normed = (values - lowest) / (highest - lowest + 1e-8)
    return normed.masked_fill(~mask, 0.0)


def ss_token_scores(
    rel: torch.Tensor,
    attention_scores: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.5,
    norm_scope: str = "sequence",
) -> torch.Tensor:
    """[recon] ssToken combined score `s = (1 − γ)·minmax(REL) + γ·minmax(S_att)`.

    Paper: https://huggingface.co/papers/2510.18250 (the combination rule is reconstructed).

    Args:
        rel: `[B, T]` from `retrospective_excess_loss`; attention_scores: `[B, T]` aligned with `rel`.
        mask: `[B, T]` 1 on valid response tokens; other entries get score 0 and are never selected.
        gamma: γ, [recon] default 0.5 (γ = 0: REL only; γ = 1: attention only).
        norm_scope: knob `ss_norm_scope`, [recon] default `"sequence"` (min-max within each row over its valid tokens);
            `"batch"` normalises over all valid tokens. The denominator carries +1e-8, so constant inputs map to 0.
    """
    if norm_scope not in SS_SCOPES:
        raise ValueError(f"norm_scope must be one of {SS_SCOPES}, got {norm_scope!r}.")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
    mask = mask.bool()
    rel_n = _masked_minmax(rel.detach(), mask, norm_scope)
    att_n = _masked_minmax(attention_scores.detach().to(rel_n.dtype), mask, norm_scope)
    return (1.0 - gamma) * rel_n + gamma * att_n


def ss_token_select(
    scores: torch.Tensor, mask: torch.Tensor, ratio: float = 0.6, scope: str = "sequence"
) -> torch.Tensor:
    """[recon] ssToken selection: keep the top `ceil(ρ·N)` valid tokens by score (at least 1 when N ≥ 1).

    Paper: https://huggingface.co/papers/2510.18250. ρ = `ratio`, [recon] default 0.6.

    Args:
        scores: `[B, T]` from `ss_token_scores`; mask: `[B, T]` valid response tokens (prompt/padding never kept).
        scope: [recon] knob `ss_select_scope`; `"sequence"` (default) keeps the top ceil(ρ·N_b) of each row's N_b valid
            tokens (so every non-empty response keeps ≥ 1 token, as the spec's short-response rule requires);
            `"batch"` keeps the top ceil(ρ·N) of all N valid tokens of the batch (local to this process).

    Ties are broken by position (earlier first), so the result is deterministic. Returns a `[B, T]` bool mask; the SFT
    loss is then the token-mean NLL over the kept tokens.
    """
    if scope not in SS_SCOPES:
        raise ValueError(f"scope must be one of {SS_SCOPES}, got {scope!r}.")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}.")
    mask = mask.bool()
    flat_scores = scores.reshape(1, -1) if scope == "batch" else scores
    flat_mask = mask.reshape(1, -1) if scope == "batch" else mask
    counts = flat_mask.sum(dim=-1, keepdim=True)
    # The 1e-9 guard keeps float error in ρ·N (0.7·10 = 7.000000000000001) from adding a token.
    keep_count = torch.ceil(counts.to(torch.float64) * ratio - 1e-9).clamp(min=1).to(counts.dtype)
    order = torch.sort(flat_scores.masked_fill(~flat_mask, -math.inf), dim=-1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return ((rank < keep_count) & flat_mask).reshape(mask.shape)


@torch.no_grad()
def ema_update_(
    history_params: Iterable[torch.Tensor], policy_params: Iterable[torch.Tensor], decay: float = 0.9
) -> None:
    """In-place EMA of the ssToken history model: `θ_his ← α·θ_his + (1 − α)·θ`.

    Paper: https://huggingface.co/papers/2510.18250. α = `decay`, [recon] default 0.9; α = 1 keeps a frozen base model
    (the spec's default history model). Parameters are paired in order and must have equal shapes.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    history_params, policy_params = list(history_params), list(policy_params)
    if len(history_params) != len(policy_params):
        raise ValueError(f"Got {len(history_params)} history and {len(policy_params)} policy parameters.")
    for his, cur in zip(history_params, policy_params, strict=True):
        if his.shape != cur.shape:
            raise ValueError(f"Parameter shapes differ: {tuple(his.shape)} vs {tuple(cur.shape)}.")
        his.lerp_(cur.to(his.dtype), 1.0 - decay)


# Elements of one fp32 `[rows, V]` logits tile of the multinomial OTR sampler (64 MiB).
_SAMPLER_TILE_ELEMENTS = 2**24


# ---------------------------------------------------------------------------------------------------------------------
# OTR tile helpers: exact multinomial sampling over vocabulary tiles and sparse scoring of sampled tokens
# ---------------------------------------------------------------------------------------------------------------------


def _transform(raw: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    """TRL's logits transform (`add_fused_lm_head`): scale, then optional tanh softcap."""
    z = raw * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@torch.no_grad()
def sample_tokens_tiled(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_samples: int,
    temperature: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    generator: torch.Generator | None = None,
    extra_indices: torch.Tensor | None = None,
    tile_elements: int = _SAMPLER_TILE_ELEMENTS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact samples `[N, K]` from `softmax(transform(W h + b) / T)`, a few rows at a time.

    Each tile holds the fp32 logits of `max(1, tile_elements // V)` rows over the whole vocabulary and draws its K
    samples with `torch.multinomial` (with replacement); no `[N, V]` tensor exists. The cost is one LM-head projection
    per row whatever K is, unlike Gumbel-max (`ops.sft.gumbel_max_sample_chunked`, K·V noise draws per row), whose
    memory is instead independent of V.

    With `extra_indices` (`[N, E]` token ids, e.g. the labels) it also returns the raw logits `W h + b` (before scale,
    softcap and temperature) at `[samples, extra_indices]`, `[N, K + E]` in fp32, read from the same tiles.
    """
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    samples = torch.empty(num_rows, num_samples, dtype=torch.long, device=hidden.device)
    extra = 0 if extra_indices is None else extra_indices.shape[1]
    raw_at = torch.empty(num_rows, num_samples + extra, dtype=dtype, device=hidden.device)
    rows_per_tile = max(1, tile_elements // vocab_size)
    vocab_step = max(1, tile_elements // rows_per_tile)
    for r0 in range(0, num_rows, rows_per_tile):
        h = hidden[r0 : r0 + rows_per_tile].to(dtype)
        raw = torch.empty(h.shape[0], vocab_size, dtype=dtype, device=hidden.device)
        # Cast the head one vocabulary slice at a time (a bf16 head is never copied whole).
        for v0 in range(0, vocab_size, vocab_step):
            raw[:, v0 : v0 + vocab_step] = h @ weight[v0 : v0 + vocab_step].to(dtype).T
        if bias is not None:
            raw += bias.to(dtype)
        probs = torch.softmax(_transform(raw, logit_scale, softcap) / temperature, dim=-1)
        drawn = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        samples[r0 : r0 + h.shape[0]] = drawn
        if extra_indices is not None:
            picked = torch.cat([drawn, extra_indices[r0 : r0 + h.shape[0]]], dim=-1)
            raw_at[r0 : r0 + h.shape[0]] = raw.gather(1, picked)
    return samples if extra_indices is None else (samples, raw_at)


def _row_tiles(num_rows: int, vocab_size: int, tile_elements: int):
    step = max(1, tile_elements // vocab_size)
    for r0 in range(0, num_rows, step):
        yield slice(r0, r0 + step)


@torch.no_grad()
def raw_logits_at(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    tile_elements: int = _SAMPLER_TILE_ELEMENTS,
) -> torch.Tensor:
    """Raw logits `h_n · W[indices[n, m]] + b[...]` (`[N, M]`, fp32), from `[rows, V]` projection tiles."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.empty(indices.shape, dtype=dtype, device=hidden.device)
    for rows in _row_tiles(indices.shape[0], weight.shape[0], tile_elements):
        raw = hidden[rows].to(dtype) @ weight.to(dtype).T
        if bias is not None:
            raw += bias.to(dtype)
        out[rows] = raw.gather(1, indices[rows])
    return out


class _SparseLogits(torch.autograd.Function):
    """Raw logits at given token ids, `[N, M]`, with gradients to the hidden states and the LM head.

    The forward returns precomputed values (from `sample_tokens_tiled` or `raw_logits_at`). The backward never
    gathers `[N, M, H]` head rows: `grad_hidden = Σ_m g_{n,m} W[idx_{n,m}]` is one `embedding_bag`, and
    `grad_W = Gᵀ h` is accumulated over row tiles of the `[rows, V]` gradient matrix `G` (duplicate ids summed by a
    scatter-add), i.e. one head-sized matrix product, as in the LM head's own backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, indices, values, tile_elements):
        ctx.save_for_backward(hidden, weight, bias, indices)
        ctx.tile_elements = tile_elements
        return values.clone()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, indices = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = grad_w = grad_b = None
        if need_h:
            grad_h = torch.nn.functional.embedding_bag(
                indices, weight, per_sample_weights=grad_out.to(weight.dtype), mode="sum"
            ).to(hidden.dtype)
        if need_w or (bias is not None and need_b):
            vocab_size, dtype = weight.shape[0], grad_out.dtype
            grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
            grad_b = torch.zeros(vocab_size, dtype=dtype, device=weight.device) if bias is not None and need_b else None
            for rows in _row_tiles(indices.shape[0], vocab_size, ctx.tile_elements):
                tile = torch.zeros(grad_out[rows].shape[0], vocab_size, dtype=dtype, device=weight.device)
                tile.scatter_add_(1, indices[rows], grad_out[rows])
                if grad_w is not None:
                    grad_w += tile.T @ hidden[rows].to(dtype)
                if grad_b is not None:
                    grad_b += tile.sum(dim=0)
            grad_w = None if grad_w is None else grad_w.to(weight.dtype)
            grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def gathered_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    raw_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable transformed logits `z[n, indices[n, m]]` (`[N, M]`, fp32), without the other V − M entries.

    `raw_values` (the raw logits at `indices`, e.g. from `sample_tokens_tiled`) skips their computation.
    """
    if raw_values is None:
        raw_values = raw_logits_at(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), indices)
    raw = _SparseLogits.apply(hidden, weight, bias, indices, raw_values, _SAMPLER_TILE_ELEMENTS)
    return _transform(raw, logit_scale, softcap)


def sampled_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    samples: torch.Tensor,
    labels: torch.Tensor,
    label_log_probs: torch.Tensor,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    raw_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable `log π_T(a_{n,k})` of sampled tokens `[N, K]`, from the label's log-probability.

    `log π_T(a) = log π_T(y) + (z_a − z_y) / T`: both sides share the log-partition, so with `label_log_probs` =
    `log π_T(y)` (with gradient, e.g. from TRL's fused head) only the K + 1 logits at `[samples, labels]` are needed,
    never a vocabulary pass. `raw_values`: their raw logits, `[N, K + 1]`, if already known.
    """
    indices = torch.cat([samples, labels.unsqueeze(-1)], dim=-1)
    z = gathered_logits(hidden, weight, bias, indices, logit_scale, softcap, raw_values)
    return label_log_probs.unsqueeze(-1) + (z[:, :-1] - z[:, -1:]) / temperature


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------
