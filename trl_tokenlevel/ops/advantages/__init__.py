"""Per-token advantage shaping for token-level RL (spec ``shared/specs/rl_sft_decoding.md``, Part A).

Each method turns a GRPO batch into ``(B, T)`` advantages that TRL's ``GRPOTrainer._compute_loss`` accepts in place of
its ``(B,)`` ones, so the stock clipped loss is reused. Padding positions are exactly 0; all-masked rows and empty
groups never produce NaN. Groups are rows sharing a prompt: ``group_ids`` (any integer labels) or TRL's contiguous
layout of ``num_generations`` rows per prompt; a whole group must be present in the call.

Trainer hook: ``TOKEN_ADVANTAGE_METHODS[name](batch: TokenAdvantageInputs, **knobs) -> (B, T)``.

One file per method over a shared :mod:`.base` (inputs, group index, GRPO z-score); the paper, equation and defaults
are in each file's and function's docstring:

============  =====================  ====================================================================
file          spec                   what it holds
============  =====================  ====================================================================
``base``      notation               ``TokenAdvantageInputs``, ``resolve_group_index``, ``group_relative_advantages``
``ttrl``      §2 SPINE               TTRL majority-vote pseudo-reward
``ucas``      §3 UCAS                self-certainty and uncertainty-aware shaping (registry ``"ucas"``)
``hapo``      §4 HAPO                TLGA, redistribution, clip ranges, dual clip (registry ``"hapo"``)
``gtpo``      §5 GTPO (2508.03772)   conflict runs, entropy filter, loss (registry ``"gtpo"``)
``d3s``       §6 D³S                 max-variance subset, schedule (registry ``"d3s"``)
``chord``     §7 CHORD               μ schedule, φ weights, SFT loss and mix (re-exported from ``ops.sft``)
``tw_grpo``   §8 TW-GRPO             position divergence and weights, soft reward (registry ``"tw_grpo"``)
``rmt``       §9 RMT                 token budget, length reward, curriculum sampling, NTP term
``tempo``     §10 TEMPO / TVM        prefix-tree values, branch-point credit (registry ``"tempo"``)
============  =====================  ====================================================================

Everything public is re-exported here, so ``from trl_tokenlevel.ops.advantages import X`` works for every name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import TokenAdvantageInputs, group_relative_advantages, resolve_group_index
from .chord import chord_mix, chord_mu, chord_phi, chord_sft_loss
from .d3s import D3S_EQUAL_REWARDS, d3s_keep_ratio, d3s_max_variance_subset, d3s_token_advantages
from .gtpo import (
    GTPO_COMPLETION_REDUCTIONS,
    GTPO_CONFLICT_COUNTS,
    GTPO_ENTROPY_FILTERS,
    gtpo_conflict_counts,
    gtpo_conflict_runs,
    gtpo_loss,
    gtpo_shaped_advantages,
    gtpo_token_advantages,
    gtpo_token_weights,
)
from .hapo import (
    HapoEntropyStats,
    hapo_adaptive_temperature,
    hapo_clip_bounds,
    hapo_dual_clip_loss,
    hapo_entropy_stats,
    hapo_normalized_entropy,
    hapo_redistribute_advantages,
    hapo_tlga_advantages,
    hapo_token_advantages,
)
from .rmt import (
    RMT_CURRICULA,
    RMT_EXPONENT_FORMS,
    rmt_curriculum_probs,
    rmt_length_reward,
    rmt_ntp_loss,
    rmt_sample_targets,
    rmt_token_budget,
)
from .tempo import PrefixTreeValues, prefix_tree_values, tempo_advantages, tempo_token_advantages, tvm_value_labels
from .ttrl import VOTE_TIE_BREAKS, ttrl_majority_vote_rewards
from .tw_grpo import (
    tw_grpo_position_divergence,
    tw_grpo_soft_reward,
    tw_grpo_token_advantages,
    tw_grpo_token_weights,
    tw_grpo_weights_from_divergence,
)
from .ucas import (
    CONFIDENCE_AGGREGATIONS,
    ucas_advantages,
    ucas_self_certainty,
    ucas_self_certainty_from_logprobs,
    ucas_token_advantages,
)

# Trainer hook: `advantages = TOKEN_ADVANTAGE_METHODS[name](batch, **knobs)` -> (B, T), 0 on padding.
TOKEN_ADVANTAGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "ucas": ucas_token_advantages,
    "hapo": hapo_token_advantages,
    "gtpo": gtpo_token_advantages,
    "d3s": d3s_token_advantages,
    "tw_grpo": tw_grpo_token_advantages,
    "tempo": tempo_token_advantages,
}

__all__ = [
    "CONFIDENCE_AGGREGATIONS",
    "D3S_EQUAL_REWARDS",
    "GTPO_COMPLETION_REDUCTIONS",
    "GTPO_CONFLICT_COUNTS",
    "GTPO_ENTROPY_FILTERS",
    "HapoEntropyStats",
    "PrefixTreeValues",
    "RMT_CURRICULA",
    "RMT_EXPONENT_FORMS",
    "TOKEN_ADVANTAGE_METHODS",
    "TokenAdvantageInputs",
    "VOTE_TIE_BREAKS",
    "chord_mix",
    "chord_mu",
    "chord_phi",
    "chord_sft_loss",
    "d3s_keep_ratio",
    "d3s_max_variance_subset",
    "d3s_token_advantages",
    "group_relative_advantages",
    "gtpo_conflict_counts",
    "gtpo_conflict_runs",
    "gtpo_loss",
    "gtpo_shaped_advantages",
    "gtpo_token_advantages",
    "gtpo_token_weights",
    "hapo_adaptive_temperature",
    "hapo_clip_bounds",
    "hapo_dual_clip_loss",
    "hapo_entropy_stats",
    "hapo_normalized_entropy",
    "hapo_redistribute_advantages",
    "hapo_tlga_advantages",
    "hapo_token_advantages",
    "prefix_tree_values",
    "resolve_group_index",
    "rmt_curriculum_probs",
    "rmt_length_reward",
    "rmt_ntp_loss",
    "rmt_sample_targets",
    "rmt_token_budget",
    "tempo_advantages",
    "tempo_token_advantages",
    "ttrl_majority_vote_rewards",
    "tvm_value_labels",
    "tw_grpo_position_divergence",
    "tw_grpo_soft_reward",
    "tw_grpo_token_advantages",
    "tw_grpo_token_weights",
    "tw_grpo_weights_from_divergence",
    "ucas_advantages",
    "ucas_self_certainty",
    "ucas_self_certainty_from_logprobs",
    "ucas_token_advantages",
]
