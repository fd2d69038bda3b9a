"""R2R-style token routing between a small and a large causal LM that share a tokenizer.

Paper: "R2R: Efficiently Navigating Divergent Reasoning Paths with Small-Large Model Token Routing"
(https://huggingface.co/papers/2505.21600), reference code thu-nics/R2R. Spec: `shared/specs/rl_sft_decoding.md` §13.

Three parts, usable separately:

1. `build_routing_dataset`: follow reference continuations (given, or generated greedily by the large model) with
   both models, find the positions where their next-token predictions differ, and ask a judge whether each
   difference is *routing-worthy* (it changes the outcome) or neutral. Output: a `datasets.Dataset` with the small
   model's features (last hidden state, proposed token, top-k logits) and a 0/1 label per position.
2. `TokenRouter` + `train_router`: a small residual MLP over those features, trained with a class-imbalance
   `pos_weight`, its threshold calibrated for a target recall of the routing-worthy tokens; `save_pretrained` /
   `from_pretrained`.
3. `routed_generate`: the small model decodes; wherever the router fires on its proposal, the large model re-decides
   the token. Both models keep KV caches and only encode tokens they have not seen (see `generation.kv`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from trl_tokenlevel.checks import check_number
from trl_tokenlevel.generation.checks import (
    check_generation_args,
    check_labelling_args,
    check_router_config,
    check_router_training,
    check_routing,
    load_router_state,
    read_router_folder,
)
from trl_tokenlevel.generation.kv import (
    DecodingBuffer,
    IncrementalDecoder,
    PromptCache,
    Sampler,
    TokenRoutingOutput,
    cached_generate,
    encode_prompts,
    prepare_inputs,
    resolve_special_ids,
    shared_vocab_size,
)
from trl_tokenlevel.ops.decoding import (
    r2r_calibrate_threshold,
    r2r_divergence_probability,
    r2r_labels,
    r2r_pos_weight,
    r2r_route,
)

ROUTER_CONFIG_NAME = "router_config.json"
ROUTER_WEIGHTS_NAME = "router.safetensors"

# --------------------------------------------------------------------------------------------------------------------
# Router model
# --------------------------------------------------------------------------------------------------------------------


R2R_SLM_HIDDEN_SIZE = 1536  # DeepSeek-R1-Distill-Qwen-1.5B, the small model R2R's default router was sized for
R2R_WIDTH = 1024
ROUTER_PARAMETER_BUDGET = 0.05  # default router parameters <= 5% of the small model's


@dataclass
class TokenRouterConfig:
    """Shape of a `TokenRouter`. The field defaults are R2R's (thu-nics/R2R `resource/default_training_config.json`,
    for a 1536-wide small model); `TokenRouter.from_small_model` scales the width to the small model (`scaled_width`).

    Args:
        hidden_size: the small model's last-layer hidden size.
        vocab_size: rows of the small model's input-embedding table (read for the proposed token's embedding).
        embedding_dim: width of that table (the small model's hidden size for most models).
        top_k: number of sorted top logits read by the router (R2R: 100); clipped to the vocabulary size.
        width: MLP width (R2R: 1024 for hidden size 1536).
        num_blocks: pre-LN residual MLP blocks (R2R: 6).
        expansion: block expansion factor (R2R: 4).
        dropout: block dropout (R2R: 0.1).
        threshold: routing threshold θ (route iff p ≥ θ), set by calibration and stored with the weights.
    """

    hidden_size: int
    vocab_size: int
    embedding_dim: int
    top_k: int = 100
    width: int = R2R_WIDTH
    num_blocks: int = 6
    expansion: int = 4
    dropout: float = 0.1
    threshold: float = 0.5

    def __post_init__(self):
        check_router_config(self)
        self.top_k = min(self.top_k, self.vocab_size)

    def num_parameters(self) -> int:
        """Trainable parameters (the embedding table is the small model's, not the router's)."""
        d, e, w, k, x = self.hidden_size, self.embedding_dim, self.width, self.top_k, self.expansion
        block = 2 * w + (w * w * x + w * x) + (w * x * w + w)  # LayerNorm, up, down
        return (k * d + d) + ((2 * d + e) * w + w) + self.num_blocks * block + 2 * w + (w + 1)


def scaled_width(hidden_size: int, small_model_parameters: int | None = None, budget: float = ROUTER_PARAMETER_BUDGET,
                 **config_kwargs) -> int:  # fmt: skip
    """R2R's router width scaled to a small model: `1024 · hidden_size / 1536` (a multiple of 8, at least 8), then
    lowered until the router has at most `budget` times the small model's parameters (when their count is given)."""
    width = max(8, round(R2R_WIDTH * hidden_size / R2R_SLM_HIDDEN_SIZE / 8) * 8)
    config_kwargs = {"vocab_size": 1 << 30, "embedding_dim": hidden_size, **config_kwargs}
    while small_model_parameters and width > 8:
        config = TokenRouterConfig(hidden_size=hidden_size, width=width, **config_kwargs)
        if config.num_parameters() <= budget * small_model_parameters:
            break
        width -= 8
    return width


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, expansion: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, width * expansion)
        self.down = nn.Linear(width * expansion, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.dropout(self.down(nn.functional.gelu(self.up(self.norm(x)))))


class TokenRouter(nn.Module):
    """R2R router: `p_t = σ(MLP([h_t, E[ŷ_t], W·topk(z_t)]))`, the probability that the small model's proposal ŷ_t is
    routing-worthy.

    Inputs per token, all from the small model's forward that proposes ŷ_t: `h_t` its last-layer hidden state (input of
    the LM head), `E[ŷ_t]` the proposed token's row of its input-embedding table (frozen), and the `top_k` largest
    logits (sorted) projected by `Linear(top_k → hidden_size)`. The concatenation goes through `Linear → width`,
    `num_blocks` pre-LN residual MLP blocks (GELU), `LayerNorm` and `Linear(width → 1)`.

    The embedding table is the small model's own tensor, held as a non-saved buffer: R2R keeps a frozen copy, which
    for a small model is its largest tensor; sharing it keeps the router's own size to its MLP (`num_parameters`), and
    `from_pretrained` re-attaches it from the small model.
    """

    def __init__(self, config: TokenRouterConfig, embedding_weight: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.register_buffer("token_embedding", torch.zeros(0), persistent=False)
        self.attach_embedding(torch.zeros(config.vocab_size, config.embedding_dim) if embedding_weight is None
                              else embedding_weight)  # fmt: skip
        self.topk_proj = nn.Linear(config.top_k, config.hidden_size)
        self.input_proj = nn.Linear(2 * config.hidden_size + config.embedding_dim, config.width)
        self.blocks = nn.ModuleList(
            _ResidualBlock(config.width, config.expansion, config.dropout) for _ in range(config.num_blocks)
        )
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, 1)

    @classmethod
    def from_small_model(cls, small_model, **config_kwargs) -> TokenRouter:
        """A fresh router for `small_model`, reading its input-embedding table. Without an explicit `width`, R2R's
        width is scaled to the small model's hidden size and capped at 5% of its parameters (`scaled_width`)."""
        embedding = small_model.get_input_embeddings().weight
        hidden = small_model.get_output_embeddings().in_features
        shape = dict(hidden_size=hidden, vocab_size=embedding.shape[0], embedding_dim=embedding.shape[1])
        if config_kwargs.get("width") is None:
            extra = {k: v for k, v in config_kwargs.items() if k in ("top_k", "num_blocks", "expansion")}
            small_parameters = sum(p.numel() for p in small_model.parameters())
            config_kwargs["width"] = scaled_width(hidden, small_parameters, vocab_size=embedding.shape[0], **extra)
        config = TokenRouterConfig(**shape, **config_kwargs)
        return cls(config, embedding).to(embedding.device)

    def attach_embedding(self, weight: torch.Tensor) -> None:
        """Read proposed-token embeddings from `weight` (the small model's input-embedding table, shared, frozen)."""
        if tuple(weight.shape) != (self.config.vocab_size, self.config.embedding_dim):
            raise ValueError(
                f"The embedding table has shape {tuple(weight.shape)}, the router config expects "
                f"{(self.config.vocab_size, self.config.embedding_dim)}: pass the small model the router was built for."
            )
        self.token_embedding = weight.detach()

    def num_parameters(self) -> int:
        """The router's own (trainable) parameters; the shared embedding table is not counted."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Forward FLOPs per routed decision, 2·(multiply-adds of the linear layers): what a cost figure must add."""
        return 2 * self.num_parameters()

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.config.threshold = float(value)

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor, topk_logits: torch.Tensor) -> torch.Tensor:
        """Routing logits `[N]` from hidden states `[N, d]`, proposed token ids `[N]`, sorted top-k logits `[N, k]`."""
        dtype = self.input_proj.weight.dtype
        embedded = nn.functional.embedding(token_ids, self.token_embedding).to(dtype)
        features = torch.cat([hidden.to(dtype), embedded, self.topk_proj(topk_logits.to(dtype))], dim=-1)
        x = self.input_proj(features)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).squeeze(-1)

    @torch.no_grad()
    def probability(self, hidden, token_ids, logits: torch.Tensor) -> torch.Tensor:
        """Routing probability from full next-token `logits [N, V]` (the top-k is taken here)."""
        topk = torch.topk(logits.float(), self.config.top_k, dim=-1).values
        return _binary_probability(self(hidden, token_ids, topk))

    def save_pretrained(self, path: str) -> str:
        """Write `router_config.json` (shape and threshold) and `router.safetensors` (weights) to `path`."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, ROUTER_CONFIG_NAME), "w") as handle:
            json.dump(asdict(self.config), handle, indent=2)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, os.path.join(path, ROUTER_WEIGHTS_NAME))
        return path

    @classmethod
    def from_pretrained(cls, path: str, small_model=None, device: torch.device | str | None = None) -> TokenRouter:
        """Load a saved router; `small_model` provides the token-embedding table (routers saved by earlier versions
        carry a copy as `embedding.weight`, used when present)."""
        config, state = read_router_folder(path, ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME, TokenRouterConfig)
        embedding = state.pop("embedding.weight", None)
        router = cls(TokenRouterConfig(**config), embedding)
        load_router_state(router, state, os.path.join(path, ROUTER_WEIGHTS_NAME))
        if embedding is None:
            if small_model is None:
                raise ValueError(
                    f"The router in {path!r} reads the small model's token embeddings: pass "
                    "`TokenRouter.from_pretrained(path, small_model=...)`."
                )
            router.attach_embedding(small_model.get_input_embeddings().weight)
        return router.to(device or "cpu").eval()


def _binary_probability(logits: torch.Tensor) -> torch.Tensor:
    # The binary router emits one logit per row; the ops function takes the head dimension explicitly.
    return r2r_divergence_probability(logits.unsqueeze(-1))


class RouterInputs(NamedTuple):
    """What a routing callable sees at one decoding step (batch rows B).

    `hidden [B, d]` the small model's last hidden state, `token_ids [B]` its proposals, `logits [B, V]` its raw
    next-token logits, `step` the index of the token being generated (0-based), `active [B]` rows still generating.
    """

    hidden: torch.Tensor
    token_ids: torch.Tensor
    logits: torch.Tensor
    step: int
    active: torch.Tensor


RouterLike = TokenRouter | Callable[[RouterInputs], torch.Tensor]

# --------------------------------------------------------------------------------------------------------------------
# Routed generation
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def routed_generate(
    small_model,
    large_model,
    router: RouterLike,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    prompts: list | None = None,
    tokenizer=None,
    threshold: float | None = None,
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    logits_processor: list | None = None,
    generator: torch.Generator | None = None,
    small_prompt_cache: PromptCache | None = None,
    large_prompt_cache: PromptCache | None = None,
) -> TokenRoutingOutput:
    """Decode with the small model and let the large model re-decide the tokens the router flags (R2R).

    Per step: the small model encodes the tokens it has not seen and proposes ŷ_t (greedy or sampled); the router gives
    `p_t`; rows with `p_t ≥ θ` get the large model's token instead (the large model first catches up its KV cache on
    every token it has not seen, in one forward). An EOS proposal is routed like any other token, so the large model
    decides whether to stop.

    Args:
        small_model, large_model: causal LMs with the same tokenizer (logits are cut to the smaller LM-head width).
        router: a `TokenRouter`, or any callable taking `RouterInputs` and returning `[B]` probabilities
            (e.g. `lambda x: torch.ones(len(x.token_ids))` always routes).
        input_ids, attention_mask: left-padded prompts; or `prompts` (text or messages) with `tokenizer`.
        threshold: θ; default the router's calibrated `threshold` (0.5 for a plain callable).
        max_new_tokens, eos_token_id, pad_token_id: as in `generate` (ids default to the tokenizer's).
        do_sample, temperature, top_k, top_p, logits_processor, generator: token choice for both models (greedy by
            default); `logits_processor` runs on the scores of whichever model chooses the token.
        small_prompt_cache, large_prompt_cache: `PromptCache`s of these `input_ids` (small: `capture_hidden=True`),
            to reuse the prompts' encoding across calls (e.g. a threshold sweep on the same prompts).

    Returns:
        `TokenRoutingOutput`: completions, `large_mask` (which model produced each token), `large_token_fraction`,
        the router probabilities of every proposal, decoded `texts` when a tokenizer is given, and call counters.
    """
    check_generation_args(small_model, large_model, tokenizer, max_new_tokens, do_sample, temperature, top_k, top_p)
    check_routing(router, small_model, threshold)
    input_ids, attention_mask = prepare_inputs([small_model], input_ids, attention_mask, prompts, tokenizer)
    eos, pad = resolve_special_ids([small_model, large_model], tokenizer, eos_token_id, pad_token_id)
    if threshold is None:
        threshold = router.threshold if isinstance(router, TokenRouter) else 0.5
    sampler = Sampler(do_sample, temperature, top_k, top_p, logits_processor, generator)
    vocab = shared_vocab_size(small_model, large_model)
    buffer = DecodingBuffer(input_ids, attention_mask, eos, pad)
    for cache in (small_prompt_cache, large_prompt_cache):
        if cache is not None:
            cache.check(input_ids)
    small = IncrementalDecoder(small_model, capture_hidden=True, prompt_cache=small_prompt_cache)
    large = IncrementalDecoder(large_model, prompt_cache=large_prompt_cache)
    router_device = next(router.parameters()).device if isinstance(router, nn.Module) else None
    was_training = isinstance(router, nn.Module) and router.training
    if was_training:
        router.eval()  # no dropout at decision time
    for step in range(max_new_tokens):
        if buffer.finished.all():
            break
        out = small.step(buffer.tokens, buffer.attention_mask)
        small_logits = out.logits[:, :vocab]
        proposal = sampler.choose(buffer.tokens, small_logits)
        if isinstance(router, TokenRouter):
            probs = router.probability(
                out.hidden.to(router_device), proposal.to(router_device), small_logits.to(router_device)
            ).to(proposal.device)
        else:
            probs = torch.as_tensor(router(RouterInputs(out.hidden, proposal, small_logits, step, buffer.active)))
            probs = probs.to(device=proposal.device, dtype=torch.float32).reshape(-1)
        route = r2r_route(probs, threshold) & buffer.active
        logits, next_tokens = small_logits, proposal
        if route.any():
            large_logits = large.step(buffer.tokens, buffer.attention_mask).logits[:, :vocab]
            large_tokens = sampler.choose(buffer.tokens, large_logits)
            next_tokens = torch.where(route, large_tokens, proposal)
            logits = torch.where(route.unsqueeze(-1), large_logits, small_logits)
        buffer.append(next_tokens, route, logits, sampler.generating_logits(logits), probs)
    if was_training:
        router.train()
    stats = {
        "threshold": float(threshold),
        "small_calls": small.calls,
        "small_encoded_tokens": small.encoded_tokens,
        "large_calls": large.calls,
        "large_encoded_tokens": large.encoded_tokens,
    }
    return buffer.output(tokenizer, stats)


# --------------------------------------------------------------------------------------------------------------------
# Label building
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class JudgeRequest:
    """One position where the small and large models' next-token predictions differ.

    `prompt_ids` and `prefix_ids` (the reference completion before the position) are token-id lists; `slm_token` and
    `llm_token` the two predictions; `example` the dataset row (for reward columns such as the reference answer).
    """

    prompt_ids: list[int]
    prefix_ids: list[int]
    slm_token: int
    llm_token: int
    example: dict
    position: int


Judge = Callable[[list[JudgeRequest]], Sequence[bool]]


class ContinuationJudge:
    """Default judge: the large model continues greedily from both branches (`prefix + slm_token` and
    `prefix + llm_token`, until EOS or `max_new_tokens`), and the two completions are compared.

    With `reward_fn` (TRL reward-function signature: `reward_fn(prompts=..., completions=..., **columns) ->
    list[float]`, the dataset's other columns passed as lists), a position is routing-worthy iff
    `reward(large branch) − reward(small branch) > margin` (or `|difference| > margin` with `symmetric=True`).
    Without one, iff the two continuations after the branching token differ as text: a crude stand-in for R2R's
    verifier LLM (which judges whether the branches diverge in meaning); pass your own verifier as `judge` for that.

    R2R's pipeline uses `max_new_tokens=8192` (one reasoning segment) and a 72B verifier; the default here is short.
    """

    def __init__(
        self,
        large_model,
        tokenizer,
        reward_fn: Callable | None = None,
        max_new_tokens: int = 32,
        margin: float = 0.0,
        symmetric: bool = False,
        batch_size: int = 32,
        conversational: bool = False,
    ):
        self.large_model = large_model
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.max_new_tokens = max_new_tokens
        self.margin = margin
        self.symmetric = symmetric
        self.batch_size = batch_size
        self.conversational = conversational

    def continuations(self, sequences: list[list[int]]) -> list[list[int]]:
        """Greedy large-model continuations (EOS kept) of token-id sequences, batched with left padding."""
        eos, pad = resolve_special_ids([self.large_model], self.tokenizer)
        results = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(chunk):
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            out = cached_generate(
                self.large_model, ids, mask, max_new_tokens=self.max_new_tokens, eos_token_id=eos, pad_token_id=pad
            )
            results += [c[m].tolist() for c, m in zip(out.completion_ids, out.completion_mask)]
        return results

    def __call__(self, requests: list[JudgeRequest]) -> list[bool]:
        if not requests:
            return []
        branches = [r.prompt_ids + r.prefix_ids + [token] for r in requests for token in (r.slm_token, r.llm_token)]
        continued = self.continuations(branches)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        if self.reward_fn is None:
            return [decode(continued[2 * i]) != decode(continued[2 * i + 1]) for i in range(len(requests))]
        completions, prompts, columns = [], [], {}
        for i, request in enumerate(requests):
            for branch, token in enumerate((request.slm_token, request.llm_token)):
                text = decode(request.prefix_ids + [token] + continued[2 * i + branch])
                completions.append([{"role": "assistant", "content": text}] if self.conversational else text)
                prompts.append(request.example.get("prompt"))
                for key, value in request.example.items():
                    if key not in ("prompt", "completion"):
                        columns.setdefault(key, []).append(value)
        rewards = self.reward_fn(prompts=prompts, completions=completions, **columns)
        judged = []
        for i in range(len(requests)):
            gain = float(rewards[2 * i + 1]) - float(rewards[2 * i])
            judged.append(abs(gain) > self.margin if self.symmetric else gain > self.margin)
        return judged


@torch.no_grad()
def _prefill_features(model, sequences: list[list[int]], pad: int, capture_hidden: bool, top_k: int, vocab: int):
    """Right-padded teacher-forced forward of full sequences: per-position logits (cut to `vocab`), hidden states."""
    width = max(len(s) for s in sequences)
    device = next(model.parameters()).device
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    captured = []
    handle = None
    if capture_hidden:
        handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    try:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    logits = logits[..., :vocab].float().cpu()
    predictions = logits.argmax(dim=-1)
    topk = torch.topk(logits, top_k, dim=-1).values if top_k else None
    hidden = captured[-1].float().cpu() if captured else None
    return predictions, topk, hidden


def build_routing_dataset(
    small_model,
    large_model,
    tokenizer,
    dataset,
    *,
    judge: Judge | None = None,
    reward_fn: Callable | None = None,
    prompt_column: str = "prompt",
    completion_column: str | None = None,
    add_eos: bool = True,
    max_new_tokens: int = 256,
    top_k: int = 100,
    batch_size: int = 8,
    continuation_max_new_tokens: int = 32,
    margin: float = 0.0,
    progress: bool = True,
):
    """Routing labels for router training (R2R's data pipeline, with a pluggable judge).

    For every example: (0) the reference completion is the dataset's `completion_column` (plus EOS when `add_eos`),
    or, by default, the large model's greedy completion of the prompt; (1) both models are teacher-forced along
    prompt + reference and give their greedy next-token prediction at every completion position; the small model also
    gives its last hidden state and top-k logits there; (2) every position where the predictions differ goes to the
    judge (default `ContinuationJudge(large_model, tokenizer, reward_fn)`); (3) labels: identical → 0, neutral → 0,
    routing-worthy → 1 (`ops.decoding.r2r_labels`).

    Returns a `datasets.Dataset`, one row per example, with the input columns plus `completion` (reference text),
    `prompt_ids`, `completion_ids`, `slm_token_ids`, `llm_token_ids`, `mismatch`, `labels`, `hidden_states`
    (`[T, d]`, float32) and `topk_logits` (`[T, k]`, sorted, float32), where T is the reference length. The router
    is trained on every position (`routing_tensors`).
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    check_labelling_args(small_model, large_model, tokenizer, max_new_tokens, top_k, batch_size,
                         continuation_max_new_tokens, margin)  # fmt: skip
    if prompt_column not in dataset.column_names:
        raise ValueError(f"Column {prompt_column!r} not found; the dataset has {dataset.column_names}.")
    if completion_column is not None and completion_column not in dataset.column_names:
        raise ValueError(f"Column {completion_column!r} not found; the dataset has {dataset.column_names}.")
    if judge is None:
        judge = ContinuationJudge(
            large_model,
            tokenizer,
            reward_fn=reward_fn,
            max_new_tokens=continuation_max_new_tokens,
            margin=margin,
            conversational=len(dataset) > 0 and not isinstance(dataset[0][prompt_column], str),
        )
    elif reward_fn is not None:
        raise ValueError("Pass either `judge` or `reward_fn` (the reward function is used by the default judge).")
    eos, pad = resolve_special_ids([large_model], tokenizer)
    vocab = shared_vocab_size(small_model, large_model)
    top_k = min(top_k, vocab)
    small_model.eval(), large_model.eval()
    rows = []
    bar = tqdm(total=len(dataset), desc="Labelling routing tokens", unit="example", disable=not progress)
    positives = mismatches = tokens = 0
    for start in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        ids, mask = encode_prompts(tokenizer, [ex[prompt_column] for ex in examples])
        prompt_ids = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        if completion_column is None:
            generated = cached_generate(
                large_model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad
            )
            references = [c[m].tolist() for c, m in zip(generated.completion_ids, generated.completion_mask)]
        else:
            references = [
                tokenizer(ex[completion_column], add_special_tokens=False)["input_ids"] + (eos[:1] if add_eos else [])
                for ex in examples
            ]
        keep = [i for i, ref in enumerate(references) if ref]
        sequences = [prompt_ids[i] + references[i] for i in keep]
        slm_pred, slm_topk, slm_hidden = _prefill_features(small_model, sequences, pad, True, top_k, vocab)
        llm_pred, _, _ = _prefill_features(large_model, sequences, pad, False, 0, vocab)
        per_row, requests, owners = {}, [], []
        for row, i in enumerate(keep):
            p, t = len(prompt_ids[i]), len(references[i])
            span = slice(p - 1, p - 1 + t)  # logits at position j predict token j + 1
            record = {
                "slm": slm_pred[row, span],
                "llm": llm_pred[row, span],
                "hidden": slm_hidden[row, span],
                "topk": slm_topk[row, span],
            }
            per_row[i] = record
            for pos in (record["slm"] != record["llm"]).nonzero().flatten().tolist():
                requests.append(
                    JudgeRequest(
                        prompt_ids[i],
                        references[i][:pos],
                        int(record["slm"][pos]),
                        int(record["llm"][pos]),
                        examples[i],
                        pos,
                    )
                )
                owners.append(i)
        verdicts = list(judge(requests)) if requests else []
        if len(verdicts) != len(requests):
            raise ValueError(f"The judge returned {len(verdicts)} verdicts for {len(requests)} requests.")
        divergent = {i: torch.zeros(len(references[i]), dtype=torch.bool) for i in keep}
        for owner, request, verdict in zip(owners, requests, verdicts):
            divergent[owner][request.position] = bool(verdict)
        for i in keep:
            record = per_row[i]
            labels = r2r_labels(record["slm"], record["llm"], divergent[i])
            mismatch = record["slm"] != record["llm"]
            positives += int(labels.sum())
            mismatches += int(mismatch.sum())
            tokens += len(labels)
            row = dict(examples[i])
            row.update(
                completion=tokenizer.decode(references[i], skip_special_tokens=True),
                prompt_ids=prompt_ids[i],
                completion_ids=references[i],
                slm_token_ids=record["slm"].tolist(),
                llm_token_ids=record["llm"].tolist(),
                mismatch=mismatch.tolist(),
                labels=labels.tolist(),
                hidden_states=record["hidden"].numpy(),
                topk_logits=record["topk"].numpy(),
            )
            rows.append(row)
        bar.update(len(examples))
        bar.set_postfix(tokens=tokens, mismatch=mismatches, routing_worthy=positives)
    bar.close()
    if not rows:
        raise ValueError("No example produced a non-empty reference completion; nothing to label.")
    return Dataset.from_list(rows)


def routing_tensors(dataset) -> dict[str, torch.Tensor]:
    """Flatten a routing dataset to per-token tensors: `hidden [N, d]`, `token_ids [N]` (the small model's
    proposals), `topk_logits [N, k]`, `labels [N]`."""
    columns = dataset.with_format("torch", columns=["hidden_states", "slm_token_ids", "topk_logits", "labels"])
    hidden, tokens, topk, labels = [], [], [], []
    for row in columns:
        hidden.append(row["hidden_states"].float().reshape(len(row["labels"]), -1))
        tokens.append(row["slm_token_ids"].long())
        topk.append(row["topk_logits"].float().reshape(len(row["labels"]), -1))
        labels.append(row["labels"].long())
    return {
        "hidden": torch.cat(hidden),
        "token_ids": torch.cat(tokens),
        "topk_logits": torch.cat(topk),
        "labels": torch.cat(labels),
    }


# --------------------------------------------------------------------------------------------------------------------
# Router training and calibration
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RouterTrainingConfig:
    """Router training (R2R defaults: thu-nics/R2R `resource/default_training_config.json`, `r2r/train/loss.py`)."""

    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate (R2R: 5e-5)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "AdamW weight decay (R2R: 5e-4)."})
    batch_size: int = field(default=1024, metadata={"help": "Tokens per optimizer step (R2R: 1024)."})
    num_epochs: int = field(default=50, metadata={"help": "Maximum epochs (R2R: 50)."})
    patience: int = field(default=10, metadata={"help": "Early stopping on validation loss (R2R: 10 epochs)."})
    recall_factor: float = field(
        default=1.0, metadata={"help": "pos_weight = (n_neg / n_pos)·recall_factor for the class imbalance (R2R: 1)."}
    )
    target_recall: float = field(
        default=0.95, metadata={"help": "Calibrate θ as the largest threshold with this recall on validation."}
    )
    default_threshold: float = field(
        default=0.5, metadata={"help": "θ when the validation split has no routing-worthy token."}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of tokens held out for early stopping and calibration (no eval set)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the split, initialisation and shuffling."})


@dataclass
class RouterTrainingResult:
    router: TokenRouter
    threshold: float
    history: list[dict]
    validation: dict


def _as_tensors(data) -> dict[str, torch.Tensor]:
    return data if isinstance(data, dict) else routing_tensors(data)


@torch.no_grad()
def router_probabilities(router: TokenRouter, data, batch_size: int = 4096) -> torch.Tensor:
    """Routing probabilities `[N]` of every token of a routing dataset (or of `routing_tensors` output)."""
    data = _as_tensors(data)
    device = next(router.parameters()).device
    was_training = router.training
    router.eval()
    probs = []
    for start in range(0, len(data["labels"]), batch_size):
        part = slice(start, start + batch_size)
        logits = router(data["hidden"][part].to(device), data["token_ids"][part].to(device),
                        data["topk_logits"][part].to(device))  # fmt: skip
        probs.append(_binary_probability(logits).cpu())
    router.train(was_training)
    return torch.cat(probs) if probs else torch.zeros(0)


def routing_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """Recall of the routing-worthy tokens, precision and the routing rate at θ."""
    route = r2r_route(probs, threshold)
    labels = labels.bool()
    positives = labels.sum().item()
    return {
        "threshold": float(threshold),
        "recall": (route & labels).sum().item() / positives if positives else float("nan"),
        "precision": (route & labels).sum().item() / route.sum().item() if route.any() else float("nan"),
        "route_rate": route.float().mean().item() if len(route) else float("nan"),
        "positive_rate": labels.float().mean().item() if len(labels) else float("nan"),
        "tokens": len(labels),
    }


def calibrate_router(router: TokenRouter, data, target_recall: float = 0.95, default_threshold: float = 0.5) -> float:
    """Set `router.threshold` to the largest θ whose routing reaches `target_recall` on `data`'s routing-worthy tokens
    (`ops.decoding.r2r_calibrate_threshold`; `default_threshold` if `data` has none) and return it."""
    check_number("target_recall", target_recall, "it is a recall", low=0.0, high=1.0)
    check_number("default_threshold", default_threshold, "it is a probability threshold", low=0.0, high=1.0)
    data = _as_tensors(data)
    threshold = r2r_calibrate_threshold(router_probabilities(router, data), data["labels"], target_recall,
                                        default_threshold)  # fmt: skip
    router.threshold = threshold
    return threshold


def train_router(
    router: TokenRouter,
    train_data,
    eval_data=None,
    config: RouterTrainingConfig | None = None,
    progress: bool = True,
) -> RouterTrainingResult:
    """Train a router on labelled tokens with `BCEWithLogitsLoss(pos_weight=(n_0/n_1)·recall_factor)`, AdamW, early
    stopping on the validation loss (best weights restored), then calibrate θ on the validation split for the target
    recall. `train_data`/`eval_data`: routing datasets (`build_routing_dataset`) or `routing_tensors` dicts; without
    `eval_data`, `validation_fraction` of the training tokens is held out."""
    from tqdm.auto import tqdm

    config = config or RouterTrainingConfig()
    check_router_training(config)
    generator = torch.Generator().manual_seed(config.seed)
    train = _as_tensors(train_data)
    if eval_data is not None:
        val = _as_tensors(eval_data)
    else:
        order = torch.randperm(len(train["labels"]), generator=generator)
        n_val = max(1, int(round(config.validation_fraction * len(order))))
        val = {key: value[order[:n_val]] for key, value in train.items()}
        train = {key: value[order[n_val:]] for key, value in train.items()}
    if len(train["labels"]) == 0:
        raise ValueError("No training tokens: the routing dataset is empty.")
    device = next(router.parameters()).device
    pos_weight = r2r_pos_weight(train["labels"], config.recall_factor).to(device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    params = [p for p in router.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def batch_loss(data, index):
        logits = router(data["hidden"][index].to(device), data["token_ids"][index].to(device),
                        data["topk_logits"][index].to(device))  # fmt: skip
        return loss_fn(logits, data["labels"][index].float().to(device))

    @torch.no_grad()
    def validation_loss():
        router.eval()
        total, count = 0.0, 0
        for start in range(0, len(val["labels"]), 4096):
            index = torch.arange(start, min(start + 4096, len(val["labels"])))
            total += batch_loss(val, index).item() * len(index)
            count += len(index)
        router.train()
        return total / max(count, 1)

    history, best, best_state, stale = [], math.inf, None, 0
    bar = tqdm(range(config.num_epochs), desc="Training router", unit="epoch", disable=not progress)
    router.train()
    for epoch in bar:
        order = torch.randperm(len(train["labels"]), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            loss = batch_loss(train, index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        val_loss = validation_loss()
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val_loss})
        bar.set_postfix(train_loss=f"{history[-1]['train_loss']:.4f}", val_loss=f"{val_loss:.4f}")
        if val_loss < best - 1e-6:
            best, best_state, stale = val_loss, copy.deepcopy(router.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    bar.close()
    if best_state is not None:
        router.load_state_dict(best_state)
    router.eval()
    threshold = calibrate_router(router, val, config.target_recall, config.default_threshold)
    validation = routing_metrics(router_probabilities(router, val), val["labels"], threshold)
    validation["loss"] = best
    return RouterTrainingResult(router, threshold, history, validation)
