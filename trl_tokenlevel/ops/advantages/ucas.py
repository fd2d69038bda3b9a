"""UCAS, Uncertainty-aware Advantage Shaping (spec §3), https://huggingface.co/papers/2510.10649.

``Â_{i,t} = A_i·w_i − κ·n_{i,t}`` (clamped at 0 from below when ``A_i w_i > 0``), with
``w_i = exp(−β₊ ĉ_i)`` if ``A_i > 0`` else ``exp(β₋ ĉ_i)``, ``ĉ`` the group z-score of the response self-certainty
``C_i = Σ_t s_{i,t}`` (``s = logsumexp(z) − mean_v z``) and ``n`` the batch min-max normalised sampled-token logit.
"""

from __future__ import annotations

import torch

from trl_tokenlevel.ops.selection import GatherFn, _check_choice

from .base import TokenAdvantageInputs, _masked, group_relative_advantages

CONFIDENCE_AGGREGATIONS = ("sum", "mean")


def ucas_self_certainty(logits: torch.Tensor) -> torch.Tensor:
    """UCAS token self-certainty ``s = logsumexp(z) − mean_v(z)`` (= KL(U‖p) + log V) over the last dim.

    Paper: https://huggingface.co/papers/2510.10649. ``logits`` are temperature-scaled (..., V).
    """
    return torch.logsumexp(logits, dim=-1) - logits.mean(dim=-1)


def ucas_self_certainty_from_logprobs(
    sampled_logits: torch.Tensor,
    sampled_logps: torch.Tensor,
    mean_logits: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """UCAS self-certainty ``s = logsumexp(z/T) − mean_v(z/T)`` without the vocabulary: elementwise, from the sampled
    token's raw logit ``z_y``, its log-probability ``log p_T(y)`` at temperature T and the mean raw logit ``mean_v z``.

    ``log p_T(y) = z_y/T − logsumexp(z/T)``, so ``logsumexp(z/T) = z_y/T − log p_T(y)`` and
    ``s = (z_y − mean_v z)/T − log p_T(y)``. ``z`` are the transformed logits before temperature (after the LM head's
    logit scale and softcap); the log-prob is the one the policy's (fused) head returns at T. Any shape.
    """
    return (sampled_logits - mean_logits) / temperature - sampled_logps


def ucas_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    self_certainty: torch.Tensor,
    sampled_token_logits: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta_pos: float = 0.25,
    beta_neg: float = 0.35,
    kappa: float = 0.05,
    confidence_agg: str = "sum",
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
    gather_fn: GatherFn | None = None,
) -> torch.Tensor:
    """UCAS: uncertainty-aware advantage shaping, (B, T) advantages (spec §3, official ``compute_ucas_advantage``).

    Paper: "Unlocking Exploration in RLVR: Uncertainty-aware Advantage Shaping for Deeper Reasoning",
    https://huggingface.co/papers/2510.10649.

    - ``C_i = Σ_t m s_{i,t}`` (``confidence_agg="sum"``, default; ``"mean"`` divides by |o_i|);
    - group z-scores (unbiased std, ε): ``A_i`` of the rewards and ``ĉ_i`` of C (a size-1 group uses mean 0, std 1;
      ``norm_adv_by_std=False`` only centres both);
    - ``w_i = exp(−β₊ ĉ_i)`` if ``A_i > 0`` else ``exp(β₋ ĉ_i)``;
    - ``n_{i,t} = (ℓ − min)/(max − min + 1e-6)`` of the raw sampled-token logits ℓ over all valid tokens of the batch
      (``n = 0.5`` if max ≈ min); ``gather_fn`` (concatenate a 1-D tensor across ranks) makes min/max global;
    - ``Â_{i,t} = A_i w_i − κ n_{i,t}``, clamped at 0 from below when ``A_i w_i > 0``.

    Defaults (official, hard-coded there): β₊ = 0.25, β₋ = 0.35, κ = 0.05, ε = 1e-6, sum aggregation.
    """
    _check_choice("confidence_agg", confidence_agg, CONFIDENCE_AGGREGATIONS)
    valid = completion_mask.bool()
    with torch.no_grad():
        confidence = _masked(self_certainty, valid).sum(dim=1)
        if confidence_agg == "mean":
            confidence = confidence / valid.sum(dim=1).clamp(min=1)
        adv = group_relative_advantages(rewards, group_index, eps=eps, norm_adv_by_std=norm_adv_by_std)
        conf_z = group_relative_advantages(
            confidence.to(adv.dtype), group_index, eps=eps, norm_adv_by_std=norm_adv_by_std
        )
        modifier = torch.where(adv > 0, torch.exp(-beta_pos * conf_z), torch.exp(beta_neg * conf_z))
        response_adv = adv * modifier

        logits = sampled_token_logits.to(adv.dtype)
        bounds = torch.stack(
            [
                logits.masked_fill(~valid, float("inf")).min(),
                logits.masked_fill(~valid, float("-inf")).max(),
            ]
        )
        if gather_fn is not None:
            bounds = gather_fn(bounds)
        # One (low, high) pair per rank; a rank without valid tokens sends (+inf, −inf), so min of lows, max of highs.
        bounds = bounds.reshape(-1, 2)
        low, high = bounds[:, 0].min(), bounds[:, 1].max()
        if not torch.isfinite(low):  # no valid token on any rank
            return torch.zeros_like(logits)
        if torch.isclose(high, low):
            certainty = torch.full_like(logits, 0.5)
        else:
            certainty = (logits - low) / (high - low + 1e-6)
        raw = response_adv[:, None] - kappa * certainty
        shaped = torch.where(response_adv[:, None] > 0, raw.clamp(min=0), raw)
        return _masked(shaped, valid)


def ucas_token_advantages(batch: TokenAdvantageInputs, **knobs) -> torch.Tensor:
    """Registry entry ``"ucas"``: :func:`ucas_advantages` on ``batch.rewards`` (UCAS forms its own group z-score).

    Needs ``batch.self_certainty`` and ``batch.sampled_token_logits`` (old-policy forward). Knobs as in
    :func:`ucas_advantages`.
    """
    return ucas_advantages(
        batch.rewards,
        batch.group_index,
        batch.require("self_certainty", "ucas"),
        batch.require("sampled_token_logits", "ucas"),
        batch.completion_mask,
        **knobs,
    )
