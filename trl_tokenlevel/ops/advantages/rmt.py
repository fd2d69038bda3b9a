"""RMT, Reinforcement Mid-Training (spec §9), https://huggingface.co/papers/2509.24375.

Dynamic token budget ``B_t = max(B_min, B_0·γ^x)``, a triangular length reward peaking at the budget, an entropy
curriculum over target positions, and the next-token-prediction term ``λ_NTP·mean(−log π)`` on the other tokens.
"""

from __future__ import annotations

import math

import torch

from trl_tokenlevel.ops.selection import _check_choice

from .base import _masked

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
        raise ValueError(
            f"Need budget_min ≥ 1, 0 < gamma < 1 and total_steps > 0; got {budget_min}, {gamma}, {total_steps}."
        )
    exponent = step / total_steps**k if exponent_form == "as_rendered" else k * step / total_steps
    return max(budget_min, math.floor(budget_init * gamma**exponent))


def rmt_length_reward(
    lengths: torch.Tensor,
    budget: float,
    *,
    length_reward_peak: float = 1.0,
    length_reward_width: float | None = None,
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


def rmt_sample_targets(
    per_token_entropy: torch.Tensor,
    candidate_mask: torch.Tensor,
    step: int,
    total_steps: int,
    *,
    num_targets: int = 1,
    generator: torch.Generator | None = None,
    **curriculum_knobs,
) -> torch.Tensor:
    """RMT curriculum sampling of target positions: ``num_targets`` per row, (B, T) bool (spec §9 (b), [recon]).

    Paper: https://huggingface.co/papers/2509.24375. The probabilities are :func:`rmt_curriculum_probs` over the
    batch's candidates (percentiles and softmax over the whole batch, as the spec asks), then each row draws its
    targets from its own share without replacement. A row with fewer candidates (or zero probability mass) gets
    fewer (or none). ``curriculum_knobs``: ``curriculum``, ``curriculum_temperature``, ``window_start``,
    ``window_end``.
    """
    probs = rmt_curriculum_probs(per_token_entropy, candidate_mask, step, total_steps, **curriculum_knobs)
    targets = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    for row in range(probs.shape[0]):
        available = int((probs[row] > 0).sum())
        if available == 0:
            continue
        picked = torch.multinomial(probs[row].double(), min(num_targets, available), replacement=False,
                                   generator=generator)  # fmt: skip
        targets[row, picked] = True
    return targets


def rmt_ntp_loss(
    per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    sampled_mask: torch.Tensor,
    *,
    ntp_coef: float = 1.0,
) -> torch.Tensor:
    """RMT dual training, NTP part [recon]: ``λ_NTP · mean_{valid, non-sampled}(−log π_θ(x_t|x_<t))`` (spec §9).

    Paper: https://huggingface.co/papers/2509.24375. Added to the RL loss on the sampled target positions: the
    corpus tokens of the documents (``completion_mask`` = document tokens, ``sampled_mask`` = the RL targets), or, as a
    transposition, the rollout tokens a token selection left out. [recon] default λ_NTP = 1.0. No non-sampled
    token: 0.
    """
    rest = completion_mask.bool() & ~sampled_mask.bool()
    return ntp_coef * _masked(-per_token_logps, rest).sum() / rest.sum().clamp(min=1)
