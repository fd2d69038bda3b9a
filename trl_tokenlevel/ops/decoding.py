"""Generation-time math: entropy-adaptive model switching (EAD), cascade deferral, R2R routing labels and thresholds,
and HAPO's entropy-adaptive sampling temperature.

No model code: generation loops and `LogitsProcessor`s in `trl_tokenlevel.generation` call these functions.
Spec: `shared/specs/rl_sft_decoding.md` §4 (HAPO, adaptive temperature), §13 (R2R), §14 (EAD), §15 (cascades).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

# --------------------------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------------------------


def next_token_entropy(logits: torch.Tensor, unit: str = "nats") -> torch.Tensor:
    """Entropy `H = −Σ_v p_v log p_v` of `softmax(logits)` over the last dimension, in `"nats"` or `"bits"`.

    EAD thresholds are in bits (https://huggingface.co/papers/2502.06833); HAPO's statistics are in nats
    (https://huggingface.co/papers/2509.16591). Computed in at least fp32; entries at −inf (masked tokens) contribute 0.
    """
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}.")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(dim=-1)
    return entropy / math.log(2.0) if unit == "bits" else entropy


# --------------------------------------------------------------------------------------------------------------------
# EAD: Entropy Adaptive Decoding (§14)
# --------------------------------------------------------------------------------------------------------------------


class EntropyAdaptiveSwitch:
    """Per-row state machine of Entropy Adaptive Decoding: which model (small or large) generates the next token.

    Paper: https://huggingface.co/papers/2502.06833. After each emitted token t with entropy H_t (bits, from the
    distribution of the model that generated it):

        c += 1; append H_t to the window
        if c ≥ d_min:  target = large if mean(last w entropies) > τ else small
                       if target ≠ current: current = target; c = 0

    The window holds the available history while t < w. The strict `>` means a window mean equal to τ selects the small
    model. Rows are independent (batch > 1 keeps per-row state).

    Args:
        batch_size: number of rows.
        threshold: τ in **bits**; tuned per model pair (no default; thresholds in nats differ by a factor ln 2).
        window: w, [recon] default 5.
        min_dwell: d_min, [recon] default 5 (tokens generated since the last switch before another switch).
        reset_window_on_switch: [recon] knob, default False (the window keeps entropies from both models).
        start_large: start with the large model (default False: small).
    """

    def __init__(
        self,
        batch_size: int,
        threshold: float,
        window: int = 5,
        min_dwell: int = 5,
        reset_window_on_switch: bool = False,
        start_large: bool = False,
        device: torch.device | str | None = None,
    ):
        if window < 1 or min_dwell < 1:
            raise ValueError(f"window and min_dwell must be >= 1, got {window} and {min_dwell}.")
        self.threshold = threshold
        self.window = window
        self.min_dwell = min_dwell
        self.reset_window_on_switch = reset_window_on_switch
        self.use_large = torch.full((batch_size,), start_large, dtype=torch.bool, device=device)
        self.since_switch = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._history = torch.zeros(batch_size, window, dtype=torch.float64, device=device)
        self._seen = torch.zeros(batch_size, dtype=torch.long, device=device)

    def window_mean(self) -> torch.Tensor:
        """`[B]` mean of the last min(w, available) entropies (0 for a row with no history)."""
        return self._history.sum(dim=-1) / self._seen.clamp(min=1, max=self.window)

    def step(self, entropy_bits: torch.Tensor) -> torch.Tensor:
        """Record the entropies `[B]` of the tokens just emitted; return `[B]` bool, True where the large model
        generates the next token."""
        rows = torch.arange(self._seen.shape[0], device=self._seen.device)
        self._history[rows, self._seen % self.window] = entropy_bits.to(self._history)
        self._seen += 1
        self.since_switch += 1
        target = self.window_mean() > self.threshold
        switch = (self.since_switch >= self.min_dwell) & (target != self.use_large)
        self.use_large = torch.where(switch, target, self.use_large)
        self.since_switch = self.since_switch.masked_fill(switch, 0)
        if self.reset_window_on_switch:
            self._history[switch] = 0.0
            self._seen = self._seen.masked_fill(switch, 0)
        return self.use_large


class EADSchedule(NamedTuple):
    """Result of `ead_schedule`."""

    use_large: torch.Tensor  # [..., T] bool: True where the large model generated token t
    window_means: torch.Tensor  # [..., T] window mean after token t


def ead_schedule(
    entropies_bits: torch.Tensor,
    threshold: float,
    window: int = 5,
    min_dwell: int = 5,
    reset_window_on_switch: bool = False,
    start_large: bool = False,
) -> EADSchedule:
    """Replay EAD over known per-token entropies `[T]` or `[B, T]` (bits) and return which model produced each token.

    Paper: https://huggingface.co/papers/2502.06833. Same rule and defaults as `EntropyAdaptiveSwitch`; useful for
    analysing a threshold offline. In live generation the entropies depend on the model chosen, so drive
    `EntropyAdaptiveSwitch.step` from the generation loop instead.
    """
    squeeze = entropies_bits.dim() == 1
    entropies = entropies_bits.unsqueeze(0) if squeeze else entropies_bits
    switch = EntropyAdaptiveSwitch(
        entropies.shape[0], threshold, window, min_dwell, reset_window_on_switch, start_large, entropies.device
    )
    use_large, means = [], []
    for t in range(entropies.shape[1]):
        use_large.append(switch.use_large)
        switch.step(entropies[:, t])
        means.append(switch.window_mean())
    use_large = torch.stack(use_large, dim=-1) if use_large else entropies.new_zeros(entropies.shape, dtype=torch.bool)
    means = torch.stack(means, dim=-1) if means else entropies.new_zeros(entropies.shape, dtype=torch.float64)
    return EADSchedule(use_large.squeeze(0), means.squeeze(0)) if squeeze else EADSchedule(use_large, means)


# --------------------------------------------------------------------------------------------------------------------
# LM cascades: token-level uncertainty (§15)
# --------------------------------------------------------------------------------------------------------------------

DEFAULT_QUANTILE_FEATURES = tuple(i / 10 for i in range(11))


def _as_mask(log_probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(log_probs, dtype=torch.bool) if mask is None else mask.bool()


def chow_sum(log_probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Chow-Sum deferral score `Σ_t log p_S(y_t | y_<t)` per row of `[B, T]` (0 for an empty output).

    Paper: https://huggingface.co/papers/2404.10136 (sequence log-likelihood; has a length bias).
    """
    return (log_probs * _as_mask(log_probs, mask)).sum(dim=-1)


def chow_average(log_probs: torch.Tensor, mask: torch.Tensor | None = None, empty_score: float = 0.0) -> torch.Tensor:
    """Chow-Average deferral score: mean of the token log-probs of each row of `[B, T]`.

    Paper: https://huggingface.co/papers/2404.10136. `empty_score` (knob, default 0.0) is the score of an empty output;
    pass `-math.inf` to always defer empty outputs.
    """
    mask = _as_mask(log_probs, mask)
    counts = mask.sum(dim=-1)
    mean = (log_probs * mask).sum(dim=-1) / counts.clamp(min=1)
    return mean.masked_fill(counts == 0, empty_score)


def chow_quantile(
    log_probs: torch.Tensor,
    alpha: float | tuple[float, ...] | torch.Tensor,
    mask: torch.Tensor | None = None,
    empty_score: float = 0.0,
) -> torch.Tensor:
    """Chow-Quantile deferral score: the α-quantile of each row's token log-probs (linear interpolation, as
    `torch.quantile`; α = 0 is the minimum, α = 1 the maximum).

    Paper: https://huggingface.co/papers/2404.10136 ([unverified] against the paper: the quantile is taken over
    log-probs with linear interpolation, per the spec). Rows may have different lengths (`mask`).

    Args:
        log_probs: `[B, T]` log p_S of the small model's own output tokens.
        alpha: one α in [0, 1] (returns `[B]`) or a sequence/1-D tensor of A values (returns `[B, A]`).
        mask: `[B, T]` valid output tokens (default: all).
        empty_score: score of an empty output, knob, default 0.0 (`-math.inf` to always defer).
    """
    mask = _as_mask(log_probs, mask)
    alphas = torch.as_tensor(alpha, dtype=log_probs.dtype, device=log_probs.device)
    scalar = alphas.dim() == 0
    alphas = alphas.reshape(1, -1)
    if (alphas < 0).any() or (alphas > 1).any():
        raise ValueError("alpha must lie in [0, 1].")
    counts = mask.sum(dim=-1, keepdim=True)
    ordered = torch.sort(log_probs.masked_fill(~mask, math.inf), dim=-1).values
    position = alphas * (counts - 1).clamp(min=0).to(log_probs.dtype)  # [B, A]
    lower = position.floor().long()
    upper = position.ceil().long()
    low_values, high_values = ordered.gather(-1, lower), ordered.gather(-1, upper)
    quantiles = low_values + (position - lower.to(position.dtype)) * (high_values - low_values)
    # For lower == upper the difference above is 0 (or NaN on an empty row, replaced below).
    quantiles = torch.where(upper == lower, low_values, quantiles).masked_fill(counts == 0, empty_score)
    return quantiles.squeeze(-1) if scalar else quantiles


def token_quantile_features(
    log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    alphas: tuple[float, ...] = DEFAULT_QUANTILE_FEATURES,
    include_length: bool = True,
    empty_score: float = 0.0,
) -> torch.Tensor:
    """Features for a post-hoc deferral model: quantiles of the token log-probs (and the output length).

    Paper: https://huggingface.co/papers/2404.10136. [recon] default α grid 0, 0.1, …, 1 (the paper's grid is not
    known); the length is appended as a last column when `include_length` (default True). Returns `[B, len(alphas)
    (+1)]`. Embedding features (small-model decoder, large-model intermediate layers) are model outputs and are
    concatenated by the caller.
    """
    features = chow_quantile(log_probs, tuple(alphas), mask, empty_score)
    if include_length:
        lengths = _as_mask(log_probs, mask).sum(dim=-1, keepdim=True).to(features.dtype)
        features = torch.cat([features, lengths], dim=-1)
    return features


def deferral_threshold(scores: torch.Tensor, target_rate: float) -> float:
    """Threshold θ for the cascade rule "defer iff score < θ" that defers a target fraction of a calibration set.

    Paper: https://huggingface.co/papers/2404.10136. With n scores sorted ascending s_(0) ≤ … ≤ s_(n−1) and
    k = floor(rate·n), θ = s_(k) (θ = +inf when k = n): exactly k outputs are deferred when s_(k−1) < s_(k), and never
    more than k (ties at the boundary are kept with the small model, so the deferral rate never exceeds the target).
    """
    if not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"target_rate must be in [0, 1], got {target_rate}.")
    ordered = torch.sort(scores.detach().flatten()).values
    if ordered.numel() == 0:
        raise ValueError("Need at least one calibration score.")
    k = math.floor(target_rate * ordered.numel() + 1e-9)
    return math.inf if k >= ordered.numel() else ordered[k].item()


