"""Where token-level rewards and weights come from, independent of the loss that uses them."""

from .preference import (
    TREG_BETTER_TEMPLATE,
    TREG_WORSE_TEMPLATE,
    add_contrastive_prompt_rewards,
    add_critical_token_weights,
    add_dpo_token_rewards,
    score_completion_tokens,
    token_implicit_rewards,
)

__all__ = [
    "TREG_BETTER_TEMPLATE",
    "TREG_WORSE_TEMPLATE",
    "add_contrastive_prompt_rewards",
    "add_critical_token_weights",
    "add_dpo_token_rewards",
    "score_completion_tokens",
    "token_implicit_rewards",
]
