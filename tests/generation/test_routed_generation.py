"""Routed generation (R2R) on tiny random Llamas: the extremes equal each model's own `generate`, the KV-cache path
equals a from-scratch recomputation at every step under random routing, and no token is encoded twice."""

import pytest
import torch

from tests.generation.conftest import PAD, VOCAB, tiny_llama
from trl_tokenlevel.generation.kv import IncrementalDecoder, cached_generate
from trl_tokenlevel.generation.routing import RouterInputs, TokenRouter, routed_generate

MAX_NEW = 9


def always(inputs: RouterInputs) -> torch.Tensor:
    return torch.ones(len(inputs.token_ids))


def never(inputs: RouterInputs) -> torch.Tensor:
    return torch.zeros(len(inputs.token_ids))


@pytest.fixture(scope="module")
def eos(small_large, padded_prompts):
    """An EOS id that the small model emits mid-sequence in some row (so rows finish at different steps)."""
    small, _ = small_large
    ids, mask = padded_prompts
    out = cached_generate(small, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=[], pad_token_id=PAD)
    eos = int(out.completion_ids[0, 3])
    assert eos not in out.completion_ids[0, :3].tolist()
    return eos


def hf_greedy(model, ids, mask, eos):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                         pad_token_id=PAD, eos_token_id=eos)  # fmt: skip
    return out[:, ids.shape[1] :]


def assert_same_completions(routed, reference, eos):
    """Compare up to each row's EOS (generate pads finished rows the same way, but may stop earlier)."""
    width = reference.shape[1]
    assert torch.equal(routed.completion_ids[:, :width], reference)
    assert routed.completion_ids.shape[1] == width


