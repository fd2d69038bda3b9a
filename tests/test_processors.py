"""Generation LogitsProcessors on tiny random Llama models: the cached implicit-reward term equals a slow full-prefix
recomputation at every step (greedy, sampling, beam search, left padding), and HAPO's adaptive temperature."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor

from trl_tokenlevel.generation.processors import AdaptiveTemperatureLogitsProcessor, ImplicitRewardLogitsProcessor
from trl_tokenlevel.ops.decoding import hapo_adaptive_temperature, hapo_entropy_stats, next_token_entropy

PAD = 0
BETA = 0.5
GENERATE_KWARGS = {"max_new_tokens": 7, "pad_token_id": PAD, "eos_token_id": None}


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1), tiny_llama(2)  # generating policy, DPO model, reference


class Recorder(LogitsProcessor):
    """Runs `processor` and keeps (input_ids, scores before, scores after) of every step."""

    def __init__(self, processor):
        self.processor = processor
        self.steps = []

    def __call__(self, input_ids, scores):
        out = self.processor(input_ids, scores)
        self.steps.append((input_ids.clone(), scores.clone(), out.clone()))
        return out


@torch.no_grad()
def slow_implicit_reward(dpo, ref, input_ids, beta, pad_token_id=None):
    """Reference: re-encode each row's whole prefix (leading pads stripped) with both models at every step."""
    rewards = []
    for row in input_ids:
        if pad_token_id is not None:
            row = row[(row != pad_token_id).cumsum(0) > 0]
        row = row.unsqueeze(0)
        dpo_lp = torch.log_softmax(dpo(row).logits[0, -1].float(), -1)
        ref_lp = torch.log_softmax(ref(row).logits[0, -1].float(), -1)
        rewards.append(beta * (dpo_lp - ref_lp))
    return torch.stack(rewards)


def assert_matches_slow_reference(recorder, dpo, ref, pad_token_id=None):
    assert recorder.steps
    for input_ids, before, after in recorder.steps:
        expected = slow_implicit_reward(dpo, ref, input_ids, BETA, pad_token_id)
        finite = torch.isfinite(before)
        torch.testing.assert_close((after - before)[finite], expected[finite], rtol=0, atol=2e-5)


def prompts(batch=2, length=5, seed=0):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def count_forward_tokens(model):
    seen = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return seen, handle


def test_implicit_reward_greedy_matches_slow_reference_and_reuses_cache(models):
    policy, dpo, ref = models
    recorder = Recorder(ImplicitRewardLogitsProcessor(dpo, ref, beta=BETA))
    seen, handle = count_forward_tokens(dpo)
    try:
        policy.generate(prompts(), do_sample=False, logits_processor=[recorder], **GENERATE_KWARGS)
    finally:
        handle.remove()
    assert_matches_slow_reference(recorder, dpo, ref)
    # The prompt is encoded once; afterwards only the newest token per row.
    assert seen == [(2, 5)] + [(2, 1)] * 6
    # Reusing the processor for another generate call rebuilds the caches.
    recorder.steps.clear()
    policy.generate(prompts(batch=3, length=4, seed=1), do_sample=False, logits_processor=[recorder], **GENERATE_KWARGS)
    assert_matches_slow_reference(recorder, dpo, ref)


def test_implicit_reward_changes_greedy_output(models):
    policy, dpo, ref = models
    plain = policy.generate(prompts(), do_sample=False, **GENERATE_KWARGS)
    processor = ImplicitRewardLogitsProcessor(dpo, ref, beta=5.0)
    guided = policy.generate(prompts(), do_sample=False, logits_processor=[processor], **GENERATE_KWARGS)
    assert not torch.equal(plain, guided)


