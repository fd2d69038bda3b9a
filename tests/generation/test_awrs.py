"""AWRS: exactness of the constrained draw (chi-square against the brute-force distribution), unbiasedness and proper
weighting of the importance weight, constraint evaluations against the closed-form expectation, and the generate /
SMC integrations."""

import math

import pytest
import torch

from tests.generation.conftest import tiny_llama
from trl_tokenlevel.generation.awrs import (
    AWRSLogitsProcessor,
    TokenConstraint,
    awrs_sample,
    awrs_smc,
    expected_awrs_calls,
    expected_first_pass_calls,
    masked_sample,
)

VOCAB = 12


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: the 0.999 quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def case(seed: int, allowed_ids: list[int]):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=generator, dtype=torch.float64) * 1.5
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[allowed_ids] = True
    probs = torch.softmax(logits, dim=-1)
    return logits, allowed, probs


def draws(logits, allowed, n, seed, **kwargs):
    constraint = TokenConstraint(accept=lambda prefix, token: bool(allowed[token]))
    generator = torch.Generator().manual_seed(seed)
    return [awrs_sample(logits, constraint, [], generator=generator, **kwargs) for _ in range(n)]


@pytest.mark.parametrize("allowed_ids", [[0, 3, 7], [1, 2, 4, 5, 6, 8, 9, 10], [11]])
def test_samples_follow_the_constrained_distribution(allowed_ids):
    logits, allowed, probs = case(0, allowed_ids)
    n = 3000
    samples = draws(logits, allowed, n, seed=1)
    counts = torch.bincount(torch.tensor([s.token for s in samples]), minlength=VOCAB).double()
    assert counts[~allowed].sum() == 0  # never a disallowed token
    target = probs * allowed / (probs * allowed).sum()
    if len(allowed_ids) == 1:
        assert counts[allowed_ids[0]] == n
        return
    expected = n * target[allowed]
    statistic = ((counts[allowed] - expected) ** 2 / expected).sum().item()
    assert statistic < chi_square_critical(len(allowed_ids) - 1), statistic


def test_vectorised_constraint_in_chunks_gives_the_same_distribution():
    logits, allowed, probs = case(2, [2, 5, 9, 10])
    constraint = TokenConstraint(accept_batch=lambda prefix, tokens: allowed[tokens])
    generator = torch.Generator().manual_seed(3)
    n = 3000
    samples = [awrs_sample(logits, constraint, [], generator=generator, chunk_size=4) for _ in range(n)]
    counts = torch.bincount(torch.tensor([s.token for s in samples]), minlength=VOCAB).double()
    target = probs * allowed / (probs * allowed).sum()
    expected = n * target[allowed]
    statistic = ((counts[allowed] - expected) ** 2 / expected).sum().item()
    assert statistic < chi_square_critical(3), statistic
    weights = torch.tensor([math.exp(s.log_weight) for s in samples])
    z = (probs * allowed).sum().item()
    assert abs(weights.mean().item() - z) < 4 * weights.std().item() / math.sqrt(n)
    assert constraint.calls == sum(s.calls for s in samples)


@pytest.mark.parametrize("allowed_ids", [[0, 3, 7], [4, 6]])
def test_weight_is_unbiased_and_properly_weighted(allowed_ids):
    logits, allowed, probs = case(4, allowed_ids)
    n = 6000
    samples = draws(logits, allowed, n, seed=5)
    weights = torch.tensor([math.exp(s.log_weight) for s in samples], dtype=torch.float64)
    z = (probs * allowed).sum().item()
    standard_error = weights.std().item() / math.sqrt(n)
    assert abs(weights.mean().item() - z) < 4 * standard_error, (weights.mean().item(), z, standard_error)
    tokens = torch.tensor([s.token for s in samples])
    for a in allowed_ids:  # E[Ẑ·1[x = a]] = p(a): the pair (x, Ẑ) is properly weighted for p·1_A
        contribution = weights * (tokens == a)
        error = contribution.std().item() / math.sqrt(n)
        assert abs(contribution.mean().item() - probs[a].item()) < 4 * error + 1e-12


