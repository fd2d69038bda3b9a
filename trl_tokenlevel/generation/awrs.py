"""AWRS: adaptive weighted rejection sampling for token-level constraints.

Paper: "Fast Controlled Generation from Language Models with Adaptive Weighted Rejection Sampling" (Lipkin et al.,
COLM 2025, https://arxiv.org/abs/2504.05410); reference implementation `genlm-control` (`AWRS`, `geometric_awrs`).
Written here from the algorithm, without that dependency (which needs transformers < 5).

Problem. A language model gives next-token probabilities `p(x)` over a vocabulary V; a constraint says which tokens are
allowed after the current prefix (`A ⊆ V`). Locally constrained decoding samples from

    p_A(x) = p(x)·1[x ∈ A] / Z,      Z = Σ_{x ∈ A} p(x)   (the allowed mass),

which usually means evaluating the constraint on all |V| tokens (a mask). AWRS does two things instead:

1. **Exact sampling with few evaluations (adaptive rejection sampling).** Order the vocabulary by Gumbel keys
   `log p(x) + G_x` (a draw without replacement from p) and evaluate the constraint along that order; the first allowed
   token is an exact draw from `p_A`. Expected evaluations: `1 + Σ_{y ∉ A} p(y) / (p(y) + Z)` (token y is evaluated iff it
   comes before every allowed token), small whenever the model already puts its mass on allowed tokens.
2. **An unbiased importance weight.** Sequential Monte Carlo needs `Z` (locally constrained decoding is biased toward
   prefixes whose continuations are unlikely; the weights correct that). AWRS estimates it without more than a second
   short walk: the without-replacement walk is replayed as with-replacement sampling (each redraw of an already
   rejected token is a "phantom" rejection; their number before the next fresh draw is geometric with success
   probability `1 − rejected mass`), continued until a second acceptance. For with-replacement draws stopped at the
   second success, `Ẑ = (2 − 1) / (N − 1) = 1 / (rejections + 1)` is the unbiased negative-binomial estimator of the
   success probability `Z`, and because the identity of an accepted token is independent of the rejection count,
   `E[Ẑ·1[x = a]] = p(a)` for every allowed a: the pair `(x, Ẑ)` is properly weighted for `p·1_A`.

The returned log weight is `log Ẑ` (−inf when no token is allowed). Constraint evaluations are cached within a step,
so a token is never evaluated twice.

Three ways to use it:
- `awrs_sample(logits, constraint, prefix)`: one token and its weight (the building block of an SMC sampler);
- `AWRSLogitsProcessor`: a `transformers.LogitsProcessor` for `model.generate`, which draws the token with AWRS and
  returns a one-hot score row (so greedy decoding and sampling both keep it), recording the weights;
- `awrs_smc`: a small sequential Monte Carlo driver (particles, weights, resampling on low effective sample size).

`masked_sample` is the full-vocabulary baseline (locally constrained decoding): |V| evaluations, exact `Z`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

TokenCheck = Callable[[Sequence[int], int], bool]
BatchCheck = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


class TokenConstraint:
    """A token-level constraint: is `token` allowed after `prefix` (the generated token ids so far)?

    Args:
        accept: `accept(prefix, token) -> bool`, evaluated one candidate at a time.
        accept_batch: optional vectorised form `accept_batch(prefix, tokens [n] LongTensor) -> [n] bool tensor`; used
            when given (for a whole-vocabulary mask, and for `chunk_size` candidates at a time in AWRS).

    `calls` counts evaluated candidate tokens (a batch of n counts n), the cost AWRS saves.
    """

    def __init__(self, accept: TokenCheck | None = None, accept_batch: BatchCheck | None = None):
        if accept is None and accept_batch is None:
            raise ValueError("A TokenConstraint needs `accept(prefix, token)` or `accept_batch(prefix, tokens)`.")
        self._accept = accept
        self._accept_batch = accept_batch
        self.calls = 0

    def __call__(self, prefix: Sequence[int], tokens: torch.Tensor) -> torch.Tensor:
        """Allowed flags `[n]` (bool) of candidate `tokens` `[n]` after `prefix`."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        self.calls += len(tokens)
        if self._accept_batch is not None:
            allowed = torch.as_tensor(self._accept_batch(prefix, tokens), dtype=torch.bool).reshape(-1)
            if len(allowed) != len(tokens):
                raise ValueError(f"accept_batch returned {len(allowed)} flags for {len(tokens)} tokens.")
            return allowed.cpu()
        return torch.tensor([bool(self._accept(prefix, int(t))) for t in tokens], dtype=torch.bool)

    def mask(self, prefix: Sequence[int], vocab_size: int) -> torch.Tensor:
        """Allowed flags of the whole vocabulary `[V]` (|V| evaluations)."""
        return self(prefix, torch.arange(vocab_size))


