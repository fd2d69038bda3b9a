"""Token selection for token-level RL: which completion tokens carry the policy-gradient update.

Per-token inputs are ``(B, T)`` tensors with a 0/1 ``completion_mask``; returned masks are ``torch.bool`` and always
False on padding. Selection carries no gradient. The spec is ``shared/specs/rl_sft_decoding.md`` (sections 1, 2, 6).

Contents
- :func:`high_entropy_token_mask`: the 80/20 forking-token mask (paper quantile rule, official top-k rule), optionally
  global across ranks through ``gather_fn``.
- :func:`selected_token_mean`: the matching loss aggregation (``entropy_normalize="all"`` or ``"selected"``).
- :func:`spine_entropy_band_penalty`: SPINE's two-sided entropy-band regulariser on the selected tokens.
- :func:`d3s_token_mask`: D³S token-level down-sampling by ``|A|·H``.
- :func:`all_gather_variable_length`: a ``gather_fn`` for ``torch.distributed`` when ranks hold different numbers of
  valid tokens.
- ``TOKEN_SELECTION_METHODS``: name -> ``fn(per_token_entropy, completion_mask, advantages=None, **knobs) -> (B, T)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

GatherFn = Callable[[torch.Tensor], torch.Tensor]

ENTROPY_SELECTIONS = ("quantile", "topk")
ENTROPY_NORMALIZATIONS = ("all", "selected")
BAND_MODES = ("const", "quantile")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {allowed}.")


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}.")


def ceil_count(total: int, ratio: float) -> int:
    """``ceil(total * ratio)``, robust to float dust (``0.3 * 10`` counts as 3, not 4)."""
    return math.ceil(round(total * ratio, 9))


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile of a 1-D tensor with linear interpolation, equal to ``torch.quantile(values, q)``.

    Same arithmetic as ``torch.quantile`` (rank ``q·(N−1)`` in the values' dtype, lerp of its two neighbours) but
    through ``torch.kthvalue``, so it has no input-size limit and costs O(N). Half precision is promoted to float32.
    ``values`` must be non-empty.
    """
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    rank = torch.tensor(q, dtype=values.dtype) * (values.numel() - 1)
    below = int(rank.floor())
    above = int(rank.ceil())
    value_below = torch.kthvalue(values, below + 1).values
    value_above = torch.kthvalue(values, above + 1).values
    return torch.lerp(value_below, value_above, (rank - below).to(values.device))