def cascade_defer(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cascade decision: defer the output to the large model iff `score < threshold` (bool, same shape as scores).

    Paper: https://huggingface.co/papers/2404.10136.
    """
    return scores < threshold


# --------------------------------------------------------------------------------------------------------------------
# R2R: small/large token routing (§13, pure parts)
# --------------------------------------------------------------------------------------------------------------------


def r2r_labels(
    slm_tokens: torch.Tensor, llm_tokens: torch.Tensor, divergent: torch.Tensor, num_classes: int = 2
) -> torch.Tensor:
    """R2R routing labels per position of an LLM response.

    Paper: https://huggingface.co/papers/2505.21600; reference code thu-nics/R2R `script/data_labeling/step_*.py`.
    At every position the SLM's greedy next-token prediction (`argmax` of its logits when prefilling the LLM
    response) is compared with the LLM's token. Non-identical positions are judged by a verifier (`divergent`: did the
    continuations from the two tokens diverge in meaning?).

    Args:
        slm_tokens, llm_tokens: same-shape int tensors.
        divergent: bool tensor of the same shape; only read where the tokens differ.
        num_classes: 2 (default): identical → 0, neutral → 0, divergent → 1. 3: identical → 0, neutral → 1,
            divergent → 2 (for the 3-class router head).
    """
    if not slm_tokens.shape == llm_tokens.shape == divergent.shape:
        raise ValueError(
            f"Shapes differ: slm {tuple(slm_tokens.shape)}, llm {tuple(llm_tokens.shape)}, divergent "
            f"{tuple(divergent.shape)}."
        )
    if num_classes not in (2, 3):
        raise ValueError(f"num_classes must be 2 or 3, got {num_classes}.")
    mismatch = slm_tokens != llm_tokens
    is_divergent = mismatch & divergent.bool()
    if num_classes == 2:
        return is_divergent.long()
    return mismatch.long() + is_divergent.long()


def r2r_divergence_probability(router_logits: torch.Tensor) -> torch.Tensor:
    """Router output `[N, ..., C]` → probability `[N, ...]` that the token is divergent.

    Paper: https://huggingface.co/papers/2505.21600. A binary head (`C = 1`) gives `σ(logit)`; a 3-class head
    (`C = 3`: match / mismatch / divergent) gives `softmax(logits)[..., 2]`. The head dimension is required: a squeezed
    vector of binary logits of length 3 would otherwise be read as one 3-class row.
    """
    if router_logits.dim() < 2 or router_logits.shape[-1] not in (1, 3):
        raise ValueError(
            f"router_logits must be [..., C] with at least one batch dimension and a head dimension C of 1 (binary) "
            f"or 3 (3-class), got shape {tuple(router_logits.shape)}; unsqueeze(-1) a vector of binary logits."
        )
    if router_logits.shape[-1] == 3:
        return torch.softmax(router_logits, dim=-1)[..., 2]
    return torch.sigmoid(router_logits.squeeze(-1))


def r2r_route(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """R2R routing decision: regenerate the token with the LLM iff `p_t ≥ θ` (bool).

    Paper: https://huggingface.co/papers/2505.21600; thu-nics/R2R `r2r/utils/switching.py::NeuralSwitching`.
    """
    return probs >= threshold


def r2r_calibrate_threshold(
    probs: torch.Tensor, labels: torch.Tensor, target_recall: float = 0.95, default_threshold: float = 0.5
) -> float:
    """Largest threshold θ whose routing `p ≥ θ` reaches `recall ≥ target_recall` on the divergent validation tokens.

    Paper: https://huggingface.co/papers/2505.21600 (target recall 0.95). [recon] candidate thresholds are the distinct
    validation scores. [recon] `default_threshold` (0.5) is returned when the validation set has no positive label.
    """
    probs, labels = probs.detach().flatten(), labels.detach().flatten().bool()
    if probs.shape != labels.shape:
        raise ValueError(f"probs and labels must have the same size, got {probs.numel()} and {labels.numel()}.")
    num_positive = labels.sum().item()
    if num_positive == 0:
        return default_threshold
    order = torch.argsort(probs, descending=True, stable=True)
    sorted_probs = probs[order]
    true_positives = torch.cumsum(labels[order].long(), dim=0)
    # Routing at θ = sorted_probs[i] selects every entry with p ≥ θ, i.e. up to the last entry of i's tie group.
    group_end = torch.ones_like(labels)
    group_end[:-1] = sorted_probs[:-1] != sorted_probs[1:]
    reaches = group_end & (true_positives >= target_recall * num_positive - 1e-9)
    return sorted_probs[reaches.nonzero()[0, 0]].item()


def r2r_pos_weight(labels: torch.Tensor, recall_factor: float = 1.0) -> torch.Tensor:
    """`pos_weight` of the router's `BCEWithLogitsLoss`: `(n_0 / n_1)·recall_factor`.

    Paper: https://huggingface.co/papers/2505.21600; thu-nics/R2R `r2r/train/loss.py` (recall_factor default 1.0).
    Returns a 1-element float tensor (n_1 is clamped to ≥ 1).
    """
    labels = labels.detach().flatten().bool()
    positives = labels.sum()
    negatives = labels.numel() - positives
    return (negatives.float() / positives.clamp(min=1).float() * recall_factor).reshape(1)


# --------------------------------------------------------------------------------------------------------------------
# HAPO adaptive temperature (§4 (a))
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HapoEntropyStats:
    """Statistics of one training step's token entropies that define HAPO's normalised entropy ĥ
    (https://huggingface.co/papers/2509.16591; built by `hapo_entropy_stats`).

    `h = (log max(H, 1e-8) − pivot) / scale`, then `ĥ = h·positive_scale` for h > 0 and `ĥ = h·negative_scale` for
    h ≤ 0. Scalar tensors.
    """

    pivot: torch.Tensor
    scale: torch.Tensor
    positive_scale: torch.Tensor
    negative_scale: torch.Tensor


def hapo_entropy_stats(
    entropy: torch.Tensor,
    mask: torch.Tensor | None = None,
    entropy_pivot: float = 0.8,
    repo_sign_compat: bool = False,
) -> HapoEntropyStats:
    """HAPO normalised-entropy statistics from the valid-token entropies (nats) of a training micro-batch.

    Paper: https://huggingface.co/papers/2509.16591; reference code starriver030515/HAPO
    `verl/trainer/ppo/core_algos.py::compute_entropy_h`.

        e = log(max(H, 1e-8));  μ = sorted(e_valid)[round(q·(N − 1))]  (half-to-even, = quantile "nearest")
        σ = sqrt(max(mean_valid((e − μ)²), 1e-8));  h = (e − μ)/σ
        ĥ = h / max(max h⁺, 1e-8) for h > 0;  ĥ = h / |min(min h⁻, −1e-8)| for h ≤ 0

    Args:
        entropy: per-token entropies (any shape); mask: same shape, valid tokens (default: all).
        entropy_pivot: q, default 0.8 (`recipe/qwen3_8b.sh`; the function's own default is 0.5).
        repo_sign_compat: False (default) uses the intended sign, so ĥ ∈ [−1, 1]. True reproduces the official code,
            whose negative branch divides by min(h⁻) (a negative number) and maps low entropies to ĥ > 0.
    """
    mask = torch.ones_like(entropy, dtype=torch.bool) if mask is None else mask.bool()
    if not mask.any():
        raise ValueError("HAPO entropy statistics need at least one valid token.")
    log_entropy = entropy.detach().clamp(min=1e-8).log()[mask]
    ordered = torch.sort(log_entropy).values
    pivot = ordered[round(entropy_pivot * (ordered.numel() - 1))]  # Python round: half-to-even, as the official code
    scale = ((log_entropy - pivot) ** 2).mean().clamp(min=1e-8).sqrt()
    h = (log_entropy - pivot) / scale
    positive_scale = 1.0 / h.max().clamp(min=1e-8)
    lowest = h.min().clamp(max=-1e-8)
    negative_scale = 1.0 / lowest if repo_sign_compat else 1.0 / lowest.abs()
    return HapoEntropyStats(pivot, scale, positive_scale, negative_scale)


def hapo_normalized_entropy(entropy: torch.Tensor, stats: HapoEntropyStats) -> torch.Tensor:
    """HAPO ĥ of entropies (nats) under given statistics (see `hapo_entropy_stats`). Not clipped: values outside
    [−1, 1] occur when `entropy` is not the set the statistics came from."""
    h = (entropy.detach().clamp(min=1e-8).log() - stats.pivot) / stats.scale
    return torch.where(h > 0, h * stats.positive_scale, h * stats.negative_scale)


def hapo_adaptive_temperature(
    entropy: torch.Tensor, stats: HapoEntropyStats | None, temperature: float = 1.0, tau: float = 0.05
) -> torch.Tensor:
    """HAPO per-token sampling temperature `T_t = T·(1 + τ·clip(ĥ_t, −1, 1))`.

    Paper: https://huggingface.co/papers/2509.16591 (adaptive temperature sampling). ĥ_t comes from the current decode
    step's entropy (nats, of softmax(z/T)) with the statistics of the **previous training step's** old-logprob
    entropies; `stats=None` (before the first training step) returns T unchanged. τ = `tau`, default 0.05
    (`temperature_tau`).
    """
    if stats is None:
        return torch.full_like(entropy, temperature, dtype=torch.promote_types(entropy.dtype, torch.float32))
    h_hat = hapo_normalized_entropy(entropy, stats).clamp(-1.0, 1.0)
    return temperature * (1.0 + tau * h_hat)
