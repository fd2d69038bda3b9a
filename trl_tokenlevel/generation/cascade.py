"""Token-level LM cascades: run the small model, defer the whole output to the large model when the small model's
per-token uncertainty says so.

Paper: "Language Model Cascades: Token-level uncertainty and beyond" (Gupta et al., ICLR 2024,
https://huggingface.co/papers/2404.10136). Spec: `shared/specs/rl_sft_decoding.md` §15 ([unverified] against the paper).
The scores and the threshold rule are `ops.decoding` (`chow_sum`, `chow_average`, `chow_quantile`,
`token_quantile_features`, `deferral_threshold`, `cascade_defer`); this module runs the models around them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trl_tokenlevel.generation.checks import check_cascade_args, check_generation_args
from trl_tokenlevel.generation.kv import (
    TokenRoutingOutput,
    cached_generate,
    decode_completions,
    prepare_inputs,
    resolve_special_ids,
)
from trl_tokenlevel.ops.decoding import (
    DEFAULT_QUANTILE_FEATURES,
    cascade_defer,
    chow_average,
    chow_quantile,
    chow_sum,
    deferral_threshold,
    token_quantile_features,
)

DEFERRAL_RULES = ("chow_sum", "chow_average", "chow_quantile")

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cascade_scores(
    log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    rule: str | ScoreFn = "chow_quantile",
    alpha: float = 0.2,
    empty_score: float = 0.0,
) -> torch.Tensor:
    """Deferral score per row of the small model's own token log-probs `[B, T]` (higher = more confident).

    `rule`: `"chow_sum"` (Σ ℓ_t, length-biased), `"chow_average"` (mean ℓ_t), `"chow_quantile"` (the α-quantile, linear
    interpolation; α = 0 is the minimum; default α = 0.2 [recon]: the paper sweeps α), or a callable
    `(log_probs, mask) -> [B]` such as a fitted `PostHocDeferral`. `empty_score` scores an empty output (knob).
    """
    if callable(rule):
        return rule(log_probs, mask)
    if rule == "chow_sum":
        return chow_sum(log_probs, mask)
    if rule == "chow_average":
        return chow_average(log_probs, mask, empty_score)
    if rule == "chow_quantile":
        return chow_quantile(log_probs, alpha, mask, empty_score)
    raise ValueError(f"rule must be one of {DEFERRAL_RULES} or a callable, got {rule!r}.")


class PostHocDeferral(nn.Module):
    """Post-hoc deferral model: logistic regression on quantiles of the token log-probs (and the length) that predicts
    whether deferring helps (oracle label: the large model's output is better than the small model's).

    Paper: https://huggingface.co/papers/2404.10136 (the paper also feeds embeddings; here only the token-uncertainty
    quantiles, [recon] α grid 0, 0.1, …, 1). As a cascade `rule` it returns `−logit(defer helps)`, so that "defer iff
    score < θ" and `deferral_threshold` work unchanged. Features are standardised with the training statistics.
    """

    def __init__(self, alphas: tuple[float, ...] = DEFAULT_QUANTILE_FEATURES, include_length: bool = True):
        super().__init__()
        self.alphas = tuple(alphas)
        self.include_length = include_length
        width = len(self.alphas) + int(include_length)
        self.linear = nn.Linear(width, 1)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    def features(self, log_probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return token_quantile_features(log_probs.float(), mask, self.alphas, self.include_length)

    def forward(self, log_probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = (self.features(log_probs, mask) - self.mean) / self.std
        return -self.linear(x).squeeze(-1)

    def fit(
        self,
        log_probs: torch.Tensor,
        mask: torch.Tensor | None,
        defer_helps: torch.Tensor,
        steps: int = 500,
        lr: float = 0.1,
        weight_decay: float = 1e-3,
    ) -> PostHocDeferral:
        """Fit on a calibration set: token log-probs `[N, T]` of the small model's outputs, mask, and 0/1 labels."""
        features = self.features(log_probs, mask)
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(features.std(dim=0).clamp(min=1e-6) if len(features) > 1 else torch.ones_like(self.std))
        x = (features - self.mean) / self.std
        y = defer_helps.float()
        positives = y.sum().clamp(min=1)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=((len(y) - positives) / positives).reshape(1))
        optimizer = torch.optim.LBFGS(self.linear.parameters(), lr=lr, max_iter=steps)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(self.linear(x).squeeze(-1), y) + weight_decay * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return self


