"""Per-token advantage shaping for token-level RL (spec ``shared/specs/rl_sft_decoding.md``, Part A).

Each method turns a GRPO batch into ``(B, T)`` advantages that TRL's ``GRPOTrainer._compute_loss`` accepts in place of
its ``(B,)`` ones, so the stock clipped loss is reused. Padding positions are exactly 0; all-masked rows and empty
groups never produce NaN. Groups are rows sharing a prompt: ``group_ids`` (any integer labels) or TRL's contiguous
layout of ``num_generations`` rows per prompt; a whole group must be present in the call.

Trainer hook: ``TOKEN_ADVANTAGE_METHODS[name](batch: TokenAdvantageInputs, **knobs) -> (B, T)``.

Families (the paper, equation and defaults are in each docstring):
- group-relative helpers: :func:`resolve_group_index`, :func:`group_relative_advantages`;
- UCAS (§3), HAPO (§4), GTPO (§5), D³S sample level (§6), TW-GRPO (§8), RMT knobs (§9), TEMPO/TVM prefix-tree
  credit (§10), and the TTRL majority-vote pseudo-reward used by SPINE (§2).
- Re-exported so each RL family is reachable from here: CHORD μ schedule, φ weights, SFT loss and mix (§7) from
  ``ops.sft`` (CHORD-φ is also an SFT token loss), and HAPO's ĥ statistics and adaptive temperature (§4 (a)) from
  ``ops.decoding`` (shared with the generation-time LogitsProcessor).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence, Union

import torch

from trl_tokenlevel.ops.decoding import (  # noqa: F401  (HAPO ĥ and adaptive temperature, re-exported)
    HapoEntropyStats,
    hapo_adaptive_temperature,
    hapo_entropy_stats,
    hapo_normalized_entropy,
)
from trl_tokenlevel.ops.selection import (
    GatherFn,
    _check_choice,
    _check_ratio,
    ceil_count,
    d3s_token_mask,
)
from trl_tokenlevel.ops.sft import chord_mix, chord_mu, chord_phi, chord_sft_loss  # noqa: F401  (CHORD, re-exported)

# ---------------------------------------------------------------------------------------------------------------------
# Inputs and group helpers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenAdvantageInputs:
    """What a token-level advantage method may read from a GRPO generation batch.

    Core fields (TRL names): ``completion_ids`` (B, T) long, ``completion_mask`` (B, T) 0/1 (times ``tool_mask`` if
    any), ``per_token_logps`` (B, T), ``per_token_entropy`` (B, T) full-vocab entropy in nats, ``rewards`` (B,) summed
    rewards, ``advantages`` (B,) the stock GRPO advantages. Optional: ``old_per_token_logps`` (B, T) (HAPO's ratio;
    missing means ratio 1), and exactly one of ``group_ids`` (B,) or ``num_generations``.

    Method-specific optional fields (a method that needs one raises a ValueError naming it):
    - ``self_certainty`` (B, T): UCAS token self-certainty ``logsumexp(z) − mean_v(z)`` of temperature-scaled logits
      (:func:`ucas_self_certainty`);
    - ``sampled_token_logits`` (B, T): UCAS raw (pre-temperature) logit of the sampled token;
    - ``full_logps`` (B, T, V): TW-GRPO full-vocabulary log-probabilities;
    - ``tw_grpo_divergence`` (B, T): TW-GRPO position disagreement ``D_t`` of each row's group at every position
      (padding positions included), the statistic that ``full_logps`` would give; built from hidden states in
      vocabulary tiles by ``trl_tokenlevel.ops.chunked.chunked_tw_grpo_divergence`` (no (B, T, V) tensor);
    - ``initial_mean_entropy`` (B,): GTPO ``entropy_filter="readme"``, mean entropy under the initial policy.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    per_token_logps: torch.Tensor
    per_token_entropy: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    old_per_token_logps: Optional[torch.Tensor] = None
    group_ids: Optional[torch.Tensor] = None
    num_generations: Optional[int] = None
    self_certainty: Optional[torch.Tensor] = None
    sampled_token_logits: Optional[torch.Tensor] = None
    full_logps: Optional[torch.Tensor] = None
    initial_mean_entropy: Optional[torch.Tensor] = None
    tw_grpo_divergence: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        shape = tuple(self.completion_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"completion_ids must be (B, T), got shape {shape}.")
        for name in ("completion_mask", "per_token_logps", "per_token_entropy", "old_per_token_logps",
                     "self_certainty", "sampled_token_logits", "tw_grpo_divergence"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)} but completion_ids has shape {shape}.")
        for name in ("rewards", "advantages", "group_ids", "initial_mean_entropy"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape[:1]:
                raise ValueError(f"{name} must have shape ({shape[0]},), got {tuple(value.shape)}.")
        if self.full_logps is not None and tuple(self.full_logps.shape[:2]) != shape:
            raise ValueError(f"full_logps must be (B, T, V) with (B, T) = {shape}, got {tuple(self.full_logps.shape)}.")
        if (self.group_ids is None) == (self.num_generations is None):
            raise ValueError("Pass exactly one of group_ids (B,) or num_generations (rows per prompt, TRL layout).")
        # Validates num_generations against the batch size early.
        resolve_group_index(shape[0], self.group_ids, self.num_generations, self.completion_ids.device)

    @property
    def group_index(self) -> torch.Tensor:
        """Compact group index (B,) in ``[0, num_groups)``."""
        return resolve_group_index(
            self.completion_ids.shape[0], self.group_ids, self.num_generations, self.completion_ids.device
        )

    def require(self, name: str, method: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"Token advantage method {method!r} needs TokenAdvantageInputs.{name}.")
        return value


def resolve_group_index(
    batch_size: int,
    group_ids: Optional[torch.Tensor] = None,
    num_generations: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Compact group index (B,) long in ``[0, num_groups)`` from arbitrary ``group_ids`` or TRL's contiguous layout of
    ``num_generations`` consecutive rows per prompt."""
    if group_ids is not None:
        return torch.unique(group_ids, return_inverse=True)[1].reshape(-1)
    if num_generations is None or num_generations < 1 or batch_size % num_generations != 0:
        raise ValueError(
            f"num_generations={num_generations} must be ≥ 1 and divide the batch size {batch_size}; pass group_ids "
            "for other layouts."
        )
    return torch.arange(batch_size, device=device) // num_generations


def _num_groups(group_index: torch.Tensor) -> int:
    return int(group_index.max()) + 1 if group_index.numel() else 0


def _group_sum(values: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> torch.Tensor:
    out = values.new_zeros((num_groups,) + tuple(values.shape[1:]))
    return out.index_add_(0, group_index, values)


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` else exactly 0 (never NaN·0)."""
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def group_relative_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_adv_by_std: bool = True,
) -> torch.Tensor:
    """GRPO group-relative advantages ``A_i = (R_i − mean_g R)/(std_g R + ε)`` (B,).

    Paper: DeepSeekMath, https://huggingface.co/papers/2402.03300. Unbiased std as in TRL and verl. Default ε = 1e-6
    (verl, used by the official code of most methods here and by the spec's worked examples; TRL uses 1e-4).
    ``norm_adv_by_std=False`` only centres. A group of size 1 uses mean 0 and std 1 (verl's rule), so nothing is NaN;
    group indices need not be compact (empty groups are ignored).
    """
    num_groups = _num_groups(group_index)
    counts = torch.bincount(group_index, minlength=num_groups).to(rewards.dtype)
    mean = _group_sum(rewards, group_index, num_groups) / counts.clamp(min=1)
    centred = rewards - mean[group_index]
    var = _group_sum(centred**2, group_index, num_groups) / (counts - 1).clamp(min=1)
    singleton = (counts <= 1)[group_index]
    centred = torch.where(singleton, rewards, centred)
    if not norm_adv_by_std:
        return centred
    std = torch.where(singleton, torch.ones_like(rewards), var.sqrt()[group_index])
    return centred / (std + eps)


def _broadcast_rows(row_values: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T) on the valid tokens, 0 on padding."""
    return _masked(row_values[:, None].expand(completion_mask.shape), completion_mask)


# ---------------------------------------------------------------------------------------------------------------------
# SPINE / TTRL pseudo-reward (§2)
# ---------------------------------------------------------------------------------------------------------------------

VOTE_TIE_BREAKS = ("first", "none")


def ttrl_majority_vote_rewards(answers: Sequence[Optional[Hashable]], *, tie_break: str = "first") -> torch.Tensor:
    """TTRL majority-vote pseudo-rewards ``R_i = 1[y_i = mode({y_j})]`` for one prompt's sampled answers (spec §2).

    Paper: SPINE, https://huggingface.co/papers/2511.17938 (pseudo-labels from TTRL). ``None`` marks an unparseable
    answer: it gets 0 and does not vote. Ties between the most frequent answers: ``tie_break="first"`` (default) picks
    the first seen; ``"none"`` gives every answer 0. No parseable answer: all zeros (the caller skips the group).
    Returns float32 rewards (G,).
    """
    _check_choice("tie_break", tie_break, VOTE_TIE_BREAKS)
    votes = Counter(answer for answer in answers if answer is not None)
    rewards = torch.zeros(len(answers))
    if not votes:
        return rewards
    top = max(votes.values())
    leaders = [answer for answer in votes if votes[answer] == top]  # Counter keeps first-seen order
    if len(leaders) > 1 and tie_break == "none":
        return rewards
    majority = leaders[0]
    for i, answer in enumerate(answers):
        if answer is not None and answer == majority:
            rewards[i] = 1.0
    return rewards


# ---------------------------------------------------------------------------------------------------------------------
# UCAS (§3)
# ---------------------------------------------------------------------------------------------------------------------

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
    gather_fn: Optional[GatherFn] = None,
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
        conf_z = group_relative_advantages(confidence.to(adv.dtype), group_index, eps=eps,
                                           norm_adv_by_std=norm_adv_by_std)
        modifier = torch.where(adv > 0, torch.exp(-beta_pos * conf_z), torch.exp(beta_neg * conf_z))
        response_adv = adv * modifier

        logits = sampled_token_logits.to(adv.dtype)
        bounds = torch.stack([
            logits.masked_fill(~valid, float("inf")).min(),
            logits.masked_fill(~valid, float("-inf")).max(),
        ])
        if gather_fn is not None:
            bounds = gather_fn(bounds)
        low, high = bounds.min(), bounds.max()
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


# ---------------------------------------------------------------------------------------------------------------------
# HAPO (§4)
# ĥ statistics and the adaptive sampling temperature (a) live in ops/decoding.py (shared with the generation-time
# LogitsProcessor) and are re-exported above.
# ---------------------------------------------------------------------------------------------------------------------


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
    Returns ``(eps_low, eps_high)`` shaped like ``h_hat``; use them in the PPO dual-clip loss (c = 10).
    """
    high = h_hat > 0
    eps_low = torch.where(high, torch.full_like(h_hat, epsilon_low), epsilon_low * (1 - clip_alpha * h_hat))
    eps_high = torch.where(high, epsilon_high * (1 + clip_alpha * h_hat), torch.full_like(h_hat, epsilon_high))
    return eps_low, eps_high


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
    eps_low, eps_high = hapo_clip_bounds(h_hat, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                                         clip_alpha=clip_alpha)
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
    tlga = hapo_tlga_advantages(batch.rewards, mask, batch.group_index,
                                hapo_fallback_include_padding=hapo_fallback_include_padding, eps=eps)
    if batch.old_per_token_logps is None:
        ratio = torch.ones_like(h_hat)
    else:
        ratio = torch.exp(_masked(batch.per_token_logps - batch.old_per_token_logps, mask))
    return hapo_redistribute_advantages(tlga.to(h_hat.dtype), h_hat, ratio, mask, epsilon_low=epsilon_low,
                                        epsilon_high=epsilon_high, clip_alpha=clip_alpha, adv_beta=adv_beta)


# ---------------------------------------------------------------------------------------------------------------------
# GTPO (§5)
# ---------------------------------------------------------------------------------------------------------------------

GTPO_ENTROPY_FILTERS = ("official", "readme")
GTPO_CONFLICT_COUNTS = ("union", "official")
GTPO_COMPLETION_REDUCTIONS = ("mean", "sum")


def _raw_conflicts(
    completion_ids: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    group_index: torch.Tensor,
) -> torch.Tensor:
    """(B, T) bool: token (position, id) occurs in ≥ 1 positive and ≥ 1 negative completion of the same group."""
    candidates = valid & (positive | negative)[:, None]
    rows = torch.arange(completion_ids.shape[0], device=completion_ids.device)[:, None].expand_as(completion_ids)
    keys = torch.stack([group_index[rows[candidates]], positions[candidates], completion_ids[candidates]], dim=1)
    conflicts = torch.zeros_like(valid)
    if keys.shape[0] == 0:
        return conflicts
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    num_keys = int(inverse.max()) + 1
    is_pos = positive[rows[candidates]]
    has_pos = torch.bincount(inverse[is_pos], minlength=num_keys) > 0
    has_neg = torch.bincount(inverse[~is_pos], minlength=num_keys) > 0
    conflicts[candidates] = (has_pos & has_neg)[inverse]
    return conflicts


def _leading_run(conflicts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Leading contiguous run of conflicts along the valid tokens (padding is skipped, never counted)."""
    return torch.cumprod((conflicts | ~valid).to(torch.int8), dim=1).bool() & valid


def gtpo_conflict_runs(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    group_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GTPO forward and backward conflict runs, (B, T) bool each in original coordinates (spec §5).

    Paper: "GTPO: Trajectory-Based Policy Optimization in Large Language Models" (Simoni et al.),
    https://huggingface.co/papers/2508.03772; official ``build_conflict_mask``.

    Per group, P = {A_i > 0}, N = {A_i < 0} (A = 0 rows get no conflicts). A token (t, id) is raw-conflicting if the
    same id sits at position t in a completion of P and one of N. Forward: positions counted from the first valid
    token; the run is the leading contiguous stretch of raw conflicts (a shared prefix). Backward: the same with
    completions right-aligned at their last valid token (a shared suffix). Padding never conflicts; left or right
    padding both work because positions are ranks among valid tokens.
    """
    valid = completion_mask.bool()
    rank = torch.cumsum(valid.long(), dim=1) - 1
    rank_from_end = valid.sum(dim=1, keepdim=True) - 1 - rank
    positive, negative = advantages > 0, advantages < 0
    forward_raw = _raw_conflicts(completion_ids, rank, valid, positive, negative, group_index)
    backward_raw = _raw_conflicts(completion_ids, rank_from_end, valid, positive, negative, group_index)
    forward_run = _leading_run(forward_raw, valid)
    backward_run = _leading_run(backward_raw.flip(1), valid.flip(1)).flip(1)
    return forward_run, backward_run


def gtpo_token_weights(
    forward_run: torch.Tensor,
    backward_run: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    conflict_weight: float = 2.0,
) -> torch.Tensor:
    """GTPO δ (B, T): ``δ^fwd · δ^bwd · m`` with δ = W in conflict runs of positive completions, 0 in those of
    negative completions, 1 elsewhere (a token in both runs of a positive completion gets W²).

    Paper: https://huggingface.co/papers/2508.03772, spec §5. Default W = 2.0 (``W_RAW``). ``advantages`` are the
    unshaped (B,) ones that defined P and N.
    """
    dtype = torch.get_default_dtype() if not advantages.is_floating_point() else advantages.dtype
    run_weight = torch.where(advantages > 0, conflict_weight, 0.0).to(dtype)[:, None]
    ones = torch.ones(forward_run.shape, dtype=dtype, device=forward_run.device)
    delta_fwd = torch.where(forward_run, run_weight, ones)
    delta_bwd = torch.where(backward_run, run_weight, ones)
    return _masked(delta_fwd * delta_bwd, completion_mask)


def gtpo_conflict_counts(
    forward_run: torch.Tensor,
    backward_run: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    n_conflict_count: str = "union",
) -> torch.Tensor:
    """GTPO conflict count ``n_i = max(1, #conflict positions)`` (B,), for ``divide_by_n_conflict=True`` (spec §5).

    Paper: https://huggingface.co/papers/2508.03772. ``"union"`` (default when dividing): positions in the forward or
    the backward run, both in original coordinates. ``"official"``: the official code indexes the backward run from
    the end (its k-th last position counts as position k from the start), which undercounts.
    """
    _check_choice("n_conflict_count", n_conflict_count, GTPO_CONFLICT_COUNTS)
    valid = completion_mask.bool()
    if n_conflict_count == "union":
        count = (forward_run | backward_run).sum(dim=1)
    else:
        rank = (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)
        rank_from_end = (valid.sum(dim=1, keepdim=True) - 1 - rank).clamp(min=0)
        marks = torch.zeros(forward_run.shape, dtype=torch.long, device=forward_run.device)
        marks.scatter_add_(1, rank, forward_run.long())
        marks.scatter_add_(1, rank_from_end, backward_run.long())
        count = (marks > 0).sum(dim=1)
    return count.clamp(min=1)


def gtpo_shaped_advantages(
    advantages: torch.Tensor,
    mean_entropy: torch.Tensor,
    *,
    entropy_threshold: float = 0.7,
    entropy_scale: float = 0.1,
    entropy_filter: str = "official",
    initial_mean_entropy: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """GTPO entropy filter and shaping of the completion advantages (B,) (spec §5).

    Paper: https://huggingface.co/papers/2508.03772. ``mean_entropy`` H̄_i is the mean current-policy entropy over the
    valid tokens of completion i (no grad).

    - ``entropy_filter="official"`` (default; official code, ``ENT_THRESHOLD``/``ENT_SCALE``): ``A_i − γ H̄_i`` if
      ``H̄_i ≤ 0.7``, else 0. Applies to every completion, A = 0 ones included.
    - ``entropy_filter="readme"`` [recon]: drop (A = 0) a completion whose initial mean entropy is below ln 2 while the
      current one is above ln 2; keep every other one with the same ``−γ H̄_i`` shaping. Needs
      ``initial_mean_entropy`` (the completion's mean entropy under the initial policy).

    Defaults: threshold 0.7, γ = 0.1.
    """
    _check_choice("entropy_filter", entropy_filter, GTPO_ENTROPY_FILTERS)
    mean_entropy = mean_entropy.detach().to(advantages.dtype)
    shaped = advantages - entropy_scale * mean_entropy
    if entropy_filter == "official":
        dropped = mean_entropy > entropy_threshold
    else:
        if initial_mean_entropy is None:
            raise ValueError("entropy_filter='readme' needs initial_mean_entropy (B,), the initial policy's entropy.")
        dropped = (initial_mean_entropy < math.log(2)) & (mean_entropy > math.log(2))
    return torch.where(dropped, torch.zeros_like(shaped), shaped)


def gtpo_token_advantages(
    batch: TokenAdvantageInputs,
    *,
    conflict_weight: float = 2.0,
    entropy_threshold: float = 0.7,
    entropy_scale: float = 0.1,
    entropy_filter: str = "official",
    divide_by_n_conflict: bool = False,
    n_conflict_count: str = "union",
) -> torch.Tensor:
    """Registry entry ``"gtpo"``: ``Â_{i,t} = A'_i·δ_{i,t}`` (÷ n_i with ``divide_by_n_conflict=True``), (B, T).

    Paper: https://huggingface.co/papers/2508.03772, spec §5. P/N come from ``batch.advantages`` before shaping; A' is
    :func:`gtpo_shaped_advantages` with H̄ the masked mean of ``batch.per_token_entropy``. With TRL
    ``loss_type="grpo"`` (per-sequence token mean, then mean over completions), β = 0 and one iteration, the stock
    loss equals GTPO's ``L = mean_i −(1/|o_i|) Σ_t r A'_i δ_{i,t}`` (see :func:`gtpo_loss`).

    Defaults (paper/README formula): no division by the conflict count; official entropy filter; W = 2, 0.7, γ = 0.1.
    ``divide_by_n_conflict=True`` with ``n_conflict_count="official"`` reproduces the official code.
    """
    valid = batch.completion_mask.bool()
    group_index = batch.group_index
    forward_run, backward_run = gtpo_conflict_runs(batch.completion_ids, valid, batch.advantages, group_index)
    delta = gtpo_token_weights(forward_run, backward_run, batch.advantages, valid, conflict_weight=conflict_weight)
    entropy = batch.per_token_entropy.detach()
    mean_entropy = _masked(entropy, valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    shaped = gtpo_shaped_advantages(batch.advantages, mean_entropy, entropy_threshold=entropy_threshold,
                                    entropy_scale=entropy_scale, entropy_filter=entropy_filter,
                                    initial_mean_entropy=batch.initial_mean_entropy)
    token_adv = shaped[:, None] * delta
    if divide_by_n_conflict:
        counts = gtpo_conflict_counts(forward_run, backward_run, valid, n_conflict_count=n_conflict_count)
        token_adv = token_adv / counts[:, None].to(token_adv.dtype)
    return _masked(token_adv, valid)


def gtpo_loss(
    per_token_logps: torch.Tensor,
    token_advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    completion_reduction: str = "mean",
) -> torch.Tensor:
    """GTPO loss ``L_i = −(1/|o_i|) Σ_t r_{i,t} Â_{i,t}`` with the on-policy ratio ``r = exp(logp − sg(logp))``
    (value 1, gradient of log π), reduced over completions (spec §5, official ``gtpo_compute_loss``).

    Paper: https://huggingface.co/papers/2508.03772. ``completion_reduction="mean"`` (default, paper/README formula);
    ``"sum"`` reproduces the official autograd wrapper (``Σ_i L_i``). No clipping (single iteration), β = 0.
    """
    _check_choice("completion_reduction", completion_reduction, GTPO_COMPLETION_REDUCTIONS)
    valid = completion_mask.bool()
    ratio = torch.exp(per_token_logps - per_token_logps.detach())
    per_token = _masked(-ratio * token_advantages, valid)
    per_completion = per_token.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    return per_completion.mean() if completion_reduction == "mean" else per_completion.sum()


# ---------------------------------------------------------------------------------------------------------------------
# D³S sample level (§6)
# ---------------------------------------------------------------------------------------------------------------------

D3S_EQUAL_REWARDS = ("keep_first", "skip")


def d3s_max_variance_subset(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_keep: Union[int, torch.Tensor],
    *,
    equal_rewards: str = "keep_first",
) -> torch.Tensor:
    """D³S sample-level down-sampling: per group, keep the ``m`` rollouts whose rewards have maximal population
    variance (max-variance down-sampling as in PODS); returns a (B,) bool keep mask (spec §6, [recon]).

    Paper: https://huggingface.co/papers/2509.22115 (D3S-I, per group). Sort the group by reward, descending and
    stable; for i ∈ {0..m} the candidate is the first i plus the last m − i of that order; take the candidate with
    the largest variance (ties, up to float rounding: smallest i). This is exact over all subsets. ``num_keep`` is an
    int or a per-group tensor; m ≥ n keeps the whole group. A group with all-equal rewards keeps its first m rows
    (``equal_rewards="keep_first"``, default) or none (``"skip"``).
    """
    _check_choice("equal_rewards", equal_rewards, D3S_EQUAL_REWARDS)
    device = rewards.device
    num_rows = rewards.shape[0]
    keep = torch.zeros(num_rows, dtype=torch.bool, device=device)
    if num_rows == 0:
        return keep
    num_groups = _num_groups(group_index)
    sizes = torch.bincount(group_index, minlength=num_groups)
    m = torch.minimum(torch.as_tensor(num_keep, device=device).expand(num_groups), sizes)
    # Lay the groups out as rows of a (num_groups, max_size) matrix, padded with -inf (sorted last).
    order = torch.argsort(group_index, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(num_rows, device=device) - starts[group_index[order]]
    values = torch.full((num_groups, int(sizes.max())), float("-inf"), dtype=torch.float64, device=device)
    values[group_index[order], slot] = rewards[order].double()
    sorted_values, sorted_slots = torch.sort(values, dim=1, descending=True, stable=True)
    finite = torch.where(torch.isfinite(sorted_values), sorted_values, torch.zeros_like(sorted_values))
    zero = finite.new_zeros(num_groups, 1)
    csum = torch.cat([zero, finite.cumsum(1)], dim=1)
    csum_sq = torch.cat([zero, (finite**2).cumsum(1)], dim=1)

    first = torch.arange(int(m.max()) + 1, device=device)[None, :].expand(num_groups, -1)  # candidate i
    feasible = first <= m[:, None]
    head_end = first.clamp(max=values.shape[1])
    tail_start = (sizes[:, None] - (m[:, None] - first)).clamp(min=0, max=values.shape[1])

    def head_plus_tail(prefix_sums: torch.Tensor) -> torch.Tensor:
        group_total = prefix_sums.gather(1, sizes[:, None])
        return prefix_sums.gather(1, head_end) + group_total - prefix_sums.gather(1, tail_start)

    total, total_sq = head_plus_tail(csum), head_plus_tail(csum_sq)
    count = m[:, None].clamp(min=1).double()
    variance = torch.where(feasible, total_sq / count - (total / count) ** 2, float("-inf"))
    best = variance.max(dim=1, keepdim=True).values
    near_best = feasible & torch.isclose(variance, best, rtol=1e-9, atol=1e-12)
    chosen = near_best.int().argmax(dim=1)  # first (smallest) i among the maxima

    group_max = torch.full((num_groups,), float("-inf"), dtype=torch.float64, device=device)
    group_min = torch.full((num_groups,), float("inf"), dtype=torch.float64, device=device)
    group_max = group_max.scatter_reduce(0, group_index, rewards.double(), "amax")
    group_min = group_min.scatter_reduce(0, group_index, rewards.double(), "amin")
    all_equal = group_max == group_min
    chosen = torch.where(all_equal, m, chosen)

    position = torch.arange(values.shape[1], device=device)[None, :]
    kept_sorted = (position < chosen[:, None]) | (
        (position >= (sizes - (m - chosen))[:, None]) & (position < sizes[:, None])
    )
    if equal_rewards == "skip":
        kept_sorted &= ~all_equal[:, None]
    kept_group, kept_rank = kept_sorted.nonzero(as_tuple=True)
    kept_rows = order[starts[kept_group] + sorted_slots[kept_group, kept_rank]]
    keep[kept_rows] = True
    return keep


def d3s_keep_ratio(step: int, total_steps: int, *, ratio_start: float, ratio_end: float) -> float:
    """D³S curriculum ``ρ(s) = ρ_min + (ρ_max − ρ_min)·min(1, s/S)`` (spec §6, [recon]): aggressive down-sampling
    early, relaxed later; used for both the sample keep ratio and ρ_tok.

    Paper: https://huggingface.co/papers/2509.22115. [recon] defaults used by the trainer: sample keep ratio
    0.5 → 1.0 (16 rollouts → 8 at the start), ρ_tok 0.2 → 1.0. ``total_steps`` ≤ 0 returns ``ratio_end``.
    """
    progress = 1.0 if total_steps <= 0 else min(1.0, max(0.0, step / total_steps))
    return ratio_start + (ratio_end - ratio_start) * progress


def d3s_token_advantages(
    batch: TokenAdvantageInputs,
    *,
    sample_keep_ratio: float = 0.5,
    token_keep_ratio: float = 0.2,
    recompute_adv_after_downsample: bool = True,
    equal_rewards: str = "keep_first",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Registry entry ``"d3s"``: dual-level down-sampling as (B, T) advantages, 0 outside the kept tokens (spec §6).

    Paper: "Dynamic Dual-Level Down-Sampling", https://huggingface.co/papers/2509.22115 (everything below the
    abstract is [recon]; no official code). Steps: keep ``ceil(sample_keep_ratio·n_g)`` rollouts per group with
    :func:`d3s_max_variance_subset`; recompute group advantages on the kept rows (``recompute_adv_after_downsample``,
    default True; otherwise ``batch.advantages``); keep the top ``ceil(ρ_tok·N)`` tokens of the kept rows by
    ``|A|·H`` (:func:`~trl_tokenlevel.ops.selection.d3s_token_mask`, H = ``batch.per_token_entropy``). The kept
    tokens are exactly the non-zero entries; for the paper's token-mean over kept tokens, AND the loss mask with
    ``advantages != 0`` (dropping rows before the loss forward also saves compute).

    [recon] defaults: sample ratio 0.5, ρ_tok 0.2 (the start of the :func:`d3s_keep_ratio` schedule), ε = 1e-6.
    """
    _check_ratio("sample_keep_ratio", sample_keep_ratio)
    group_index = batch.group_index
    sizes = torch.bincount(group_index)
    num_keep = torch.tensor([ceil_count(int(n), sample_keep_ratio) for n in sizes.tolist()], device=sizes.device)
    kept_rows = d3s_max_variance_subset(batch.rewards, group_index, num_keep, equal_rewards=equal_rewards)
    if recompute_adv_after_downsample:
        advantages = torch.zeros_like(batch.rewards)
        advantages[kept_rows] = group_relative_advantages(batch.rewards[kept_rows], group_index[kept_rows], eps=eps)
    else:
        advantages = torch.where(kept_rows, batch.advantages, torch.zeros_like(batch.advantages))
    token_mask = batch.completion_mask.bool() & kept_rows[:, None]
    kept_tokens = d3s_token_mask(batch.per_token_entropy, token_mask, advantages, token_keep_ratio=token_keep_ratio)
    return _broadcast_rows(advantages, kept_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# TW-GRPO (§8)
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# RMT (§9)
# ---------------------------------------------------------------------------------------------------------------------

RMT_EXPONENT_FORMS = ("as_rendered", "scaled")
RMT_CURRICULA = ("softmax", "percentile")


def rmt_token_budget(
    step: int,
    total_steps: int,
    *,
    budget_init: int,
    budget_min: int,
    gamma: float,
    k: float = 1.0,
    exponent_form: str = "as_rendered",
) -> int:
    """RMT dynamic token budget ``B_t = max(B_min, B_0·γ^x)`` (spec §9, [paper, via review]).

    Paper: "Reinforcement Mid-Training", https://huggingface.co/papers/2509.24375. [recon] knob ``exponent_form``:
    ``"as_rendered"`` (default, the formula as published) ``x = t/T^k``; ``"scaled"`` ``x = k·t/T`` (the likely
    intent). No published defaults: B_0, B_min ≥ 1 and γ ∈ (0, 1) are required; k = 1. The budget is floored to an
    integer token count.
    """
    _check_choice("exponent_form", exponent_form, RMT_EXPONENT_FORMS)
    if budget_min < 1 or not 0.0 < gamma < 1.0 or total_steps <= 0:
        raise ValueError(f"Need budget_min ≥ 1, 0 < gamma < 1 and total_steps > 0; got {budget_min}, {gamma}, "
                         f"{total_steps}.")
    exponent = step / total_steps**k if exponent_form == "as_rendered" else k * step / total_steps
    return max(budget_min, math.floor(budget_init * gamma**exponent))


def rmt_length_reward(
    lengths: torch.Tensor,
    budget: float,
    *,
    length_reward_peak: float = 1.0,
    length_reward_width: Optional[float] = None,
) -> torch.Tensor:
    """RMT length reward [recon]: triangular, ``peak·max(0, 1 − |ℓ − B|/width)``, peaking at the budget B.

    Paper: https://huggingface.co/papers/2509.24375, spec §9. [recon] defaults: peak 1.0, width = B (0 reward at
    ℓ = 0 and ℓ = 2B). Added to the verifiable next-token match reward.
    """
    width = budget if length_reward_width is None else length_reward_width
    lengths = lengths.to(torch.get_default_dtype()) if not lengths.is_floating_point() else lengths
    return length_reward_peak * (1 - (lengths - budget).abs() / width).clamp(min=0)


def rmt_curriculum_probs(
    per_token_entropy: torch.Tensor,
    candidate_mask: torch.Tensor,
    step: int,
    total_steps: int,
    *,
    curriculum: str = "softmax",
    curriculum_temperature: float = 1.0,
    window_start: tuple[float, float] = (0.0, 0.3),
    window_end: tuple[float, float] = (0.7, 1.0),
) -> torch.Tensor:
    """RMT curriculum sampling probabilities over candidate target positions, (B, T) summing to 1 (spec §9, [recon]).

    Paper: https://huggingface.co/papers/2509.24375. Difficulty = base-model entropy H. With progress p = s/S:
    ``"softmax"`` (default) ``∝ exp((2p − 1)·H/τ_s)``, i.e. ``softmax(−H/τ_s)`` at the start (easy first) and
    ``softmax(+H/τ_s)`` at the end; ``"percentile"`` is uniform over positions whose entropy percentile (rank/(N − 1)
    over the batch's candidates) lies in a window moving linearly from ``window_start`` to ``window_end``. [recon]
    defaults: τ_s = 1, windows [0, 0.3] → [0.7, 1.0]. No candidates: all zeros. Sample with
    ``torch.multinomial(probs.flatten(), k)``.
    """
    _check_choice("curriculum", curriculum, RMT_CURRICULA)
    candidates = candidate_mask.bool()
    entropy = per_token_entropy.detach()
    probs = torch.zeros_like(entropy)
    num = int(candidates.sum())
    if num == 0:
        return probs
    progress = min(1.0, max(0.0, step / total_steps)) if total_steps > 0 else 1.0
    values = entropy[candidates]
    if curriculum == "softmax":
        probs[candidates] = torch.softmax((2 * progress - 1) * values / curriculum_temperature, dim=0)
        return probs
    ranks = torch.empty_like(values)
    ranks[torch.argsort(values, stable=True)] = torch.arange(num, dtype=values.dtype, device=values.device)
    percentile = ranks / max(num - 1, 1)
    low = window_start[0] + (window_end[0] - window_start[0]) * progress
    high = window_start[1] + (window_end[1] - window_start[1]) * progress
    inside = ((percentile >= low) & (percentile <= high)).to(values.dtype)
    probs[candidates] = inside / inside.sum().clamp(min=1)
    return probs


def rmt_ntp_loss(
    per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    sampled_mask: torch.Tensor,
    *,
    ntp_coef: float = 1.0,
) -> torch.Tensor:
    """RMT dual training, NTP part [recon]: ``λ_NTP · mean_{valid, non-sampled}(−log π_θ(x_t|x_<t))`` (spec §9).

    Paper: https://huggingface.co/papers/2509.24375. Added to the RL loss on the sampled target positions.
    [recon] default λ_NTP = 1.0. No non-sampled token: 0.
    """
    rest = completion_mask.bool() & ~sampled_mask.bool()
    return ntp_coef * _masked(-per_token_logps, rest).sum() / rest.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------------
# TEMPO / TVM prefix-tree credit (§10)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PrefixTreeValues:
    """Per-token prefix-tree statistics, (B, T) each, 0 / False on padding.

    ``node_value[i, t] = V(o_{i,≤t})``, ``parent_value[i, t] = V(o_{i,<t})``, ``branch[i, t]`` = the node
    ``o_{i,<t}`` has ≥ 2 distinct children (end of sequence counts as a child).
    """

    node_value: torch.Tensor
    parent_value: torch.Tensor
    branch: torch.Tensor


_END_OF_SEQUENCE = -1  # child key of a completion that stops at a node (never a real token id)


def prefix_tree_values(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_index: torch.Tensor,
    values: torch.Tensor,
) -> PrefixTreeValues:
    """Prefix-to-tree (P2T) statistics of each group: ``V(s) = mean{values_j : o_j has prefix s}`` (spec §10).

    Paper: TEMPO, https://huggingface.co/papers/2509.18314. Exact token-id equality defines the tree, built on the
    valid tokens only (left or right padding). The end of a completion is an explicit child of its last node, so
    "stop here vs continue" is a branch even when the ids carry no EOS token. Vectorised: one ``torch.unique`` per
    depth over the rows still alive, O(Σ|o_i|) overall.
    """
    valid = completion_mask.bool()
    batch_size, seq_len = valid.shape
    device = completion_ids.device
    lengths = valid.sum(dim=1)
    rank = torch.cumsum(valid.long(), dim=1) - 1
    rows = torch.arange(batch_size, device=device)[:, None].expand(batch_size, seq_len)
    max_len = int(lengths.max()) if batch_size else 0
    compact_ids = torch.full((batch_size, max(max_len, 1)), _END_OF_SEQUENCE, dtype=torch.long, device=device)
    compact_ids[rows[valid], rank[valid]] = completion_ids[valid].long()

    values = values.detach()
    node_value = torch.zeros((batch_size, max(max_len, 1)), dtype=values.dtype, device=device)
    parent_value = torch.zeros_like(node_value)
    branch = torch.zeros((batch_size, max(max_len, 1)), dtype=torch.bool, device=device)

    num_groups = _num_groups(group_index)
    counts = torch.bincount(group_index, minlength=num_groups).clamp(min=1).to(values.dtype)
    node = group_index.clone()  # root node of each row's group
    node_val = (_group_sum(values, group_index, num_groups) / counts)[group_index]
    num_nodes = num_groups
    for depth in range(max_len):
        alive = torch.nonzero(lengths >= depth).squeeze(1)  # rows whose prefix of length `depth` exists
        child_token = compact_ids[alive, depth]  # _END_OF_SEQUENCE for rows that stop at this node
        keys, inverse = torch.unique(torch.stack([node[alive], child_token], dim=1), dim=0, return_inverse=True)
        num_children = torch.bincount(keys[:, 0], minlength=num_nodes)
        key_counts = torch.bincount(inverse, minlength=keys.shape[0]).to(values.dtype)
        child_val = values.new_zeros(keys.shape[0]).index_add_(0, inverse, values[alive]) / key_counts

        has_token = lengths[alive] > depth
        token_rows = alive[has_token]
        node_value[token_rows, depth] = child_val[inverse[has_token]]
        parent_value[token_rows, depth] = node_val[token_rows]
        branch[token_rows, depth] = num_children[node[token_rows]] >= 2
        node[token_rows] = inverse[has_token]
        node_val[token_rows] = child_val[inverse[has_token]]
        num_nodes = keys.shape[0]

    def scatter_back(compact: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((batch_size, seq_len), dtype=compact.dtype, device=device)
        out[valid] = compact[rows[valid], rank[valid]]
        return out

    return PrefixTreeValues(scatter_back(node_value), scatter_back(parent_value), scatter_back(branch))


def tempo_advantages(
    advantages: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_index: torch.Tensor,
    *,
    tempo_lambda: float = 1.0,
) -> torch.Tensor:
    """TEMPO branch-point credit ``A_{i,t} = Â_i + λ·b_{i,t}·(V(o_{i,≤t}) − V(o_{i,<t}))``, (B, T) (spec §10).

    Paper: "Exploiting Tree Structure for Credit Assignment in RL Training of LLMs" (TEMPO),
    https://huggingface.co/papers/2509.18314. ``V(s)`` is the mean GRPO advantage Â of the group's completions
    through prefix s (:func:`prefix_tree_values`); ``b`` gates the TD term to branching nodes, elsewhere the method is
    GRPO. [unverified] combination; knob ``tempo_lambda`` λ, default 1.0. Needs no critic and no extra forward.
    """
    advantages = advantages.detach()
    tree = prefix_tree_values(completion_ids, completion_mask, group_index, advantages)
    td = torch.where(tree.branch, tree.node_value - tree.parent_value, torch.zeros_like(tree.node_value))
    return _broadcast_rows(advantages, completion_mask) + _masked(tempo_lambda * td, completion_mask)


def tvm_value_labels(
    rewards: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_index: torch.Tensor,
) -> torch.Tensor:
    """TVM token-level value labels ``v(o_{i,≤t}) = #correct through the prefix / #responses through it``, (B, T).

    Paper: "Token-Supervised Value Models" (TVM), https://openreview.net/forum?id=GRbI7kqA6S, spec §10. ``rewards``
    are raw 0/1 outcomes; train a value head on them with BCE ([recon] default) or MSE.
    """
    return prefix_tree_values(completion_ids, completion_mask, group_index, rewards).node_value


def tempo_token_advantages(batch: TokenAdvantageInputs, *, tempo_lambda: float = 1.0) -> torch.Tensor:
    """Registry entry ``"tempo"``: :func:`tempo_advantages` on ``batch.advantages`` and ``batch.completion_ids``.

    Paper: https://huggingface.co/papers/2509.18314. Default λ = 1.0.
    """
    return tempo_advantages(batch.advantages, batch.completion_ids, batch.completion_mask, batch.group_index,
                            tempo_lambda=tempo_lambda)


# Trainer hook: `advantages = TOKEN_ADVANTAGE_METHODS[name](batch, **knobs)` -> (B, T), 0 on padding.
TOKEN_ADVANTAGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "ucas": ucas_token_advantages,
    "hapo": hapo_token_advantages,
    "gtpo": gtpo_token_advantages,
    "d3s": d3s_token_advantages,
    "tw_grpo": tw_grpo_token_advantages,
    "tempo": tempo_token_advantages,
}
