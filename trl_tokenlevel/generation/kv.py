"""KV-cache decoding helpers shared by routed generation (R2R), entropy-adaptive switching (EAD) and cascades.

Two causal LMs that share a tokenizer decode one token buffer together. Each model keeps its own KV cache and
remembers how many buffer columns it has encoded; when it is asked for next-token logits it encodes only the columns
it has not seen yet (one token in steady state, a catch-up prefill after the other model produced a run of tokens).
Nothing is ever re-encoded from the start of the prompt.

Batches are left-padded. Every row advances by one column per step, so both caches always hold the same column layout
and the attention mask covers the whole buffer. The price of this simple layout: when one row needs the large model,
the large model catches up every row (the other rows' catch-up work is done early instead of later, and the tokens it
predicts for them are discarded).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from trl_tokenlevel.generation.checks import check_generation_args
from trl_tokenlevel.ops.decoding import next_token_entropy


@dataclass
class StepOutput:
    """Next-token logits `[B, V]` (fp32, raw: no temperature) and, if requested, the last-layer hidden state `[B, d]`
    (the input of the LM head) at the last buffer column."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


class IncrementalDecoder:
    """One causal LM and its KV cache over a shared, left-padded token buffer.

    `step(tokens, attention_mask)` encodes the buffer columns `[seen, L)` on top of the cache and returns the logits
    (and hidden state) for column L. Position ids follow `generate`'s convention for left padding:
    `cumsum(attention_mask) − 1`.

    Args:
        model: a transformers causal LM (any architecture with a KV cache).
        capture_hidden: also return the last-layer hidden state, captured as the input of the LM head (a forward hook
            on `model.get_output_embeddings()`), so only the kept position is stored even during a long prefill.
    """

    def __init__(self, model, capture_hidden: bool = False):
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.24 names the KV-cache argument and output `cache`; earlier versions `past_key_values`.
        self._cache_name = "cache" if "cache" in params else "past_key_values"
        self._keeps_last_logits = "logits_to_keep" in params
        self.capture_hidden = capture_hidden
        self.cache = None
        self.seen = 0
        self.calls = 0
        self.encoded_tokens = 0  # rows x new columns, summed over calls (padding and finished rows included)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> StepOutput:
        length = tokens.shape[1]
        if self.seen >= length:
            raise RuntimeError(f"Nothing new to encode: the cache already holds {self.seen} of {length} columns.")
        device = self.device
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, self.seen :]
        kwargs = {self._cache_name: self.cache, "use_cache": True}
        if self._keeps_last_logits:
            kwargs["logits_to_keep"] = 1
        captured = []
        handle = None
        if self.capture_hidden:
            head = self.model.get_output_embeddings()
            handle = head.register_forward_hook(lambda _module, args, _out: captured.append(args[0][:, -1]))
        try:
            outputs = self.model(
                input_ids=tokens[:, self.seen :].to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                **kwargs,
            )
        finally:
            if handle is not None:
                handle.remove()
        self.cache = getattr(outputs, self._cache_name)
        self.calls += 1
        self.encoded_tokens += tokens.shape[0] * (length - self.seen)
        self.seen = length
        logits = outputs.logits[:, -1].float().to(tokens.device)
        hidden = captured[-1].float().to(tokens.device) if captured else None
        return StepOutput(logits, hidden)


# --------------------------------------------------------------------------------------------------------------------
# Prompts, special tokens, token choice
# --------------------------------------------------------------------------------------------------------------------