def test_constraint_calls_match_the_expectation():
    logits, allowed, probs = case(6, [1, 8])
    n = 4000
    samples = draws(logits, allowed, n, seed=7)
    first = torch.tensor([s.first_pass_calls for s in samples], dtype=torch.float64)
    total = torch.tensor([s.calls for s in samples], dtype=torch.float64)
    for observed, expected in ((first, expected_first_pass_calls(probs, allowed)),
                               (total, expected_awrs_calls(probs, allowed))):  # fmt: skip
        assert abs(observed.mean().item() - expected) < 4 * observed.std().item() / math.sqrt(n), (
            observed.mean().item(),
            expected,
        )
    assert total.max() <= VOCAB  # a token is never evaluated twice in one draw


def test_nothing_allowed_gives_zero_weight():
    logits, allowed, _ = case(8, [])
    sample = draws(logits, allowed, 1, seed=0)[0]
    assert sample.token == -1 and sample.log_weight == -math.inf and sample.calls == VOCAB
    masked = masked_sample(logits, lambda prefix, token: False)
    assert masked.token == -1 and masked.log_weight == -math.inf


def test_masked_sample_is_exact_and_counts_the_vocabulary():
    logits, allowed, probs = case(9, [3, 4])
    constraint = TokenConstraint(accept_batch=lambda prefix, tokens: allowed[tokens])
    sample = masked_sample(logits, constraint, generator=torch.Generator().manual_seed(0))
    assert sample.token in (3, 4)
    assert sample.log_weight == pytest.approx(math.log((probs * allowed).sum().item()), abs=1e-12)
    assert constraint.calls == VOCAB


def test_constraint_needs_a_callable():
    with pytest.raises(ValueError, match="accept"):
        TokenConstraint()
    with pytest.raises(ValueError, match="one row"):
        awrs_sample(torch.zeros(2, 3), lambda p, t: True)


def even_after_prefix(prefix, token):
    """Tokens must be even, and the constraint sees the prefix: no token may repeat the previous one."""
    return token % 2 == 0 and (not prefix or token != prefix[-1])


def test_generate_plugin_respects_the_constraint_and_records_weights():
    model = tiny_llama(0)
    prompts = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    processor = AWRSLogitsProcessor(even_after_prefix, eos_token_id=63, generator=torch.Generator().manual_seed(1))
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), logits_processor=[processor],
                         do_sample=False, max_new_tokens=6, eos_token_id=63, pad_token_id=0)  # fmt: skip
    completions = out[:, prompts.shape[1] :]
    for row in completions.tolist():
        for i, token in enumerate(row):
            assert even_after_prefix(row[:i], token)
    assert len(processor.log_weights) == completions.shape[1]
    weights = processor.sequence_log_weights()
    assert weights.shape == (3,) and torch.isfinite(weights).all() and (weights <= 0).all()
    # A second generate call starts over (prompt length re-read).
    model.generate(prompts[:1], logits_processor=[processor], do_sample=False, max_new_tokens=2, pad_token_id=0)
    assert len(processor.log_weights) == 2 and processor.prompt_length == prompts.shape[1]


def test_smc_particles_satisfy_the_constraint():
    model = tiny_llama(1)
    result = awrs_smc(model, [5, 6, 7, 8], even_after_prefix, num_particles=6, max_new_tokens=5, eos_token_id=62,
                      generator=torch.Generator().manual_seed(0), ess_threshold=0.9)  # fmt: skip
    assert len(result.completion_ids) == 6
    for completion in result.completion_ids:
        for i, token in enumerate(completion):
            assert even_after_prefix(completion[:i], token)
    assert torch.isfinite(result.log_weights).all()
    assert result.weights.sum().item() == pytest.approx(1.0)
    assert math.isfinite(result.log_marginal) and result.log_marginal <= 0
    assert result.constraint_calls > 0