def all_gather_variable_length(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate a 1-D tensor across the ranks of ``group`` when ranks hold different numbers of elements.

    A ready ``gather_fn`` for :func:`high_entropy_token_mask`: the sizes are all-gathered first, every rank pads to the
    largest size, and the padding is stripped after the gather, so each rank receives exactly the concatenation of all
    ranks' values (in rank order). Without an initialised process group it returns ``values`` unchanged. The result
    is detached (selection carries no gradient).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return values
    values = values.detach().reshape(-1)
    world_size = dist.get_world_size(group)
    local_size = torch.tensor([values.numel()], device=values.device, dtype=torch.long)
    sizes = [torch.zeros_like(local_size) for _ in range(world_size)]
    dist.all_gather(sizes, local_size, group=group)
    sizes = [int(size) for size in sizes]
    padded = values.new_zeros(max(sizes))
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([chunk[:size] for chunk, size in zip(gathered, sizes)])


def high_entropy_token_mask(
    per_token_entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    rho: float = 0.2,
    entropy_selection: str = "quantile",
    gather_fn: GatherFn | None = None,
) -> torch.Tensor:
    """Mask of the top-ρ highest-entropy ("forking") completion tokens.

    Paper: "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM
    Reasoning", https://huggingface.co/papers/2506.01939. The objective keeps the clipped surrogate only where
    ``1[H_{i,t} ≥ τ_ρ^B]``, with τ_ρ^B the top-ρ entropy quantile of the batch (spec §1).

    ``per_token_entropy`` is the current-policy entropy of the training forward (the mask is computed without grad).

    - ``entropy_selection="quantile"`` (default, paper; equals TRL ``top_entropy_quantile``):
      ``thr = quantile(valid H, 1 − ρ)`` with linear interpolation, keep ``H ≥ thr``; ties are all kept, so the count
      can exceed ρN. ρ = 0 keeps every token equal to the maximum.
    - ``entropy_selection="topk"`` (official code, ``get_global_entropy_top_mask``): ``N = Σm``,
      ``k = max(1, int(N·ρ + 0.9999))``, keep exactly the k largest via ``torch.topk`` (arbitrary order among ties).

    ``gather_fn`` (quantile only) makes the threshold global (spec ``entropy_scope="global"``, the default scope): it
    receives this rank's 1-D valid entropies and must return the concatenation over all ranks, whose sizes may differ
    (e.g. :func:`all_gather_variable_length`). ``None`` is the identity, i.e. the local scope of the official code.
    The official top-k rule is per rank by construction, so ``gather_fn`` with ``"topk"`` is rejected.

    Defaults: ρ = 0.2, quantile rule. No valid tokens anywhere: all-False mask.
    """
    _check_ratio("rho", rho)
    _check_choice("entropy_selection", entropy_selection, ENTROPY_SELECTIONS)
    valid = completion_mask.bool()
    entropy = per_token_entropy.detach()
    if entropy_selection == "topk":
        if gather_fn is not None:
            raise ValueError(
                "entropy_selection='topk' reproduces the official per-rank rule and cannot be made global; use "
                "entropy_selection='quantile' for a threshold shared across ranks, or pass gather_fn=None."
            )
        num_valid = int(valid.sum())
        selected = torch.zeros_like(valid)
        if num_valid == 0:
            return selected
        k = min(num_valid, max(1, int(num_valid * rho + 0.9999)))
        scores = entropy.masked_fill(~valid, float("-inf")).reshape(-1)
        selected.view(-1)[torch.topk(scores, k).indices] = True
        return selected & valid

    pool = entropy[valid]
    if gather_fn is not None:
        pool = gather_fn(pool)
    if pool.numel() == 0:
        return torch.zeros_like(valid)
    threshold = linear_quantile(pool, 1.0 - rho)
    return (entropy.to(threshold.dtype) >= threshold) & valid


def selected_token_mean(
    per_token_loss: torch.Tensor,
    completion_mask: torch.Tensor,
    selection_mask: torch.Tensor,
    *,
    entropy_normalize: str = "all",
) -> torch.Tensor:
    """Token-mean of a per-token loss restricted to the selected tokens (80/20 aggregation, spec §1).

    Paper: https://huggingface.co/papers/2506.01939, ``J = 1/Σ_i|o_i| · Σ_{i,t} 1[H ≥ τ] · ℓ_{i,t}``.

    - ``entropy_normalize="all"`` (default, paper; equals TRL ``loss_type="dapo"`` on one batch): divide by all valid
      tokens ``Σ m``.
    - ``entropy_normalize="selected"`` (official code, ``loss_agg_mode="token-mean"`` with mask ``m·M``): divide by
      the selected tokens ``Σ m·M``.

    Denominators are clamped ≥ 1, so an empty batch or selection gives 0. Padding contributes exactly 0.
    """
    _check_choice("entropy_normalize", entropy_normalize, ENTROPY_NORMALIZATIONS)
    valid = completion_mask.bool()
    keep = valid & selection_mask.bool()
    total = torch.where(keep, per_token_loss, torch.zeros_like(per_token_loss)).sum()
    count = valid.sum() if entropy_normalize == "all" else keep.sum()
    return total / count.clamp(min=1)


def spine_entropy_band_penalty(
    per_token_entropy: torch.Tensor,
    selection_mask: torch.Tensor,
    *,
    band_coef: float = 0.1,
    band_low: float = 0.2,
    band_high: float = 2.0,
    band_mode: str = "const",
    band_quantiles: tuple[float, float] = (0.1, 0.9),
    normalizer: float | torch.Tensor | None = None,
    gather_fn: GatherFn | None = None,
) -> torch.Tensor:
    """SPINE entropy-band regulariser on the forking tokens F (spec §2; every piece is [recon]).

    Paper: "SPINE: Token-Selective Test-Time Reinforcement Learning with Entropy-Band Regularization",
    https://huggingface.co/papers/2511.17938.

    ``penalty = λ_band · mean_{(i,t)∈F} [relu(H_low − H_{i,t}) + relu(H_{i,t} − H_high)]``, added to the GRPO loss
    masked to F. It raises entropy where it is too low and lowers it where it is too high. The entropy keeps its
    gradient (pass the differentiable entropy of the training forward); F is ``selection_mask`` (the §1 mask, already
    AND-ed with the completion mask).

    [recon] knobs and their defaults: ``band_coef`` λ_band = 0.1, ``band_low`` H_low = 0.2 nats, ``band_high``
    H_high = 2.0 nats, ``band_mode="const"``. ``band_mode="quantile"`` replaces H_low/H_high by the (detached)
    ``band_quantiles`` = (0.1, 0.9) linear quantiles of H over F. Empty F gives 0.

    Distributed: the mean is over F of the whole batch, not of one rank's share. ``normalizer`` replaces the local
    count |F| (a trainer passes the global count divided by the number of processes, since DDP averages gradients),
    and ``gather_fn`` (quantile mode) takes the quantiles over every rank's forking tokens. Without them each rank
    uses its own tokens, which differs from one process whenever ranks hold different numbers of forking tokens.
    """
    _check_choice("band_mode", band_mode, BAND_MODES)
    forking = selection_mask.bool()
    selected = per_token_entropy[forking]
    if band_mode == "quantile":
        pool = selected.detach() if gather_fn is None else gather_fn(selected.detach())
        if pool.numel() == 0:
            return selected.sum()  # 0, still attached to the graph
        low = linear_quantile(pool, band_quantiles[0])
        high = linear_quantile(pool, band_quantiles[1])
    else:
        low, high = band_low, band_high
    if selected.numel() == 0:
        return selected.sum()  # 0, still attached to the graph
    outside = torch.relu(low - selected) + torch.relu(selected - high)
    count = selected.numel() if normalizer is None else normalizer
    return band_coef * outside.sum() / count


def d3s_token_mask(
    per_token_entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    token_keep_ratio: float = 0.2,
) -> torch.Tensor:
    """D³S token-level down-sampling: keep the tokens with the largest ``|A_{i,t}|·H_{i,t}`` (spec §6).

    Paper: "Dynamic Dual-Level Down-Sampling" (D³S), https://huggingface.co/papers/2509.22115. Score
    ``s_{i,t} = |A_{i,t}|·H_{i,t}`` over valid tokens (``advantages`` is ``(B,)`` or ``(B, T)``; H from the training
    forward, no grad); keep the top ``ceil(ρ_tok·N)`` batch-wide via ``torch.topk`` (arbitrary order among ties).
    Zero-score tokens (``|A| = 0``) are never kept unless ρ_tok = 1, which keeps every valid token. Restrict
    ``completion_mask`` to the kept rollouts of :func:`~trl_tokenlevel.ops.advantages.d3s_max_variance_subset`
    first, so that N counts only their tokens.

    [recon] default: ``token_keep_ratio`` ρ_tok = 0.2 (the start of the 0.2 → 1.0 schedule,
    :func:`~trl_tokenlevel.ops.advantages.d3s_keep_ratio`). The selection is per call (no cross-rank gather).
    """
    _check_ratio("token_keep_ratio", token_keep_ratio)
    valid = completion_mask.bool()
    if token_keep_ratio >= 1.0:
        return valid.clone()
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    scores = advantages.detach().abs() * per_token_entropy.detach()
    num_valid = int(valid.sum())
    k = min(num_valid, ceil_count(num_valid, token_keep_ratio))
    selected = torch.zeros_like(valid)
    if k == 0:
        return selected
    flat_scores = scores.masked_fill(~valid, float("-inf")).reshape(-1)
    selected.view(-1)[torch.topk(flat_scores, k).indices] = True
    return selected & valid & (scores > 0)


def _high_entropy_selection(
    per_token_entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    **knobs,
) -> torch.Tensor:
    # The 80/20 rule ignores advantages: zero-advantage groups still consume selection slots (spec §1 edge cases).
    return high_entropy_token_mask(per_token_entropy, completion_mask, **knobs)


def _d3s_selection(
    per_token_entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    **knobs,
) -> torch.Tensor:
    if advantages is None:
        raise ValueError("The 'd3s' token selection scores |A|·H and needs `advantages` ((B,) or (B, T)).")
    return d3s_token_mask(per_token_entropy, completion_mask, advantages, **knobs)


# Trainer hook: `mask = TOKEN_SELECTION_METHODS[name](per_token_entropy, completion_mask, advantages, **knobs)`.
# "high_entropy" is the 80/20 forking-token mask, also used as SPINE's forking-token set.
TOKEN_SELECTION_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "high_entropy": _high_entropy_selection,
    "d3s": _d3s_selection,
}