def encode_prompts(tokenizer, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids, attention_mask` for text prompts or conversational prompts (lists of messages, rendered
    with the chat template and a generation prompt)."""
    texts = [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Fail clearly on right padding: decoding appends columns on the right, so padding must be on the left."""
    mask = attention_mask.bool()
    if (mask[:, :-1] & ~mask[:, 1:]).any():
        raise ValueError(
            "The prompts are right-padded (a 0 follows a 1 in attention_mask). Decoding needs left padding: tokenize "
            "with `padding_side='left'` (or use `encode_prompts`)."
        )


def resolve_special_ids(models, tokenizer=None, eos_token_id=None, pad_token_id=None) -> tuple[list[int], int]:
    """EOS ids (a list) and the pad id: explicit arguments, then the tokenizer, then the first model's
    `generation_config`. The pad id falls back to the first EOS id."""
    config = getattr(models[0], "generation_config", None)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None and config is not None:
        eos_token_id = config.eos_token_id
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None and config is not None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, int(pad_token_id)


@dataclass
class Sampler:
    """How a token is chosen from a model's logits: greedy (`do_sample=False`, the default) or sampling with
    temperature / top-k / top-p (transformers' own warpers). `logits_processor` (a list of transformers
    `LogitsProcessor`s) runs first, on the scores of whichever model is choosing the token."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    logits_processor: list | None = None
    generator: torch.Generator | None = None
    _warpers: LogitsProcessorList = field(init=False, repr=False)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        warpers = LogitsProcessorList(list(self.logits_processor or []))
        if self.do_sample:
            if self.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k and self.top_k > 0:
                warpers.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                warpers.append(TopPLogitsWarper(self.top_p))
        self._warpers = warpers

    def choose(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = self._warpers(input_ids, logits) if self._warpers else logits
        if not self.do_sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores.float(), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def generating_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of the distribution tokens are drawn from, for entropies: divided by the sampling temperature."""
        return logits / self.temperature if self.do_sample else logits


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenRoutingOutput:
    """What routed generation, EAD and cascades return (one shape for all three).

    Attributes:
        sequences: `[B, P + T]` the left-padded prompts followed by the completions.
        completion_ids: `[B, T]` generated tokens (pad after a row's EOS).
        completion_mask: `[B, T]` bool, the row's tokens up to and including its EOS.
        large_mask: `[B, T]` bool, True where the large model produced the token.
        token_logprobs: `[B, T]` log-prob of each token under the model that produced it (raw logits, T = 1).
        entropies: `[B, T]` entropy in bits of the distribution each token was drawn from.
        router_probs: `[B, T]` routing probability of the small model's proposal (R2R; NaN where not computed).
        texts: decoded completions when a tokenizer was given.
        stats: counters (forward calls and encoded tokens per model, wall time, method-specific values).
    """

    sequences: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    large_mask: torch.Tensor
    token_logprobs: torch.Tensor
    entropies: torch.Tensor
    router_probs: torch.Tensor | None = None
    texts: list[str] | None = None
    stats: dict = field(default_factory=dict)

    @property
    def large_token_fraction(self) -> float:
        """Fraction of the generated (valid) tokens that the large model produced."""
        total = self.completion_mask.sum().item()
        return (self.large_mask & self.completion_mask).sum().item() / total if total else 0.0

    def row_large_fraction(self) -> torch.Tensor:
        counts = self.completion_mask.sum(dim=1).clamp(min=1)
        return (self.large_mask & self.completion_mask).sum(dim=1) / counts

    def token_rows(self, tokenizer, titles: list[str] | None = None):
        """`viz.TokenRow`s (value 1 where the large model produced the token, 0 for the small model) for
        `viz.write_token_heatmap` / `viz.token_heatmap_terminal`."""
        from trl_tokenlevel.viz import TokenRow

        rows = []
        for i in range(self.completion_ids.shape[0]):
            keep = self.completion_mask[i]
            ids = self.completion_ids[i][keep].tolist()
            values = self.large_mask[i][keep].float().tolist()
            title = titles[i] if titles else f"row {i}: {sum(values):.0f}/{len(values)} large-model tokens"
            rows.append(TokenRow(title, [tokenizer.decode([t]) for t in ids], values))
        return rows


class DecodingBuffer:
    """The shared token buffer of one generation call and the per-token records that become a `TokenRoutingOutput`."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, eos: list[int], pad: int):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}.")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        check_left_padded(attention_mask)
        if not attention_mask.bool().any(dim=1).all():
            raise ValueError("Every prompt needs at least one token (a row of attention_mask is all zeros).")
        self.tokens = input_ids.clone()
        self.attention_mask = attention_mask.long().clone()
        self.prompt_length = input_ids.shape[1]
        self.eos = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
        self.pad = pad
        self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.large, self.logprobs, self.entropies, self.router_probs, self.valid = [], [], [], [], []
        self.start = time.perf_counter()

    @property
    def active(self) -> torch.Tensor:
        return ~self.finished

    def append(
        self,
        next_tokens: torch.Tensor,
        use_large: torch.Tensor,
        logits: torch.Tensor,
        generating_logits: torch.Tensor,
        router_probs: torch.Tensor | None = None,
    ) -> None:
        """Append one column: finished rows get the pad token (masked out of attention)."""
        active = self.active
        tokens = torch.where(active, next_tokens, torch.full_like(next_tokens, self.pad))
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
        self.valid.append(active)
        self.large.append(use_large & active)
        self.logprobs.append(log_probs.masked_fill(~active, 0.0))
        self.entropies.append(next_token_entropy(generating_logits, "bits").masked_fill(~active, 0.0))
        if router_probs is not None:
            self.router_probs.append(router_probs.float().masked_fill(~active, float("nan")))
        self.tokens = torch.cat([self.tokens, tokens.unsqueeze(1)], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, active.long().unsqueeze(1)], dim=1)
        if self.eos.numel():
            self.finished = self.finished | (active & torch.isin(tokens, self.eos))

    def output(self, tokenizer=None, stats: dict | None = None) -> TokenRoutingOutput:
        batch = self.tokens.shape[0]

        def stack(values, dtype):
            if not values:
                return torch.zeros(batch, 0, dtype=dtype, device=self.tokens.device)
            return torch.stack(values, dim=1)

        completion_ids = self.tokens[:, self.prompt_length :]
        router_probs = stack(self.router_probs, torch.float32) if self.router_probs else None
        out = TokenRoutingOutput(
            sequences=self.tokens,
            completion_ids=completion_ids,
            completion_mask=stack(self.valid, torch.bool),
            large_mask=stack(self.large, torch.bool),
            token_logprobs=stack(self.logprobs, torch.float32),
            entropies=stack(self.entropies, torch.float32),
            router_probs=router_probs,
            stats=dict(stats or {}),
        )
        out.stats["wall_time_s"] = time.perf_counter() - self.start
        if tokenizer is not None:
            out.texts = decode_completions(tokenizer, out.completion_ids, out.completion_mask)
        return out


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
        for ids, mask in zip(completion_ids, completion_mask.bool())
    ]


def shared_vocab_size(*models) -> int | None:
    """Smallest output width of the models. Same-family pairs often pad their LM heads to different sizes (Qwen2.5
    0.5B vs 32B); ids above the tokenizer's vocabulary are never produced, so logits are cut to the common width."""
    sizes = [m.get_output_embeddings().out_features for m in models if hasattr(m, "get_output_embeddings")]
    return min(sizes) if sizes else None


def prepare_inputs(models, input_ids, attention_mask, prompts, tokenizer):
    """Tensors for the decoding buffer, on the first model's device (the buffer, the logits and the token choice
    stay there; a sampling `generator` must live on the same device)."""
    if input_ids is None:
        if prompts is None or tokenizer is None:
            raise ValueError("Pass `input_ids` (left-padded) or `prompts` together with `tokenizer`.")
        input_ids, attention_mask = encode_prompts(tokenizer, prompts)
    device = next(models[0].parameters()).device
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    return input_ids.to(device), attention_mask


@torch.no_grad()
def cached_generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    prompts: list | None = None,
    tokenizer=None,
    max_new_tokens: int = 128,
    is_large: bool = False,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    logits_processor: list | None = None,
    generator: torch.Generator | None = None,
) -> TokenRoutingOutput:
    """Plain single-model decoding with the same output as routed generation (the small-only / large-only baselines;
    `is_large` sets `large_mask`). Greedy by default; equals `model.generate` for the same settings."""
    check_generation_args(model, None, tokenizer, max_new_tokens, do_sample, temperature, top_k, top_p)
    input_ids, attention_mask = prepare_inputs([model], input_ids, attention_mask, prompts, tokenizer)
    eos, pad = resolve_special_ids([model], tokenizer, eos_token_id, pad_token_id)
    sampler = Sampler(do_sample, temperature, top_k, top_p, logits_processor, generator)
    buffer = DecodingBuffer(input_ids, attention_mask, eos, pad)
    decoder = IncrementalDecoder(model)
    flag = torch.full_like(buffer.finished, is_large)
    for _ in range(max_new_tokens):
        if buffer.finished.all():
            break
        logits = decoder.step(buffer.tokens, buffer.attention_mask).logits
        next_tokens = sampler.choose(buffer.tokens, logits)
        buffer.append(next_tokens, flag, logits, sampler.generating_logits(logits))
    key = "large" if is_large else "small"
    return buffer.output(tokenizer, {f"{key}_calls": decoder.calls, f"{key}_encoded_tokens": decoder.encoded_tokens})
