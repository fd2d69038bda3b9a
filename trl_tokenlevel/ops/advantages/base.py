"""Shared inputs and group helpers of the token-level advantage methods (spec ``shared/specs/rl_sft_decoding.md``).

Every method file in this package reads a :class:`TokenAdvantageInputs` batch and uses these group statistics:
``resolve_group_index`` (rows sharing a prompt), ``group_relative_advantages`` (the GRPO z-score) and the masking
helpers, which keep padding at exactly 0 and never produce NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    old_per_token_logps: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    num_generations: int | None = None
    self_certainty: torch.Tensor | None = None
    sampled_token_logits: torch.Tensor | None = None
    full_logps: torch.Tensor | None = None
    initial_mean_entropy: torch.Tensor | None = None
    tw_grpo_divergence: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.completion_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"completion_ids must be (B, T), got shape {shape}.")
        for name in (
            "completion_mask",
            "per_token_logps",
            "per_token_entropy",
            "old_per_token_logps",
            "self_certainty",
            "sampled_token_logits",
            "tw_grpo_divergence",
        ):
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
    group_ids: torch.Tensor | None = None,
    num_generations: int | None = None,
    device: torch.device | None = None,
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