def test_never_routing_equals_small_model_generate(small_large, padded_prompts, eos):
    small, large = small_large
    ids, mask = padded_prompts
    out = routed_generate(small, large, never, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    assert_same_completions(out, hf_greedy(small, ids, mask, eos), eos)
    assert out.large_token_fraction == 0.0 and not out.large_mask.any()
    assert out.stats["large_calls"] == 0
    assert out.completion_mask[0].sum() == 4  # row 0 stops at the EOS emitted at step 3
    assert torch.equal(out.completion_ids, cached_generate(small, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                                           pad_token_id=PAD).completion_ids)  # fmt: skip


def test_always_routing_equals_large_model_generate(small_large, padded_prompts, eos):
    small, large = small_large
    ids, mask = padded_prompts
    out = routed_generate(small, large, always, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    assert_same_completions(out, hf_greedy(large, ids, mask, eos), eos)
    assert out.large_token_fraction == 1.0
    assert torch.equal(out.large_mask, out.completion_mask)


def test_threshold_extremes_with_a_trained_router_shape(small_large, padded_prompts, eos):
    """θ = 0 routes every proposal, θ > 1 none, whatever the router outputs."""
    small, large = small_large
    ids, mask = padded_prompts
    router = TokenRouter.from_small_model(small, width=16, num_blocks=1, top_k=8)
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    assert_same_completions(routed_generate(small, large, router, ids, mask, threshold=0.0, **kwargs),
                            hf_greedy(large, ids, mask, eos), eos)  # fmt: skip
    assert_same_completions(routed_generate(small, large, router, ids, mask, threshold=1.01, **kwargs),
                            hf_greedy(small, ids, mask, eos), eos)  # fmt: skip


@torch.no_grad()
def slow_reference(small, large, ids, mask, decisions, eos, max_new_tokens):
    """Every step, every row: strip the padding and run both models on the whole sequence from scratch (no cache).
    Returns the tokens, which model produced each, and the small model's last hidden state at every step."""
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    tokens, used_large, hiddens = [], [], []
    finished = [False] * len(rows)
    for step in range(max_new_tokens):
        if all(finished):
            break
        step_tokens, step_large, step_hidden = [], [], []
        for b, row in enumerate(rows):
            if finished[b]:
                step_tokens.append(PAD), step_large.append(False), step_hidden.append(None)
                continue
            captured = []
            handle = small.lm_head.register_forward_hook(lambda _m, args, _o: captured.append(args[0][0, -1]))  # noqa: B023 - used and removed in this iteration
            small_logits = small(torch.tensor([row])).logits[0, -1]
            handle.remove()
            token = int(small_logits.argmax())
            if decisions[b, step]:
                token = int(large(torch.tensor([row])).logits[0, -1].argmax())
            row.append(token)
            finished[b] = token == eos
            step_tokens.append(token), step_large.append(bool(decisions[b, step])), step_hidden.append(captured[0])
        tokens.append(step_tokens), used_large.append(step_large), hiddens.append(step_hidden)
    return torch.tensor(tokens).T, torch.tensor(used_large).T, hiddens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kv_cache_routing_equals_from_scratch_reference(small_large, padded_prompts, eos, seed):
    small, large = small_large
    ids, mask = padded_prompts
    decisions = torch.rand(ids.shape[0], MAX_NEW, generator=torch.Generator().manual_seed(seed)) < 0.4
    seen_hidden = []

    def random_router(inputs: RouterInputs) -> torch.Tensor:
        seen_hidden.append(inputs.hidden.clone())
        return decisions[:, inputs.step].float()

    out = routed_generate(small, large, random_router, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos,
                          pad_token_id=PAD)  # fmt: skip
    tokens, used_large, hiddens = slow_reference(small, large, ids, mask, decisions, eos, MAX_NEW)
    assert torch.equal(out.completion_ids, tokens)
    assert torch.equal(out.large_mask, used_large & out.completion_mask)
    for step, per_row in enumerate(hiddens):
        for b, hidden in enumerate(per_row):
            if hidden is not None:
                torch.testing.assert_close(seen_hidden[step][b], hidden, rtol=1e-4, atol=1e-5)
    # Each model encodes each buffer column once: the small model every column but the last, the large model every
    # column up to the last step at which some row still generating was routed.
    batch, prompt_len = ids.shape
    steps = out.completion_ids.shape[1]
    assert out.stats["small_encoded_tokens"] == batch * (prompt_len + steps - 1)
    routed_steps = (decisions[:, :steps] & out.completion_mask).any(dim=0).nonzero().flatten()
    expected_large = 0 if len(routed_steps) == 0 else batch * (prompt_len + routed_steps[-1].item())
    assert out.stats["large_encoded_tokens"] == expected_large
    assert out.stats["large_calls"] == len(routed_steps)


def test_r2r_routing_worked_example_through_the_loop(small_large):
    """Spec §13: probabilities [0.02, 0.9, 0.3, 0.06, 0.55] with θ = 0.3 route tokens [0, 1, 1, 0, 1]."""
    small, large = small_large
    probs = torch.tensor([0.02, 0.9, 0.3, 0.06, 0.55])
    out = routed_generate(small, large, lambda x: probs[x.step].reshape(1), torch.tensor([[5, 6, 7]]),
                          threshold=0.3, max_new_tokens=5, eos_token_id=[], pad_token_id=PAD)  # fmt: skip
    assert out.large_mask[0].int().tolist() == [0, 1, 1, 0, 1]
    assert out.large_token_fraction == pytest.approx(0.6)
    torch.testing.assert_close(out.router_probs[0], probs)


def test_router_probability_batch_of_three_is_binary(small_large, padded_prompts):
    """Three rows must give three sigmoid probabilities (not a 3-class softmax over the batch)."""
    small, large = small_large
    ids, mask = padded_prompts
    router = TokenRouter.from_small_model(small, width=16, num_blocks=1, top_k=8).eval()
    out = routed_generate(small, large, router, ids, mask, threshold=2.0, max_new_tokens=2, eos_token_id=[],
                          pad_token_id=PAD)  # fmt: skip
    decoder = IncrementalDecoder(small, capture_hidden=True)
    step = decoder.step(ids, mask)
    proposal = step.logits.argmax(-1)
    expected = torch.sigmoid(router(step.hidden, proposal, torch.topk(step.logits, 8).values))
    torch.testing.assert_close(out.router_probs[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_sampling_is_reproducible_and_never_routing_matches_single_model(small_large, padded_prompts):
    small, large = small_large
    ids, mask = padded_prompts
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=[], pad_token_id=PAD, do_sample=True, temperature=0.7,
                  top_k=20)  # fmt: skip
    a = routed_generate(small, large, never, ids, mask, generator=torch.Generator().manual_seed(3), **kwargs)
    b = cached_generate(small, ids, mask, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a.completion_ids, b.completion_ids)
    c = routed_generate(small, large, always, ids, mask, generator=torch.Generator().manual_seed(3), **kwargs)
    d = routed_generate(small, large, always, ids, mask, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(c.completion_ids, d.completion_ids)


def test_different_lm_head_widths_are_cut_to_the_shared_vocabulary(small_large, padded_prompts):
    small, _ = small_large
    wider = tiny_llama(5, hidden=32, layers=1, vocab=VOCAB + 8)
    ids, mask = padded_prompts
    out = routed_generate(small, wider, always, ids, mask, max_new_tokens=4, eos_token_id=[], pad_token_id=PAD)
    assert int(out.completion_ids.max()) < VOCAB
    assert torch.equal(out.large_mask, out.completion_mask)


def test_right_padding_and_missing_inputs_fail_clearly(small_large):
    small, large = small_large
    ids = torch.tensor([[5, 6, PAD]])
    with pytest.raises(ValueError, match="right-padded"):
        routed_generate(small, large, never, ids, torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts"):
        routed_generate(small, large, never, max_new_tokens=2)


def test_text_prompts_with_tokenizer_and_heatmap_rows(tiny_tokenizer):
    from trl_tokenlevel.tiny import build_tiny_model
    from trl_tokenlevel.viz import token_heatmap_html

    small = build_tiny_model(tiny_tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    large = build_tiny_model(tiny_tokenizer, hidden_size=48, num_layers=2, seed=1).eval()
    flip = {"n": 0}

    def every_other(inputs):
        flip["n"] += 1
        return torch.full((len(inputs.token_ids),), float(flip["n"] % 2))

    out = routed_generate(small, large, every_other, prompts=["Q: What is 1 plus 2?\nA:", "Q: Repeat"],
                          tokenizer=tiny_tokenizer, max_new_tokens=6)  # fmt: skip
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.large_mask[:, ::2].equal(out.completion_mask[:, ::2])
    rows = out.token_rows(tiny_tokenizer)
    assert [len(r.tokens) for r in rows] == out.completion_mask.sum(1).tolist()
    assert "row 0" in token_heatmap_html(rows)


def test_conversational_prompts_use_the_chat_template(tiny_tokenizer):
    small = tiny_llama(0, hidden=32, layers=1, vocab=len(tiny_tokenizer))
    large = tiny_llama(1, hidden=32, layers=1, vocab=len(tiny_tokenizer))
    messages = [[{"role": "user", "content": "What is 1 plus 2?"}]]
    out = routed_generate(small, large, never, prompts=messages, tokenizer=tiny_tokenizer, max_new_tokens=3)
    rendered = tiny_tokenizer.apply_chat_template(messages[0], tokenize=False, add_generation_prompt=True)
    prompt_ids = tiny_tokenizer(rendered)["input_ids"]
    assert out.sequences[0, : len(prompt_ids)].tolist() == prompt_ids


def test_prompt_caches_give_the_same_outputs_and_stay_reusable(small_large, padded_prompts):
    """Routed generation, EAD and single-model decoding from reused prompt caches equal the from-scratch runs, twice
    (each call decodes on a copy), and the prompt is not encoded again."""
    from trl_tokenlevel.generation.ead import ead_generate
    from trl_tokenlevel.generation.kv import PromptCache

    small, large = small_large
    ids, mask = padded_prompts
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=[], pad_token_id=PAD)
    flip = lambda x: (x.token_ids % 3 == 0).float()  # noqa: E731  (routes a deterministic subset of proposals)
    small_cache = PromptCache.build(small, ids, mask, capture_hidden=True)
    large_cache = PromptCache.build(large, ids, mask)
    reference = routed_generate(small, large, flip, ids, mask, **kwargs)
    for _ in range(2):
        cached = routed_generate(small, large, flip, ids, mask, small_prompt_cache=small_cache,
                                 large_prompt_cache=large_cache, **kwargs)  # fmt: skip
        assert torch.equal(cached.completion_ids, reference.completion_ids)
        assert torch.equal(cached.large_mask, reference.large_mask)
        torch.testing.assert_close(cached.router_probs, reference.router_probs)
        assert cached.stats["small_encoded_tokens"] == reference.stats["small_encoded_tokens"] - ids.numel()
    ead = ead_generate(small, large, ids, mask, threshold=3.0, window=1, min_dwell=1, **kwargs)
    ead_cached = ead_generate(small, large, ids, mask, threshold=3.0, window=1, min_dwell=1,
                              small_prompt_cache=small_cache, large_prompt_cache=large_cache, **kwargs)  # fmt: skip
    assert torch.equal(ead.completion_ids, ead_cached.completion_ids) and torch.equal(
        ead.large_mask, ead_cached.large_mask
    )
    single = cached_generate(large, ids, mask, prompt_cache=large_cache, **kwargs)
    assert torch.equal(single.completion_ids, cached_generate(large, ids, mask, **kwargs).completion_ids)
    with pytest.raises(ValueError, match="capture_hidden"):
        routed_generate(small, large, flip, ids, mask, small_prompt_cache=PromptCache.build(small, ids, mask), **kwargs)
    with pytest.raises(ValueError, match="shape"):
        cached_generate(large, ids[:2], mask[:2], prompt_cache=large_cache, **kwargs)
