"""Entropy Adaptive Decoding (EAD): switch between a small and a large model on the rolling next-token entropy.

Paper: "Entropy Adaptive Decoding: Dynamic Model Switching for Efficient Inference"
(https://huggingface.co/papers/2502.06833). Spec: `shared/specs/rl_sft_decoding.md` §14. The switching rule is
`ops.decoding.EntropyAdaptiveSwitch`; this module is the generation loop around it.
"""

from __future__ import annotations

import torch

from trl_tokenlevel.generation.checks import check_ead_args, check_generation_args
from trl_tokenlevel.generation.kv import (
    DecodingBuffer,
    IncrementalDecoder,
    Sampler,
    TokenRoutingOutput,
    prepare_inputs,
    resolve_special_ids,
    shared_vocab_size,
)
from trl_tokenlevel.ops.decoding import EntropyAdaptiveSwitch, next_token_entropy


@torch.no_grad()
def ead_generate(
    small_model,
    large_model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    threshold: float,
    window: int = 5,
    min_dwell: int = 5,
    reset_window_on_switch: bool = False,
    start_large: bool = False,
    prompts: list | None = None,
    tokenizer=None,
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    logits_processor: list | None = None,
    generator: torch.Generator | None = None,
) -> TokenRoutingOutput:
    """Generate with the small model while the rolling mean entropy stays ≤ τ, with the large model while it is above.

    Per step and row: the current model (small at the start unless `start_large`) emits the token; its entropy H_t in
    **bits** (of the distribution the token is drawn from: the raw logits for greedy decoding, logits / temperature
    for sampling) enters a window of the last `window` entropies; once `min_dwell` tokens were generated since the last
    switch, the next model is large iff the window mean is > `threshold` (strictly). The window mixes entropies of
    both models (`reset_window_on_switch=True` clears it on a switch). A model that is switched in first catches up
    its KV cache on every token it has not seen, in one forward.

    Args:
        threshold: τ in bits (tune it per model pair; in nats it would be ln 2 times smaller).
        window, min_dwell: w and d_min ([recon] defaults 5 and 5: the paper swept them).
        Other arguments: as `routed_generate`.

    Returns:
        `TokenRoutingOutput` (`entropies` holds the H_t that drove the switching, `large_mask` the model per token).
    """
    check_generation_args(small_model, large_model, tokenizer, max_new_tokens, do_sample, temperature, top_k, top_p)
    check_ead_args(threshold, window, min_dwell)
    input_ids, attention_mask = prepare_inputs([small_model], input_ids, attention_mask, prompts, tokenizer)
    eos, pad = resolve_special_ids([small_model, large_model], tokenizer, eos_token_id, pad_token_id)
    sampler = Sampler(do_sample, temperature, top_k, top_p, logits_processor, generator)
    vocab = shared_vocab_size(small_model, large_model)
    buffer = DecodingBuffer(input_ids, attention_mask, eos, pad)
    small, large = IncrementalDecoder(small_model), IncrementalDecoder(large_model)
    switch = EntropyAdaptiveSwitch(
        input_ids.shape[0], threshold, window, min_dwell, reset_window_on_switch, start_large, input_ids.device
    )
    switches = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for _ in range(max_new_tokens):
        if buffer.finished.all():
            break
        use_large = switch.use_large.clone()
        active = buffer.active
        small_logits = large_logits = None
        if (active & ~use_large).any():
            small_logits = small.step(buffer.tokens, buffer.attention_mask).logits[:, :vocab]
        if (active & use_large).any():
            large_logits = large.step(buffer.tokens, buffer.attention_mask).logits[:, :vocab]
        if small_logits is None:
            logits = large_logits
        elif large_logits is None:
            logits = small_logits
        else:
            logits = torch.where(use_large.unsqueeze(-1), large_logits, small_logits)
        next_tokens = sampler.choose(buffer.tokens, logits)
        generating = sampler.generating_logits(logits)
        buffer.append(next_tokens, use_large, logits, generating)
        # Finished rows keep their state; their later tokens are padding and never read.
        switch.step(next_token_entropy(generating, "bits"))
        switches += (switch.use_large != use_large) & active
    stats = {
        "threshold": float(threshold),
        "window": window,
        "min_dwell": min_dwell,
        "switches": switches.tolist(),
        "small_calls": small.calls,
        "small_encoded_tokens": small.encoded_tokens,
        "large_calls": large.calls,
        "large_encoded_tokens": large.encoded_tokens,
    }
    return buffer.output(tokenizer, stats)
