"""HAPO, Heterogeneous Adaptive Policy Optimization (spec §4), https://huggingface.co/papers/2509.16591.

(b) token-level group average ``A_i = (R_i − μ_tok)/(σ_tok + ε)`` with token-count weights; (c) redistribution
``A_ent = A·(1 + β ĥ)`` applied to the neutral (low-entropy) or non-neutral (high-entropy) tokens; (d) asymmetric
clip ranges ``ε_low' = ε_low(1 − α ĥ)`` for ĥ ≤ 0, ``ε_high' = ε_high(1 + α ĥ)`` for ĥ > 0. The ĥ statistics and
the adaptive sampling temperature (a) live in ``ops/decoding.py`` (shared with the generation-time
LogitsProcessor) and are re-exported here.
"""

from __future__ import annotations

import torch

from trl_tokenlevel.ops.decoding import (  # noqa: F401  (HAPO ĥ and adaptive temperature, re-exported)
    HapoEntropyStats,
    hapo_adaptive_temperature,
    hapo_entropy_stats,
    hapo_normalized_entropy,
)

from .base import TokenAdvantageInputs, _group_sum, _masked, _num_groups, group_relative_advantages


def hapo_tlga_advantages(
    rewards: torch.Tensor,
    completion_mask: torch.Tensor,
    group_index: torch.Tensor,
    *,
    hapo_fallback_include_padding: bool = False,
    fallback_threshold: float = 5.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """HAPO Token-Level Group Average advantages (B,) (spec §4 (b), official ``compute_hapo_outcome_advantage``).

    Paper: https://huggingface.co/papers/2509.16591. With token counts ``|o_i|``:
    ``μ_tok = Σ|o_i|R_i/Σ|o_i|``, ``σ_tok = sqrt(Σ|o_i|(R_i − μ_tok)²/Σ|o_i|)``, ``A_i = (R_i − μ_tok)/(σ_tok + ε)``.
    Fallback: a group with any ``|A_i| ≥ 5`` (over its valid tokens, default) uses the GRPO advantages (unbiased std,
    same ε) instead. ``hapo_fallback_include_padding=True`` reproduces the official test on the padded (G, T) tensor
    ``R_i·m_{i,t}``, whose pad entries normalise to ``−μ_tok/(σ_tok + ε)`` and can trigger the fallback spuriously.

    Defaults: ε = 1e-6, threshold 5, valid-token test.
    """
    valid = completion_mask.bool()
    lengths = valid.sum(dim=1).to(rewards.dtype)
    num_groups = _num_groups(group_index)
    token_total = _group_sum(lengths, group_index, num_groups)
    mean = _group_sum(lengths * rewards, group_index, num_groups) / token_total.clamp(min=1)
    centred = rewards - mean[group_index]
    var = _group_sum(lengths * centred**2, group_index, num_groups) / token_total.clamp(min=1)
    std = var.sqrt()[group_index]
    tlga = centred / (std + eps)

    too_large = (tlga.abs() >= fallback_threshold) & (lengths > 0)
    if hapo_fallback_include_padding:
        pad_value = (-mean[group_index]) / (std + eps)
        too_large |= (pad_value.abs() >= fallback_threshold) & (lengths < completion_mask.shape[1])
    fallback = _group_sum(too_large.to(rewards.dtype), group_index, num_groups) > 0
    grpo = group_relative_advantages(rewards, group_index, eps=eps)
    return torch.where(fallback[group_index], grpo, tlga)


def hapo_clip_bounds(
    h_hat: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    clip_alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HAPO asymmetric adaptive clip ranges per token (spec §4 (d), official ``ada_clip``).

    Paper: https://huggingface.co/papers/2509.16591. ĥ ≤ 0: ``ε_low' = ε_low·(1 − α ĥ)``, ε_high unchanged;
    ĥ > 0: ``ε_high' = ε_high·(1 + α ĥ)``, ε_low unchanged. Defaults ε_low = ε_high = 0.2, α = 1.0 (``clip_alpha``).
    Returns ``(eps_low, eps_high)`` shaped like ``h_hat``; use them in the PPO dual-clip loss
    (:func:`hapo_dual_clip_loss`, c = 10).
    """
    high = h_hat > 0
    eps_low = torch.where(high, torch.full_like(h_hat, epsilon_low), epsilon_low * (1 - clip_alpha * h_hat))
    eps_high = torch.where(high, epsilon_high * (1 + clip_alpha * h_hat), torch.full_like(h_hat, epsilon_high))
    return eps_low, eps_high


def hapo_dual_clip_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: torch.Tensor | float,
    eps_high: torch.Tensor | float,
    *,
    dual_clip: float | None = 10.0,
) -> torch.Tensor:
    """Per-token PPO dual-clip loss with per-token clip ranges, (B, T) (spec §4 Loss, official ``compute_policy_loss``).

    Paper: https://huggingface.co/papers/2509.16591 (dual clip: Ye et al., https://arxiv.org/abs/1912.09729).

        ℓ_PPO = max(−A·r, −A·clip(r, 1 − ε_low', 1 + ε_high'))
        ℓ     = min(ℓ_PPO, −c·A)  if A < 0,  else ℓ_PPO

    For A < 0 the loss is capped at ``c·|A|`` and the token stops pushing once ``r > c`` (no gradient there); A ≥ 0 is
    unchanged. ``dual_clip=None`` gives the plain clipped surrogate. Default c = 10 (``clip_ratio_c``, official).

    TRL's clipped losses have no dual clip, but their ``delta`` cap on the unclipped ratio is the same function when
    ``c ≥ 1 + ε_high'``: with ``r' = min(r, c)``, ``−min(r'A, clip(r)A)`` equals ℓ for A < 0 (``max(min(r, c),
    clip(r)) = min(c, max(r, clip(r)))`` as ``clip(r) ≤ 1 + ε_high' ≤ c``) and ℓ_PPO for A ≥ 0 (``min(min(r, c),
    clip(r)) = min(r, clip(r))``). The trainer uses that route; tests check it against this function.
    """
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)
    if dual_clip is None:
        return loss
    return torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)


def hapo_redistribute_advantages(
    advantages: torch.Tensor,
    h_hat: torch.Tensor,
    ratio: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    clip_alpha: float = 1.0,
    adv_beta: float = 1.0,
) -> torch.Tensor:
    """HAPO differential advantage redistribution, (B, T) (spec §4 (c), official ``ada_advantage``).

    Paper: https://huggingface.co/papers/2509.16591. ``A_ent = A·(1 + β ĥ)``; a token is "neutral" when
    ``1 − ε_low'/2 < r < 1 + ε_high'/2`` (clip ranges of :func:`hapo_clip_bounds`, r the current importance ratio,
    no grad). High-entropy token (ĥ > 0): A if neutral, else A_ent. Low-entropy token (ĥ ≤ 0): A_ent if neutral,
    else A. ``advantages`` is (B,) or (B, T). Defaults β = 1.0 (``adv_beta``), α = 1.0, ε_low = ε_high = 0.2.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.expand(h_hat.shape)
    ratio = ratio.detach()
    eps_low, eps_high = hapo_clip_bounds(
        h_hat, epsilon_low=epsilon_low, epsilon_high=epsilon_high, clip_alpha=clip_alpha
    )
    neutral = (ratio > 1 - eps_low / 2) & (ratio < 1 + eps_high / 2)
    entropy_adv = advantages * (1 + adv_beta * h_hat)
    use_entropy_adv = torch.where(h_hat > 0, ~neutral, neutral)
    return _masked(torch.where(use_entropy_adv, entropy_adv, advantages), completion_mask)


