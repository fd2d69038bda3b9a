"""GTPO, Group-relative Trajectory-based Policy Optimization (Simoni et al., spec §5),
https://huggingface.co/papers/2508.03772.

``Â_{i,t} = A'_i·δ_{i,t}`` with ``δ = W`` inside conflict runs (shared prefix/suffix tokens) of positive completions,
0 inside those of negative ones and 1 elsewhere, and ``A'_i = A_i − γ H̄_i`` (dropped by the entropy filter).
"""

from __future__ import annotations

import math

import torch

from trl_tokenlevel.ops.selection import _check_choice

from .base import TokenAdvantageInputs, _masked

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
    initial_mean_entropy: torch.Tensor | None = None,
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
    shaped = gtpo_shaped_advantages(
        batch.advantages,
        mean_entropy,
        entropy_threshold=entropy_threshold,
        entropy_scale=entropy_scale,
        entropy_filter=entropy_filter,
        initial_mean_entropy=batch.initial_mean_entropy,
    )
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