@torch.no_grad()
def calibrate_cascade(
    small_model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    target_deferral_rate: float,
    rule: str | ScoreFn = "chow_quantile",
    alpha: float = 0.2,
    prompts: list | None = None,
    tokenizer=None,
    max_new_tokens: int = 128,
    **generate_kwargs,
) -> float:
    """Threshold θ ("defer iff score < θ") that defers at most `target_deferral_rate` of a calibration set of prompts
    (`ops.decoding.deferral_threshold`: exactly that share when the scores are distinct)."""
    check_cascade_args(None, rule, alpha, target_deferral_rate)
    small = cached_generate(
        small_model, input_ids, attention_mask, prompts=prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )  # fmt: skip
    scores = cascade_scores(small.token_logprobs, small.completion_mask, rule, alpha)
    return deferral_threshold(scores, target_deferral_rate)


@torch.no_grad()
def cascade_generate(
    small_model,
    large_model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    threshold: float,
    rule: str | ScoreFn = "chow_quantile",
    alpha: float = 0.2,
    prompts: list | None = None,
    tokenizer=None,
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    **generate_kwargs,
) -> TokenRoutingOutput:
    """Two-model cascade: the small model answers every prompt; rows whose deferral score is below `threshold` are
    answered again, from scratch, by the large model, whose output replaces the small one.

    Scores come from the small model's own token log-probs (`cascade_scores`: Chow-Sum / Chow-Average /
    Chow-Quantile-α, or a post-hoc model). Pick `threshold` with `calibrate_cascade` for a target deferral rate.

    Returns a `TokenRoutingOutput` whose `large_mask` is all True on deferred rows, plus `stats["deferred"]` (bool per
    row), `stats["scores"]`, `stats["deferral_rate"]` and `stats["small_tokens_discarded"]` (small-model tokens thrown
    away on deferred rows: the cascade's extra cost). `large_token_fraction` counts the final output's tokens.
    """
    check_generation_args(small_model, large_model, tokenizer, max_new_tokens, generate_kwargs.get("do_sample", False),
                          *(generate_kwargs.get(k, d) for k, d in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))))  # fmt: skip
    check_cascade_args(threshold, rule, alpha)
    input_ids, attention_mask = prepare_inputs([small_model], input_ids, attention_mask, prompts, tokenizer)
    eos, pad = resolve_special_ids([small_model, large_model], tokenizer, eos_token_id, pad_token_id)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **generate_kwargs)
    small = cached_generate(small_model, input_ids, attention_mask, **kwargs)
    scores = cascade_scores(small.token_logprobs, small.completion_mask, rule, alpha)
    defer = cascade_defer(scores, threshold)
    stats = {
        "threshold": float(threshold),
        "rule": rule if isinstance(rule, str) else type(rule).__name__,
        "alpha": alpha,
        "scores": scores.tolist(),
        "deferred": defer.tolist(),
        "deferral_rate": defer.float().mean().item(),
        "small_tokens_discarded": int(small.completion_mask[defer].sum()),
        "small_calls": small.stats["small_calls"],
        "small_encoded_tokens": small.stats["small_encoded_tokens"],
        "large_calls": 0,
        "large_encoded_tokens": 0,
    }
    wall = small.stats["wall_time_s"]
    if not defer.any():
        small.stats = {**stats, "wall_time_s": wall}
        if tokenizer is not None:
            small.texts = decode_completions(tokenizer, small.completion_ids, small.completion_mask)
        return small
    rows = defer.nonzero().flatten()
    large = cached_generate(large_model, input_ids[rows], attention_mask[rows], is_large=True, **kwargs)
    stats.update(large_calls=large.stats["large_calls"], large_encoded_tokens=large.stats["large_encoded_tokens"])
    length = max(small.completion_ids.shape[1], large.completion_ids.shape[1])

    def merged(small_values, large_values, fill):
        out = torch.full((len(defer), length), fill, dtype=small_values.dtype, device=small_values.device)
        out[:, : small_values.shape[1]] = small_values
        out[rows] = fill
        out[rows, : large_values.shape[1]] = large_values.to(out.dtype)
        return out

    completion_ids = merged(small.completion_ids, large.completion_ids, pad)
    completion_mask = merged(small.completion_mask, large.completion_mask, False)
    output = TokenRoutingOutput(
        sequences=torch.cat([input_ids, completion_ids], dim=1),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        large_mask=completion_mask & defer.unsqueeze(1),
        token_logprobs=merged(small.token_logprobs, large.token_logprobs, 0.0),
        entropies=merged(small.entropies, large.entropies, 0.0),
        stats={**stats, "wall_time_s": wall + large.stats["wall_time_s"]},
    )
    if tokenizer is not None:
        output.texts = decode_completions(tokenizer, completion_ids, completion_mask)
    return output
