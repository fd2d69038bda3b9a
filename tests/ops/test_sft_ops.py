"""Token-level SFT ops: CHORD-φ (§7), OTR (§11) and ssToken (§12) worked examples, exact chunked sampling, and the
chunked expected OTR loss against a naive full-logits reference."""

import math

import pytest
import torch

from trl_tokenlevel.ops import sft

F64 = torch.float64


def close(actual, expected, decimals):
    """Spec tolerance: half a unit of the last printed digit."""
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), rtol=0, atol=0.5 * 10**-decimals
    )


# --------------------------------------------------------------------------------------------------------------------
# CHORD (§7)
# --------------------------------------------------------------------------------------------------------------------


def test_chord_mu_schedule_worked_example():
    steps = [0, 100, 200, 400, 600, 1000]
    close([sft.chord_mu(s) for s in steps], [0.0, 0.25, 0.5, 0.26, 0.02, 0.02], 2)
    assert sft.chord_mu(0, warmup_steps=0, decay_steps=0, mu_peak=0.1, mu_valley=0.1) == 0.1
    # w = 0 skips the warmup branch: μ(0) = μ_peak when d > 0.
    assert sft.chord_mu(0, warmup_steps=0, decay_steps=400, mu_peak=0.5, mu_valley=0.02) == 0.5


def test_chord_phi_loss_worked_example():
    probs = torch.tensor([[0.9, 0.5, 0.1]], dtype=F64)
    close(sft.chord_phi(probs), [[0.09, 0.25, 0.09]], 2)
    mask = torch.ones_like(probs)
    l_sft = sft.chord_sft_loss(probs.log(), mask)
    close(l_sft, 0.130001, 6)
    close(sft.chord_sft_loss(probs.log(), mask, weighting="none"), 1.033698, 6)
    close(sft.chord_mix(torch.tensor(0.2, dtype=F64), l_sft, sft.chord_mu(400)), 0.181800, 6)


def test_chord_phi_weight_is_detached_and_options():
    log_probs = torch.tensor([[0.9, 0.5, 0.1]], dtype=F64).log().requires_grad_()
    sft.chord_sft_per_token_loss(log_probs).sum().backward()
    # d/dlogp of −logp·sg(φ) is −φ.
    close(log_probs.grad, [[-0.09, -0.25, -0.09]], 12)
    # "is" weighting is DFT: −p·log p.
    detached = log_probs.detach()
    close(sft.chord_sft_per_token_loss(detached, weighting="is"), -detached.exp() * detached, 12)
    # cutoff 0.5 clamps log p at log 0.5 (p = 0.9 → 0.5, weight 0.25).
    clamped = sft.chord_sft_per_token_loss(log_probs.detach(), cutoff_prob=0.5)
    close(clamped[0, 0], -math.log(0.5) * 0.25, 12)


def test_chord_sequence_level_reduction_and_empty_mask():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    per_token = sft.chord_sft_per_token_loss(log_probs, weighting="none")
    close(sft.chord_sft_loss(log_probs, mask, weighting="none", token_level=False), (2.0 + 1.0) / 2, 12)
    close(sft.chord_sft_loss(log_probs, mask, weighting="none"), (per_token * mask).sum() / 4, 12)
    assert sft.chord_sft_loss(log_probs, torch.zeros_like(mask)).item() == 0.0


# --------------------------------------------------------------------------------------------------------------------
# OTR (§11)
# --------------------------------------------------------------------------------------------------------------------

OTR_LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0]], dtype=F64)


def test_otr_worked_example_distributions():
    close(torch.softmax(OTR_LOGITS / 1.3, -1), [[0.532402, 0.246699, 0.167931, 0.0529689]], 6)
    close(torch.log_softmax(OTR_LOGITS, -1), [[-0.495182, -1.495182, -1.995182, -3.495182]], 6)
    close(-torch.log_softmax(OTR_LOGITS, -1)[0, 0], 0.495182, 6)  # plain SFT loss


def test_otr_mc_loss_worked_example():
    labels = torch.tensor([0])
    samples = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 2]])  # counts n = [5, 2, 1, 0], K = 8
    sampled_log_probs = torch.log_softmax(OTR_LOGITS, -1).gather(-1, samples)
    rewards = sft.otr_rewards(samples, labels, beta=-0.1, dtype=F64)
    close(rewards, [[1, 1, 1, 1, 1, -0.1, -0.1, -0.1]], 12)
    close(sft.otr_pg_loss(sampled_log_probs, rewards), [0.247169], 6)


def test_otr_mean_baseline_and_gold_knob():
    labels = torch.tensor([0, 3])
    samples = torch.tensor([[0, 1, 1, 2], [1, 1, 2, 0]])
    rewards = sft.otr_rewards(samples, labels, dtype=F64)
    log_probs = torch.log_softmax(OTR_LOGITS, -1).expand(2, -1).gather(-1, samples)
    advantages = rewards - rewards.mean(-1, keepdim=True)
    close(sft.otr_pg_loss(log_probs, rewards, baseline="mean"), -(advantages * log_probs).mean(-1), 12)
    # Row 1 never sampled its gold token: all rewards equal β, the mean baseline cancels them.
    assert sft.otr_pg_loss(log_probs, rewards, baseline="mean")[1].item() == 0.0
    ensured = sft.otr_ensure_gold(samples, labels)
    assert ensured.tolist() == [[0, 1, 1, 2], [1, 1, 2, 3]]


