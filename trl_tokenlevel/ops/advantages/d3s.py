"""D³S, Dynamic Dual-Level Down-Sampling (spec §6), https://huggingface.co/papers/2509.22115.

Sample level: keep the max-variance subset of ``ceil(ρ·n_g)`` rollouts per group; token level: keep the top
``ceil(ρ_tok·N)`` tokens by ``|A|·H`` (``ops.selection.d3s_token_mask``);
``ρ(s) = ρ_min + (ρ_max − ρ_min)·min(1, s/S)``.
"""

from __future__ import annotations

import torch

from trl_tokenlevel.ops.selection import _check_choice, _check_ratio, ceil_count, d3s_token_mask

from .base import TokenAdvantageInputs, _broadcast_rows, _num_groups, group_relative_advantages

D3S_EQUAL_REWARDS = ("keep_first", "skip")


def d3s_max_variance_subset(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_keep: int | torch.Tensor,
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