def as_constraint(constraint) -> TokenConstraint:
    """A `TokenConstraint` from itself or from a plain `accept(prefix, token)` callable."""
    return constraint if isinstance(constraint, TokenConstraint) else TokenConstraint(accept=constraint)


@dataclass
class AWRSSample:
    """One AWRS draw.

    Attributes:
        token: the sampled token, an exact draw from the constrained distribution; -1 when no token is allowed.
        log_weight: `log Ẑ`, an unbiased (in Ẑ) estimate of the allowed probability mass; −inf when nothing is allowed.
        calls: constraint evaluations made for this draw.
        first_pass_calls: evaluations until the first acceptance (adaptive rejection sampling alone).
        rejections: real plus phantom rejections of the simulated with-replacement run (Ẑ = 1 / (rejections + 1)).
    """

    token: int
    log_weight: float
    calls: int
    first_pass_calls: int
    rejections: int


class _GumbelOrder:
    """Tokens in decreasing order of `log p + Gumbel` keys, materialised lazily (top-k first, a full sort if needed):
    the walk almost always stops after a few tokens, so sorting the whole vocabulary would be wasted."""

    def __init__(self, log_probs: torch.Tensor, generator: torch.Generator | None, first: int = 64):
        uniform = torch.rand(log_probs.shape, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
        self.keys = log_probs - torch.log(-torch.log(uniform))
        self.order = torch.topk(self.keys, min(first, len(self.keys))).indices.tolist()
        self.full = len(self.order) == len(self.keys)

    def __iter__(self):
        index = 0
        while True:
            if index == len(self.order):
                if self.full:
                    return
                self.order = torch.argsort(self.keys, descending=True).tolist()
                self.full = True
            token = self.order[index]
            if self.keys[token] == -math.inf:
                return  # the rest has zero probability (or was removed)
            yield token
            index += 1


def _geometric_failures(success: float, generator: torch.Generator | None) -> int:
    """Failures before the first success of Bernoulli(success) trials: `floor(log U / log(1 − success))`."""
    if success >= 1.0:
        return 0
    uniform = torch.rand((), generator=generator, dtype=torch.float64).clamp_(min=1e-300).item()
    return int(math.floor(math.log(uniform) / math.log1p(-success)))


@torch.no_grad()
def awrs_sample(
    logits: torch.Tensor,
    constraint,
    prefix: Sequence[int] = (),
    *,
    generator: torch.Generator | None = None,
    chunk_size: int = 1,
    max_rejections: int | None = None,
) -> AWRSSample:
    """Draw one token from `p_A ∝ softmax(logits)·1[allowed]` and the weight `log Ẑ` (module docstring).

    Args:
        logits: next-token logits `[V]` (temperature already applied; −inf entries are never drawn).
        constraint: a `TokenConstraint` or `accept(prefix, token) -> bool`.
        prefix: the token ids generated so far, passed to the constraint.
        generator: random source (CPU).
        chunk_size: candidates evaluated per constraint call along the Gumbel order (with a vectorised constraint,
            e.g. 8-32); extra evaluated tokens are cached, so the draw and the weight are unchanged.
        max_rejections: give up (weight −inf, a particle killed) after this many real rejections; None: never.

    Returns:
        `AWRSSample`.
    """
    if logits.dim() != 1:
        raise ValueError(f"awrs_sample takes one row of logits [V], got shape {tuple(logits.shape)}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    constraint = as_constraint(constraint)
    log_probs = torch.log_softmax(logits.detach().double().cpu(), dim=-1)
    probs = log_probs.exp()
    known: dict[int, bool] = {}  # constraint results of this step
    calls = 0

    def allowed(order_iter, token: int) -> bool:
        nonlocal calls
        if token not in known:
            batch = [token]
            if chunk_size > 1:  # look ahead along the same order, skipping known tokens
                for other in order_iter.peek(chunk_size - 1):
                    if other not in known:
                        batch.append(other)
            flags = constraint(prefix, torch.tensor(batch))
            calls += len(batch)
            known.update(zip(batch, flags.tolist()))
        return known[token]

    rejected_mass = 0.0
    rejections = real_rejections = 0
    first_token, first_pass_calls, accepts = -1, 0, 0
    removed = log_probs.clone()  # rejected tokens get −inf: a fresh walk only draws tokens not known to be rejected
    while accepts < 2:
        walk = _PeekableWalk(_GumbelOrder(removed, generator))
        accepted = None
        for token in walk:
            if rejected_mass > 0:
                rejections += _geometric_failures(1.0 - rejected_mass, generator)  # redraws of rejected tokens
            if allowed(walk, token):
                accepted = token
                break
            rejections += 1
            real_rejections += 1
            rejected_mass += probs[token].item()
            removed[token] = -math.inf
            if max_rejections is not None and real_rejections >= max_rejections:
                break
            if rejected_mass >= 1.0 - 1e-12:
                break
        if accepted is None:  # nothing allowed (or the rejection budget ran out)
            if first_token == -1:
                return AWRSSample(-1, -math.inf, calls, calls, rejections)
            break
        accepts += 1
        if first_token == -1:
            first_token, first_pass_calls = accepted, calls
    if accepts < 2:
        return AWRSSample(first_token, -math.inf, calls, first_pass_calls, rejections)
    return AWRSSample(first_token, -math.log(rejections + 1), calls, first_pass_calls, rejections)


class _PeekableWalk:
    """An iterator over a `_GumbelOrder` that can show the next tokens without consuming them (for chunked checks)."""

    def __init__(self, order: _GumbelOrder):
        self._iter = iter(order)
        self._buffer: list[int] = []

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return self._buffer.pop(0) if self._buffer else next(self._iter)

    def peek(self, count: int) -> list[int]:
        while len(self._buffer) < count:
            try:
                self._buffer.append(next(self._iter))
            except StopIteration:
                break
        return self._buffer[:count]


@torch.no_grad()
def masked_sample(
    logits: torch.Tensor, constraint, prefix: Sequence[int] = (), *, generator: torch.Generator | None = None
) -> AWRSSample:
    """Locally constrained decoding by full-vocabulary masking: evaluate every token, sample from the renormalised
    allowed distribution; the weight is the exact `log Z`. The baseline AWRS is measured against (|V| evaluations)."""
    constraint = as_constraint(constraint)
    log_probs = torch.log_softmax(logits.detach().double().cpu(), dim=-1)
    mask = constraint.mask(prefix, len(log_probs))
    masked = log_probs.masked_fill(~mask, -math.inf)
    log_z = torch.logsumexp(masked, dim=-1).item()
    if log_z == -math.inf:
        return AWRSSample(-1, -math.inf, len(log_probs), len(log_probs), 0)
    token = torch.multinomial((masked - log_z).exp(), 1, generator=generator).item()
    return AWRSSample(int(token), log_z, len(log_probs), len(log_probs), 0)


def expected_first_pass_calls(probs: torch.Tensor, allowed: torch.Tensor) -> float:
    """Expected constraint evaluations of adaptive rejection sampling (the first pass): `1 + Σ_{y∉A} p_y / (p_y + Z)`."""
    probs = probs.double()
    z = probs[allowed].sum()
    rejected = probs[~allowed & (probs > 0)]
    return float(1 + (rejected / (rejected + z)).sum())


def expected_awrs_calls(probs: torch.Tensor, allowed: torch.Tensor) -> float:
    """Expected evaluations of one AWRS draw (chunk size 1): the first pass, the second walk's new rejections
    (`Σ r_y(1 − r_y)`, `r_y = p_y/(p_y + Z)`: y was not rejected in the first walk and comes before every allowed token
    in the second) and its acceptance unless it repeats the first one (`1 − Σ_a (p_a/Z)²`)."""
    probs = probs.double()
    z = probs[allowed].sum()
    rejected = probs[~allowed & (probs > 0)]
    r = rejected / (rejected + z)
    repeat = ((probs[allowed] / z) ** 2).sum()
    return float(1 + r.sum() + (r * (1 - r)).sum() + 1 - repeat)


# --------------------------------------------------------------------------------------------------------------------
# generate() plugin
# --------------------------------------------------------------------------------------------------------------------


class AWRSLogitsProcessor(LogitsProcessor):
    """Constrained decoding inside `model.generate`: at each step, every row's token is drawn with AWRS from
    `softmax(scores / temperature)` and the row's scores become one-hot (0 for the drawn token, −inf elsewhere), so the
    token survives whatever `generate` does next (greedy, sampling, top-k/top-p).

    The constraint sees the row's generated tokens (`input_ids[prompt_length:]`; the prompt length is taken at the first
    call after `reset()`). A row with no allowed token gets `eos_token_id` and weight −inf. `log_weights` holds one
    `[B]` tensor per step; `sequence_log_weights(completion_mask)` sums them over each row's real tokens.

    Use it as the only token-choosing processor: put it last in the list and leave `generate`'s temperature at 1.
    Beam search is not supported (it would re-rank the one-hot rows).
    """

    def __init__(
        self,
        constraint,
        eos_token_id: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        chunk_size: int = 1,
        max_rejections: int | None = None,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.constraint = as_constraint(constraint)
        self.eos_token_id = int(eos_token_id)
        self.temperature = temperature
        self.generator = generator
        self.chunk_size = chunk_size
        self.max_rejections = max_rejections
        self.reset()

    def reset(self) -> None:
        self.prompt_length: int | None = None
        self.log_weights: list[torch.Tensor] = []
        self.calls_per_step: list[int] = []

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_length is None or input_ids.shape[1] < self.prompt_length + len(self.log_weights):
            self.reset()
            self.prompt_length = input_ids.shape[1]
        out = torch.full_like(scores, -math.inf)
        weights = torch.empty(len(input_ids), dtype=torch.float64)
        calls = 0
        for row in range(len(input_ids)):
            prefix = input_ids[row, self.prompt_length :].tolist()
            draw = awrs_sample(scores[row] / self.temperature, self.constraint, prefix, generator=self.generator,
                               chunk_size=self.chunk_size, max_rejections=self.max_rejections)  # fmt: skip
            token = draw.token if draw.token >= 0 else self.eos_token_id
            out[row, token] = 0.0
            weights[row] = draw.log_weight
            calls += draw.calls
        self.log_weights.append(weights)
        self.calls_per_step.append(calls)
        return out

    def sequence_log_weights(self, completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the per-step log weights of each row `[B]`, over the steps where `completion_mask [B, T]` is True."""
        if not self.log_weights:
            return torch.zeros(0, dtype=torch.float64)
        steps = torch.stack(self.log_weights, dim=1)
        if completion_mask is not None:
            mask = completion_mask[:, : steps.shape[1]].bool().cpu()
            steps = torch.where(mask, steps, torch.zeros_like(steps))
        return steps.sum(dim=1)


# --------------------------------------------------------------------------------------------------------------------
# Sequential Monte Carlo
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SMCResult:
    """Particles of `awrs_smc`: completion token ids, decoded texts, final log weights, normalised weights, the
    log-marginal-likelihood estimate `log Ẑ_seq` (log of the mean weight, accumulated over resamplings), the number
    of resampling steps and the constraint evaluations."""

    completion_ids: list[list[int]]
    texts: list[str] | None
    log_weights: torch.Tensor
    weights: torch.Tensor
    log_marginal: float
    resamples: int
    constraint_calls: int
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def awrs_smc(
    model,
    prompt_ids: torch.Tensor | Sequence[int],
    constraint,
    *,
    num_particles: int = 8,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    ess_threshold: float = 0.5,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    tokenizer=None,
    chunk_size: int = 1,
) -> SMCResult:
    """Sequential Monte Carlo with AWRS proposals: `num_particles` copies of one prompt extend token by token, each
    multiplying its weight by the AWRS estimate `Ẑ_t`; when the effective sample size `(Σw)² / Σw²` drops below
    `ess_threshold · num_particles`, particles are resampled (multinomial) and their weights set to the mean. A particle
    stops at EOS (an EOS token must be allowed by the constraint to be drawn) or when nothing is allowed (weight 0).

    The target is the language model restricted to constraint-satisfying sequences; the weighted particles
    approximate it without the myopic bias of plain locally constrained decoding.
    """
    from trl_tokenlevel.generation.kv import IncrementalDecoder

    constraint = as_constraint(constraint)
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    tokens = prompt.repeat(num_particles, 1)
    mask = torch.ones_like(tokens)
    decoder = IncrementalDecoder(model)
    log_w = torch.zeros(num_particles, dtype=torch.float64)
    finished = torch.zeros(num_particles, dtype=torch.bool)
    completions: list[list[int]] = [[] for _ in range(num_particles)]
    log_marginal, resamples, history = 0.0, 0, []
    for _step in range(max_new_tokens):
        if finished.all():
            break
        logits = decoder.step(tokens, mask).logits
        next_tokens = torch.full((num_particles,), next(iter(eos)) if eos else 0, dtype=torch.long)
        for i in range(num_particles):
            if finished[i]:
                continue
            draw = awrs_sample(logits[i] / temperature, constraint, completions[i], generator=generator,
                               chunk_size=chunk_size)  # fmt: skip
            log_w[i] += draw.log_weight
            if draw.token < 0:
                finished[i] = True
                continue
            next_tokens[i] = draw.token
            completions[i].append(draw.token)
            if draw.token in eos:
                finished[i] = True
        tokens = torch.cat([tokens, next_tokens.unsqueeze(1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_tokens).unsqueeze(1)], dim=1)
        weights = torch.softmax(log_w, dim=0)
        ess = float(1.0 / (weights**2).sum()) if torch.isfinite(log_w).any() else 0.0
        history.append({"ess": ess, "log_weights": log_w.tolist()})
        if not torch.isfinite(log_w).any():
            break
        if ess < ess_threshold * num_particles and not finished.all():
            index = torch.multinomial(weights.float(), num_particles, replacement=True, generator=generator)
            mean = torch.logsumexp(log_w, 0).item() - math.log(num_particles)
            log_marginal += mean
            log_w = torch.zeros(num_particles, dtype=torch.float64)
            tokens, mask, finished = tokens[index], mask[index], finished[index]
            completions = [list(completions[j]) for j in index.tolist()]
            decoder.cache.reorder_cache(index.to(decoder.device))
            resamples += 1
    finite = torch.isfinite(log_w)
    final_mean = torch.logsumexp(log_w, 0).item() - math.log(num_particles) if finite.any() else -math.inf
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions] if tokenizer is not None else None
    return SMCResult(completions, texts, log_w, torch.softmax(log_w, 0) if finite.any() else torch.zeros_like(log_w),
                     log_marginal + final_mean, resamples, constraint.calls, history)  # fmt: skip


__all__ = [
    "AWRSLogitsProcessor",
    "AWRSSample",
    "SMCResult",
    "TokenConstraint",
    "as_constraint",
    "awrs_sample",
    "awrs_smc",
    "expected_awrs_calls",
    "expected_first_pass_calls",
    "masked_sample",
]