def hapo_token_advantages(
    batch: TokenAdvantageInputs,
    *,
    entropy_pivot: float = 0.8,
    adv_beta: float = 1.0,
    clip_alpha: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    hapo_repo_sign_compat: bool = False,
    hapo_fallback_include_padding: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Registry entry ``"hapo"``: TLGA advantages redistributed by entropy and ratio (spec §4 (b)+(c)).

    Paper: https://huggingface.co/papers/2509.16591. ĥ from ``batch.per_token_entropy``; the ratio is
    ``exp(per_token_logps − old_per_token_logps)`` (1 when ``old_per_token_logps`` is None, i.e. when called at
    generation time, where every token is neutral). The clip ranges (d) are for the loss: :func:`hapo_clip_bounds`.
    Defaults as in ``qwen3_8b.sh``: pivot 0.8, α = β = 1, ε_low = ε_high = 0.2; intended sign; valid-token fallback.
    """
    mask = batch.completion_mask
    if mask.bool().any():
        stats = hapo_entropy_stats(batch.per_token_entropy, mask, entropy_pivot, hapo_repo_sign_compat)
        h_hat = _masked(hapo_normalized_entropy(batch.per_token_entropy, stats), mask)
    else:
        h_hat = torch.zeros_like(batch.per_token_entropy)
    tlga = hapo_tlga_advantages(
        batch.rewards, mask, batch.group_index, hapo_fallback_include_padding=hapo_fallback_include_padding, eps=eps
    )
    if batch.old_per_token_logps is None:
        ratio = torch.ones_like(h_hat)
    else:
        ratio = torch.exp(_masked(batch.per_token_logps - batch.old_per_token_logps, mask))
    return hapo_redistribute_advantages(
        tlga.to(h_hat.dtype),
        h_hat,
        ratio,
        mask,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        clip_alpha=clip_alpha,
        adv_beta=adv_beta,
    )