def test_implicit_reward_beam_search_matches_slow_reference(models):
    policy, dpo, ref = models
    recorder = Recorder(ImplicitRewardLogitsProcessor(dpo, ref, beta=BETA))
    seen, handle = count_forward_tokens(ref)
    try:
        out = policy.generate(
            prompts(), num_beams=2, num_return_sequences=2, logits_processor=[recorder], **GENERATE_KWARGS
        )
    finally:
        handle.remove()
    assert out.shape == (4, 12)
    assert seen == [(4, 5)] + [(4, 1)] * 6  # reordered caches, never re-encoded
    assert recorder.steps[0][0].shape == (4, 5)  # batch × num_beams rows
    assert_matches_slow_reference(recorder, dpo, ref)
    # Beam search reordered rows at some step, so the cache-reordering path was exercised.
    reordered = any(
        not torch.equal(current[:, :-1], previous)
        for (previous, _, _), (current, _, _) in zip(recorder.steps, recorder.steps[1:])
    )
    assert reordered


def test_implicit_reward_sampling_matches_slow_reference(models):
    policy, dpo, ref = models
    recorder = Recorder(ImplicitRewardLogitsProcessor(dpo, ref, beta=BETA))
    torch.manual_seed(0)
    out = policy.generate(
        prompts(), do_sample=True, top_k=0, num_return_sequences=2, logits_processor=[recorder], **GENERATE_KWARGS
    )
    assert out.shape == (4, 12)
    assert_matches_slow_reference(recorder, dpo, ref)


def test_implicit_reward_left_padding(models):
    policy, dpo, ref = models
    input_ids = prompts(batch=2, length=6, seed=3)
    input_ids[0, :2] = PAD
    attention_mask = (input_ids != PAD).long()
    recorder = Recorder(ImplicitRewardLogitsProcessor(dpo, ref, beta=BETA, pad_token_id=PAD))
    policy.generate(
        input_ids, attention_mask=attention_mask, do_sample=False, logits_processor=[recorder], **GENERATE_KWARGS
    )
    assert_matches_slow_reference(recorder, dpo, ref, pad_token_id=PAD)


def test_implicit_reward_rejects_vocabulary_mismatch(models):
    _, dpo, ref = models
    processor = ImplicitRewardLogitsProcessor(dpo, ref, beta=BETA)
    with pytest.raises(ValueError, match="vocabulary"):
        processor(prompts(), torch.zeros(2, 70))


def test_adaptive_temperature_processor(models):
    policy, _, _ = models
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 64, generator=gen) * 3
    processor = AdaptiveTemperatureLogitsProcessor(temperature=0.8, tau=0.05)
    torch.testing.assert_close(processor(None, scores), scores / 0.8)  # no statistics yet: plain temperature
    training_entropy = torch.rand(4, 10, generator=gen) * 3
    mask = torch.rand(4, 10, generator=gen) > 0.2
    processor.update_statistics(training_entropy, mask)
    stats = hapo_entropy_stats(training_entropy, mask, entropy_pivot=0.8)
    row_temperature = hapo_adaptive_temperature(next_token_entropy(scores / 0.8), stats, 0.8, 0.05)
    torch.testing.assert_close(processor(None, scores), scores / row_temperature.unsqueeze(-1))
    assert ((row_temperature >= 0.8 * 0.95 - 1e-6) & (row_temperature <= 0.8 * 1.05 + 1e-6)).all()

    torch.manual_seed(0)
    sampled = policy.generate(prompts(), do_sample=True, top_k=0, logits_processor=[processor], **GENERATE_KWARGS)
    assert sampled.shape == (2, 12)
    plain = policy.generate(prompts(), do_sample=False, **GENERATE_KWARGS)
    greedy = policy.generate(prompts(), do_sample=False, logits_processor=[processor], **GENERATE_KWARGS)
    assert torch.equal(plain, greedy)  # a positive rescaling keeps the argmax
    beams = policy.generate(prompts(), num_beams=2, logits_processor=[processor], **GENERATE_KWARGS)
    assert beams.shape == (2, 12)
