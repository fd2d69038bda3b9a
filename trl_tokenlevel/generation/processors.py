"""`transformers.LogitsProcessor`s for token-level decoding: implicit-reward (Q*) guidance and HAPO adaptive
temperature.

Both work with `model.generate(..., logits_processor=[processor])` for greedy search, sampling and beam search.
Spec: `shared/specs/preference.md` §8 (r → Q*) and `shared/specs/rl_sft_decoding.md` §4 (HAPO (a)).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from trl_tokenlevel.checks import check_number, check_same_vocabulary
from trl_tokenlevel.ops.decoding import (
    HapoEntropyStats,
    hapo_adaptive_temperature,
    hapo_entropy_stats,
    next_token_entropy,
)


@dataclass
class _EncodedPrefix:
    """What the two KV caches hold: the token rows they encoded and each row's attention mask and last position."""

    input_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor  # [R, L]
    last_position: torch.Tensor  # [R]
    caches: list  # one transformers Cache per scoring model


class ImplicitRewardLogitsProcessor(LogitsProcessor):
    """Adds the DPO implicit token reward `β·(log π_dpo(v | s_t) − log π_ref(v | s_t))` to the score of every token v.

    Paper: https://huggingface.co/papers/2404.12358 ("From r to Q*"). In the token-level MDP, `β·log(π*/π_ref)` is the
    advantage `Q*(s, a) − V*(s)`, so a DPO model and its reference define a per-token reward for any candidate token.
    Added to the log-probs of a generating model it steers decoding toward high implicit reward: with the reference
    model generating and β = 1 the scores become log π_dpo (plain beam search on the DPO policy is "likelihood search"
    in the paper). β is the β the DPO model was trained with.

    Both scoring models keep a KV cache across decoding steps and only encode tokens added since the previous call.
    Rows are matched to cached rows by content, so beam search's reordering of the expanded `batch × num_beams` rows
    (and a fresh `generate` call) is handled by reordering or rebuilding the caches.

    Args:
        dpo_model, ref_model: causal LMs sharing the generating model's tokenizer and vocabulary. They are only run
            under `torch.no_grad()`; put them in eval mode.
        beta: β > 0.
        pad_token_id: for left-padded batched prompts: leading pad tokens are masked out of attention and excluded from
            position ids (as `generate` does with an attention mask). None (default): no padding.
    """

    def __init__(self, dpo_model, ref_model, beta: float, pad_token_id: int | None = None):
        check_number("beta", beta, "it scales the implicit reward β·(log π_dpo − log π_ref) added to the scores",
                     low=0.0, low_open=True)  # fmt: skip
        check_same_vocabulary(dpo_model, "dpo_model", ref_model, "ref_model", "their log-probabilities are "
                              "subtracted token by token")  # fmt: skip
        self.models = (dpo_model, ref_model)
        self.beta = beta
        self.pad_token_id = pad_token_id
        signatures = [inspect.signature(model.forward).parameters for model in self.models]
        self._keeps_last_logits = ["logits_to_keep" in params for params in signatures]
        # transformers >= 5.24 names the KV-cache argument and output `cache`; earlier versions `past_key_values`.
        self._cache_names = ["cache" if "cache" in params else "past_key_values" for params in signatures]
        self._prefix: _EncodedPrefix | None = None

    def reset(self) -> None:
        """Drop the cached prefixes (they are also rebuilt automatically when the rows no longer match)."""
        self._prefix = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        dpo_log_probs, ref_log_probs = self._next_token_log_probs(input_ids)
        if dpo_log_probs.shape[-1] != scores.shape[-1]:
            raise ValueError(
                f"The DPO/reference vocabulary ({dpo_log_probs.shape[-1]}) differs from the generating model's "
                f"({scores.shape[-1]}); the models must share a tokenizer and LM-head size."
            )
        reward = self.beta * (dpo_log_probs - ref_log_probs)
        return scores + reward.to(device=scores.device, dtype=scores.dtype)

    def _next_token_log_probs(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        source_rows = self._match_cached_rows(input_ids)
        if source_rows is None:
            return self._encode_from_scratch(input_ids)
        prefix = self._prefix
        if not torch.equal(source_rows, torch.arange(len(prefix.input_ids), device=source_rows.device)):
            for cache in prefix.caches:
                cache.reorder_cache(source_rows)
            prefix.attention_mask = prefix.attention_mask[source_rows]
            prefix.last_position = prefix.last_position[source_rows]
        new_tokens = input_ids[:, prefix.input_ids.shape[1] :]
        num_new = new_tokens.shape[1]
        attention_mask = torch.cat([prefix.attention_mask, prefix.attention_mask.new_ones(len(input_ids), num_new)], 1)
        position_ids = prefix.last_position.unsqueeze(1) + torch.arange(1, num_new + 1, device=input_ids.device)
        log_probs = self._run_models(new_tokens, attention_mask, position_ids, prefix.caches)
        self._prefix = _EncodedPrefix(input_ids.clone(), attention_mask, position_ids[:, -1], prefix.caches)
        return log_probs

    def _match_cached_rows(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """For each current row, a cached row whose tokens are its prefix; None when some row has none."""
        prefix = self._prefix
        if prefix is None or prefix.input_ids.shape[1] >= input_ids.shape[1]:
            return None
        cached_len = prefix.input_ids.shape[1]
        current = input_ids[:, :cached_len]
        if current.shape == prefix.input_ids.shape and torch.equal(current, prefix.input_ids):
            return torch.arange(len(input_ids), device=input_ids.device)
        same = (current.unsqueeze(1) == prefix.input_ids.unsqueeze(0)).all(dim=-1)  # [R_now, R_cached]
        if not same.any(dim=1).all():
            return None
        return same.int().argmax(dim=1)

    def _encode_from_scratch(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        if self.pad_token_id is None:
            attention_mask = torch.ones_like(input_ids)
        else:
            # Left padding: everything before a row's first non-pad token is padding.
            attention_mask = ((input_ids != self.pad_token_id).cumsum(dim=1) > 0).long()
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        caches = [None] * len(self.models)
        log_probs = self._run_models(input_ids, attention_mask, position_ids, caches)
        self._prefix = _EncodedPrefix(input_ids.clone(), attention_mask, position_ids[:, -1], caches)
        return log_probs

    def _run_models(self, tokens, attention_mask, position_ids, caches: list) -> list[torch.Tensor]:
        """Forward the new `tokens` through both models on top of their caches (updated in place in `caches`)."""
        log_probs = []
        for index, model in enumerate(self.models):
            device = model.device
            cache_name = self._cache_names[index]
            kwargs = {cache_name: caches[index]}
            if self._keeps_last_logits[index]:
                kwargs["logits_to_keep"] = 1
            outputs = model(
                input_ids=tokens.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                use_cache=True,
                **kwargs,
            )
            caches[index] = getattr(outputs, cache_name)
            log_probs.append(torch.log_softmax(outputs.logits[:, -1].float(), dim=-1).to(tokens.device))
        return log_probs


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """HAPO adaptive sampling temperature: divides each row's scores by `T_t = T·(1 + τ·clip(ĥ_t, −1, 1))`.

    Paper: https://huggingface.co/papers/2509.16591 (HAPO (a)). ĥ_t is the HAPO-normalised entropy (nats) of the current
    row's distribution softmax(scores / T), normalised with the statistics of the **previous training step's**
    old-logprob entropies (`update_statistics`). Until statistics are set (before the first training step) it applies
    the plain temperature T. High-entropy steps are sampled hotter, low-entropy steps colder.

    The processor *is* the temperature step: call `generate` with `temperature=1.0` (the default) so no other
    temperature is applied. Custom processors run before `generate`'s own temperature/top-k/top-p warpers
    (transformers 5.x), so this one sees the full distribution and any top-k/top-p truncation applies to the adapted
    distribution. It does not change greedy decoding (a positive rescaling keeps the argmax).

    Args:
        temperature: base T, default 1.0.
        tau: τ, default 0.05 (`temperature_tau`).
        entropy_pivot: q for `hapo_entropy_stats`, default 0.8.
        repo_sign_compat: reproduce the official code's sign of ĥ for low entropies (default False: intended sign).
        stats: initial statistics, default None.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        tau: float = 0.05,
        entropy_pivot: float = 0.8,
        repo_sign_compat: bool = False,
        stats: HapoEntropyStats | None = None,
    ):
        check_number("temperature", temperature, "the scores are divided by it", low=0.0, low_open=True)
        check_number("tau", tau, "the temperature T·(1 + τ·ĥ) with ĥ in [-1, 1] must stay positive", low=0.0,
                     high=1.0, high_open=True)  # fmt: skip
        check_number("entropy_pivot", entropy_pivot, "it is a quantile of the log-entropies", low=0.0, high=1.0)
        self.temperature = temperature
        self.tau = tau
        self.entropy_pivot = entropy_pivot
        self.repo_sign_compat = repo_sign_compat
        self.stats = stats

    def update_statistics(self, entropy: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Set the normalisation from a training step's per-token entropies (nats, at temperature T) and mask."""
        self.stats = hapo_entropy_stats(entropy, mask, self.entropy_pivot, self.repo_sign_compat)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        entropy = next_token_entropy(scores / self.temperature)
        row_temperature = hapo_adaptive_temperature(entropy, self.stats, self.temperature, self.tau)
        return scores / row_temperature.unsqueeze(-1).to(scores.dtype)
