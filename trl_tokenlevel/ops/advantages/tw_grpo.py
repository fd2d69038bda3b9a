"""TW-GRPO, token-weighted GRPO (spec §8), https://huggingface.co/papers/2505.24718.

``Â_{i,t} = A_i·w_t`` with ``w_t = 1 + (α − 1)·D̂_t``, ``D_t`` the group's per-position disagreement (k3 KL of each
completion's distribution from the group mean, summed over the vocabulary) and ``D̂`` its min-max normalisation.
"""

from __future__ import annotations

import math

import torch

from .base import TokenAdvantageInputs, _group_sum, _masked, _num_groups


def tw_grpo_position_divergence(
    full_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    group_index: torch.Tensor,
) -> torch.Tensor:
    """TW-GRPO per-position disagreement ``D_t`` of each group, (num_groups, T) (spec §8, official
    ``compute_token_importance_kl_logs_uniform``).

    Paper: "Reinforcing Video Reasoning with Focused Thinking", https://huggingface.co/papers/2505.24718.
    Positions beyond a completion's length use the uniform ``−log V``; ``ℓ̄_t = mean_g ℓ_{g,t}`` (mean of
    log-probs); ``d = clamp(ℓ̄ − ℓ_g, −11, 11)``; ``κ_{g,t} = Σ_v (e^d − d − 1)`` (k3 summed over V);
    ``D_t = mean_g κ_{g,t}``.
    """
    vocab = full_logps.shape[-1]
    logps = torch.where(completion_mask.bool()[..., None], full_logps, torch.full_like(full_logps, -math.log(vocab)))
    num_groups = _num_groups(group_index)
    counts = torch.bincount(group_index, minlength=num_groups).clamp(min=1).to(logps.dtype)
    mean_logps = _group_sum(logps, group_index, num_groups) / counts[:, None, None]
    diff = (mean_logps[group_index] - logps).clamp(-11.0, 11.0)
    k3 = (torch.exp(diff) - diff - 1).sum(dim=-1)
    return _group_sum(k3, group_index, num_groups) / counts[:, None]


def tw_grpo_token_weights(
    full_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    group_index: torch.Tensor,
    *,
    tw_alpha: float = 1.7,
    tw_weight_grad: bool = False,
) -> torch.Tensor:
    """TW-GRPO position weights ``w_t = 1 + (α − 1)·D̂_t``, shared by the group, times the mask, (B, T) (spec §8).

    Paper: https://huggingface.co/papers/2505.24718. ``D̂_t = (D_t − min_t D)/(max_t D − min_t D + 1e-8)`` over all
    positions of the group (padding positions included); D from :func:`tw_grpo_position_divergence`. Equal D
    everywhere (or a size-1 group) gives w = 1. The loss is ``Σ m·w·ℓ^PPO / Σ m``, i.e. the stock token-mean loss
    with advantages ``A_i·w_{i,t}`` (w > 0).

    Defaults: α = 1.7 (``scripts/tw-grpo.sh``; the trainer default is 1.4); detached weights
    (``tw_weight_grad=False``). ``tw_weight_grad=True`` reproduces the official code, which builds w from
    grad-carrying log-probs (only meaningful when called inside the loss forward).
    """
    if not tw_weight_grad:
        full_logps = full_logps.detach()
    divergence = tw_grpo_position_divergence(full_logps, completion_mask, group_index)
    return tw_grpo_weights_from_divergence(divergence[group_index], completion_mask, tw_alpha=tw_alpha)


def tw_grpo_weights_from_divergence(
    divergence: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    tw_alpha: float = 1.7,
) -> torch.Tensor:
    """TW-GRPO weights ``w_t = 1 + (α − 1)·D̂_t`` from per-row divergences, times the mask, (B, T) (spec §8).

    ``divergence`` (B, T) holds ``D_t`` of each row's group at **every** position, padding positions included (rows of
    one group are equal): :func:`tw_grpo_position_divergence` indexed by the group index, or
    ``trl_tokenlevel.ops.chunked.chunked_tw_grpo_divergence`` from hidden states. ``D̂`` is the min-max normalisation
    over the row's positions (``+ 1e-8`` in the denominator, so equal D gives w = 1).
    """
    low = divergence.min(dim=1, keepdim=True).values
    high = divergence.max(dim=1, keepdim=True).values
    normalized = (divergence - low) / (high - low + 1e-8)
    return _masked(1 + (tw_alpha - 1) * normalized, completion_mask)


def tw_grpo_soft_reward(answer: str, gold: str, *, verified: bool = False) -> float:
    """TW-GRPO soft multi-choice reward (spec §8, official ``accuracy_reward``).

    Paper: https://huggingface.co/papers/2505.24718. 1 if the answer was symbolically verified; otherwise, with the
    comma-separated answer sets A (model) and G* (gold), ``|A|/|G*|`` if A ⊆ G*, else 0. Items are whitespace-
    stripped and empty items ignored [recon]; an empty gold set gives 0.
    """
    if verified:
        return 1.0
    predicted = {item.strip() for item in answer.split(",") if item.strip()}
    reference = {item.strip() for item in gold.split(",") if item.strip()}
    if not reference or not predicted <= reference:
        return 0.0
    return len(predicted) / len(reference)


def tw_grpo_token_advantages(
    batch: TokenAdvantageInputs,
    *,
    tw_alpha: float = 1.7,
    tw_weight_grad: bool = False,
) -> torch.Tensor:
    """Registry entry ``"tw_grpo"``: ``Â_{i,t} = A_i·w_{i,t}`` (spec §8).

    Paper: https://huggingface.co/papers/2505.24718. ``A_i`` is ``batch.advantages``; w (α = 1.7) from either
    ``batch.tw_grpo_divergence`` (B, T), the detached statistic that ``ops.chunked.chunked_tw_grpo_divergence`` builds
    from hidden states and the LM head in vocabulary tiles (what the trainer passes: no (B, T, V) tensor), or
    ``batch.full_logps`` (B, T, V) through :func:`tw_grpo_token_weights` (detached unless ``tw_weight_grad=True``).
    ``full_logps`` wins when both are set.
    """
    if batch.full_logps is not None:
        weights = tw_grpo_token_weights(batch.full_logps, batch.completion_mask, batch.group_index,
                                        tw_alpha=tw_alpha, tw_weight_grad=tw_weight_grad)  # fmt: skip
    elif batch.tw_grpo_divergence is not None:
        if tw_weight_grad:
            raise ValueError(
                "tw_weight_grad=True differentiates the weights through the full log-probabilities: pass "
                "TokenAdvantageInputs.full_logps with gradient; tw_grpo_divergence is a detached statistic."
            )
        weights = tw_grpo_weights_from_divergence(batch.tw_grpo_divergence, batch.completion_mask, tw_alpha=tw_alpha)
    else:
        raise ValueError(
            "Token advantage method 'tw_grpo' needs TokenAdvantageInputs.tw_grpo_divergence (B, T) (from hidden states "
            "and the LM head: trl_tokenlevel.ops.chunked.chunked_tw_grpo_divergence) or full_logps (B, T, V)."
        )
    return batch.advantages[:, None].to(weights.dtype) * weights