def test_otr_expected_loss_worked_example():
    eye = torch.eye(4, dtype=F64)
    labels = torch.tensor([0])
    close(sft.otr_expected_loss(OTR_LOGITS, eye, None, labels), [0.174731], 6)
    close(sft.otr_expected_loss(OTR_LOGITS, eye, None, labels, beta=0.0), [0.263636], 6)
    # Small tiles give the same value (online log-sum-exp across tiles).
    close(sft.otr_expected_loss(OTR_LOGITS, eye, None, labels, vocab_chunk=3, token_chunk=1), [0.174731], 6)


def naive_otr_expected_loss(hidden, weight, bias, labels, beta, kappa, tau):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    explore = torch.softmax(logits / kappa, -1).detach()
    log_probs = torch.log_softmax(logits / tau, -1)
    gold = torch.nn.functional.one_hot(labels, logits.shape[-1]).bool()
    weights = torch.where(gold, explore, beta * explore)
    return -(weights * log_probs).sum(-1)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_otr_expected_loss_matches_naive_forward_and_grads(use_bias, tau):
    gen = torch.Generator().manual_seed(0)
    n, h, v = 7, 5, 23
    hidden = torch.randn(n, h, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=F64, requires_grad=True)
    bias = torch.randn(v, generator=gen, dtype=F64, requires_grad=True) if use_bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.rand(n, generator=gen, dtype=F64)
    params = [hidden, weight] + ([bias] if use_bias else [])

    chunked = sft.otr_expected_loss(
        hidden, weight, bias, labels, beta=-0.2, logprob_temperature=tau, vocab_chunk=6, token_chunk=3
    )
    grads = torch.autograd.grad((chunked * upstream).sum(), params)
    naive = naive_otr_expected_loss(hidden, weight, bias, labels, -0.2, 1.3, tau)
    naive_grads = torch.autograd.grad((naive * upstream).sum(), params)
    torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-12)
    for got, want in zip(grads, naive_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_otr_expected_loss_bf16_inputs_and_empty():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 8, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(11, 8, generator=gen).bfloat16().requires_grad_()
    labels = torch.tensor([0, 3, 10, 5])
    loss = sft.otr_expected_loss(hidden, weight, None, labels, vocab_chunk=4)
    assert loss.dtype == torch.bfloat16
    loss.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    hidden64, weight64 = hidden.detach().double(), weight.detach().double()
    reference = naive_otr_expected_loss(hidden64, weight64, None, labels, -0.1, 1.3, 1.0)
    torch.testing.assert_close(loss.double(), reference, rtol=2e-2, atol=2e-2)
    empty = sft.otr_expected_loss(hidden[:0], weight, None, labels[:0])
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="-100"):
        sft.otr_expected_loss(hidden, weight, None, torch.tensor([0, -100, 1, 2]))


def test_gumbel_max_sampling_is_exact():
    """Empirical frequencies of 20000 samples per row match softmax((W h + b) / T) with real vocabulary and token
    tiling (V = 20 in tiles of 7, 5 rows in tiles of 2)."""
    gen = torch.Generator().manual_seed(1234)
    rows, hidden_size, vocab, draws, temperature = 5, 6, 20, 20000, 1.3
    hidden = torch.randn(rows, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    samples = sft.gumbel_max_sample_chunked(
        hidden, weight, bias, draws, temperature, generator=gen, vocab_chunk=7, token_chunk=2
    )
    assert samples.shape == (rows, draws) and samples.dtype == torch.long
    probs = torch.softmax((hidden.double() @ weight.double().T + bias.double()) / temperature, -1)
    freqs = torch.stack([torch.bincount(row, minlength=vocab) for row in samples]).double() / draws
    bound = 5 * torch.sqrt(probs * (1 - probs) / draws) + 1e-3
    deviation = (freqs - probs).abs()
    assert (deviation < bound).all(), f"max |freq - p| {deviation.max():.5f}, ratio {(deviation / bound).max():.3f}"
    # Pearson chi-square per row, df = V − 1 = 19: mean 19, sd ≈ 6.2; 70 is > 8 sd above the mean.
    chi_square = ((freqs - probs) ** 2 / probs).sum(-1) * draws
    assert (chi_square < 70).all(), chi_square


def test_gumbel_max_sampling_deterministic_and_degenerate_cases():
    gen_data = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, generator=gen_data)
    weight = torch.randn(9, 4, generator=gen_data)
    first, second = (
        sft.gumbel_max_sample_chunked(hidden, weight, None, 16, 1.0, torch.Generator().manual_seed(5), vocab_chunk=4)
        for _ in range(2)
    )
    assert torch.equal(first, second)
    # A dominant logit is (almost surely) always drawn; K = 1 works.
    peaked = torch.zeros(9)
    peaked[7] = 60.0
    samples = sft.gumbel_max_sample_chunked(hidden, weight * 0, peaked, 1, 1.0, vocab_chunk=4)
    assert samples.tolist() == [[7], [7], [7]]


def test_gumbel_max_sampling_never_projects_full_vocabulary(monkeypatch):
    shapes = []
    project = sft._tile_logits

    def spy(hidden, weight, bias):
        out = project(hidden, weight, bias)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(sft, "_tile_logits", spy)
    hidden, weight = torch.randn(10, 4), torch.randn(50, 4)
    sft.gumbel_max_sample_chunked(hidden, weight, None, 8, 1.0, vocab_chunk=16, token_chunk=4)
    assert shapes and all(rows <= 4 and cols <= 16 for rows, cols in shapes)
    assert sum(cols for _, cols in shapes) == 3 * 50  # each vocabulary tile projected once per token tile
    shapes.clear()
    labels = torch.zeros(10, dtype=torch.long)
    loss = sft.otr_expected_loss(hidden.requires_grad_(), weight, None, labels, vocab_chunk=16, token_chunk=4)
    loss.sum().backward()
    assert shapes and all(rows <= 4 and cols <= 16 for rows, cols in shapes)


# --------------------------------------------------------------------------------------------------------------------
# ssToken (§12)
# --------------------------------------------------------------------------------------------------------------------


def test_sstoken_worked_example():
    log_probs = torch.tensor([[-0.2, -2.0, -0.5, -1.0, -0.1]], dtype=F64)
    history = torch.tensor([[-0.9, -2.1, -0.4, -3.0, -0.1]], dtype=F64)
    rel = sft.retrospective_excess_loss(log_probs, history)
    close(rel, [[0.7, 0.1, -0.1, 2.0, 0.0]], 12)
    attention = torch.tensor([[0.10, 0.40, 0.05, 0.20, 0.25]], dtype=F64)
    mask = torch.ones_like(rel, dtype=torch.bool)
    scores = sft.ss_token_scores(rel, attention, mask, gamma=0.5)
    close(scores, [[0.261905, 0.547619, 0.0, 0.714286, 0.309524]], 6)
    assert sft.ss_token_select(scores, mask, ratio=0.6).long().tolist() == [[0, 1, 0, 1, 1]]


def test_sstoken_ema_worked_example():
    history, policy = [torch.tensor([1.0], dtype=F64)], [torch.tensor([2.0], dtype=F64)]
    sft.ema_update_(history, policy, decay=0.9)
    close(history[0], [1.1], 12)
    sft.ema_update_(history, policy, decay=1.0)  # α = 1: frozen history model
    close(history[0], [1.1], 12)


def test_sstoken_selection_masks_scopes_and_minimum():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)  # prompt/padding never kept
    per_sequence = sft.ss_token_select(scores, mask, ratio=0.5)
    assert per_sequence.long().tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]  # ceil(1.5) = 2; short row keeps ≥ 1
    batch = sft.ss_token_select(scores, mask, ratio=0.5, scope="batch")
    assert batch.long().tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]  # ceil(0.5·4) = 2 over the batch
    # ρ·N with float error (0.7·10 = 7.000000000000001) keeps exactly 7.
    assert sft.ss_token_select(torch.arange(10.0).unsqueeze(0), torch.ones(1, 10), ratio=0.7).sum() == 7
    # Ties: earlier positions first.
    assert sft.ss_token_select(torch.zeros(1, 4), torch.ones(1, 4), ratio=0.5).long().tolist() == [[1, 1, 0, 0]]


def test_sstoken_scores_constant_rel_and_batch_norm():
    rel = torch.tensor([[0.3, 0.3, 0.3], [1.0, 2.0, 0.0]], dtype=F64)
    attention = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.2, 0.4]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    scores = sft.ss_token_scores(rel, attention, mask, gamma=0.5)
    close(scores[0], [0.0, 0.5, 0.25], 6)  # constant REL → only attention decides
    assert scores[1, 2] == 0.0
    batch = sft.ss_token_scores(rel, attention, mask, gamma=0.0, norm_scope="batch")
    close(batch, [[0.0, 0.0, 0.0], [0.7 / 1.7, 1.0, 0.0]], 6)  # min 0.3, max 2.0 over the batch


def test_attention_prompt_mass():
    # B = 1, 2 heads, L = 4 (tokens 0-1 prompt, 2-3 response); causal rows sum to 1.
    head0 = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.1, 0.4, 0.4]])
    head1 = torch.tensor([[1.0, 0, 0, 0], [0.1, 0.9, 0, 0], [0.6, 0.2, 0.2, 0], [0.0, 0.3, 0.3, 0.4]])
    attentions = torch.stack([head0, head1]).unsqueeze(0)
    prompt = torch.tensor([[1, 1, 0, 0]])
    close(sft.attention_prompt_mass(attentions, prompt), [[1.0, 1.0, 0.65, 0.25]], 6)
