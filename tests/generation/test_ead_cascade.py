"""Entropy-adaptive switching and token-level cascades: the spec's worked examples driven through the generation
loops (scripted models), and integration on tiny random Llamas."""

import math

import pytest
import torch

from tests.generation.conftest import PAD, VOCAB
from tests.generation.fakes import ScriptedLM, entropy_bits, top_prob_for_entropy
from trl_tokenlevel.generation.cascade import (
    PostHocDeferral,
    calibrate_cascade,
    cascade_generate,
    cascade_scores,
)
from trl_tokenlevel.generation.ead import ead_generate
from trl_tokenlevel.generation.kv import cached_generate
from trl_tokenlevel.ops.decoding import ead_schedule

PROMPT = torch.tensor([[3, 4, 5]])

# ------------------------------------------------------------------------------------------------------------------
# EAD
# ------------------------------------------------------------------------------------------------------------------


def test_ead_worked_example_through_the_generation_loop():
    """Spec §14: w = 3, τ = 1.2 bits, d_min = 2, entropies [0.2, 0.3, 2.5, 2.8, 0.1, 0.1, 0.1, 0.1, 0.2]
    → models [S, S, S, S, L, L, S, S, S]; the switched-in model catches up on exactly the tokens it has not seen."""
    entropies = [0.2, 0.3, 2.5, 2.8, 0.1, 0.1, 0.1, 0.1, 0.2]
    top_probs = [top_prob_for_entropy(h) for h in entropies]
    assert all(abs(entropy_bits(p) - h) < 1e-9 for p, h in zip(top_probs, entropies))
    small, large = ScriptedLM(7, top_probs, 3), ScriptedLM(8, top_probs, 3)
    out = ead_generate(small, large, PROMPT, threshold=1.2, window=3, min_dwell=2, max_new_tokens=9,
                       eos_token_id=1, pad_token_id=PAD)  # fmt: skip
    assert ["L" if x else "S" for x in out.large_mask[0].tolist()] == list("SSSSLLSSS")
    assert out.completion_ids[0].tolist() == [7, 7, 7, 7, 8, 8, 7, 7, 7]
    torch.testing.assert_close(out.entropies[0].double(), torch.tensor(entropies, dtype=torch.float64), atol=1e-5,
                               rtol=0)  # fmt: skip
    assert out.large_token_fraction == pytest.approx(2 / 9)
    # Each model is fed every buffer column at most once: small up to column P+8, large up to column P+5.
    assert small.fed_columns == 3 + 8 and large.fed_columns == 3 + 5
    assert out.stats["switches"] == [2]


def test_ead_extremes_and_replay_on_tiny_llamas(small_large, padded_prompts):
    small, large = small_large
    ids, mask = padded_prompts
    kwargs = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=PAD)
    never = ead_generate(small, large, ids, mask, threshold=math.inf, **kwargs)
    assert torch.equal(never.completion_ids, cached_generate(small, ids, mask, **kwargs).completion_ids)
    assert never.stats["large_calls"] == 0
    # τ below every entropy: switch to the large model after d_min small tokens and stay there.
    eager = ead_generate(small, large, ids, mask, threshold=-1.0, window=2, min_dwell=3, **kwargs)
    assert eager.large_mask.int().tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]] * 3
    assert torch.equal(eager.completion_ids[:, :3], never.completion_ids[:, :3])
    # A threshold in the middle: the live decisions equal the offline replay of the recorded entropies.
    tau = never.entropies.median().item()
    live = ead_generate(small, large, ids, mask, threshold=tau, window=2, min_dwell=1, **kwargs)
    replay = ead_schedule(live.entropies.double(), tau, window=2, min_dwell=1)
    assert torch.equal(live.large_mask, replay.use_large)
    assert 0 < live.large_token_fraction < 1


def test_ead_start_large_and_sampling_reproducible(small_large, padded_prompts):
    small, large = small_large
    ids, mask = padded_prompts
    kwargs = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=PAD, threshold=math.inf, start_large=True,
                  min_dwell=2, do_sample=True, temperature=0.8)  # fmt: skip
    a = ead_generate(small, large, ids, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    b = ead_generate(small, large, ids, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert a.large_mask.int().tolist() == [[1, 1, 0, 0, 0, 0]] * 3


# ------------------------------------------------------------------------------------------------------------------
# Cascades
# ------------------------------------------------------------------------------------------------------------------


def test_cascade_worked_example_scores_through_generation():
    """Spec §15: token log-probs [−0.01, −0.05, −2.3, −0.02, −0.7] → Chow-Sum −3.08, Chow-Avg −0.616,
    0.2-quantile −1.02, min −2.3 — here the log-probs come out of the small model's own decoding."""
    log_probs = [-0.01, -0.05, -2.3, -0.02, -0.7]
    small = ScriptedLM(7, [math.exp(x) for x in log_probs], 3)
    out = cached_generate(small, PROMPT, max_new_tokens=5, eos_token_id=1, pad_token_id=PAD)
    lp, m = out.token_logprobs.double(), out.completion_mask
    torch.testing.assert_close(lp[0], torch.tensor(log_probs, dtype=torch.float64), atol=1e-6, rtol=0)
    expected = {"chow_sum": -3.08, "chow_average": -0.616}
    for rule, value in expected.items():
        assert cascade_scores(lp, m, rule).item() == pytest.approx(value, abs=5e-6)
    assert cascade_scores(lp, m, "chow_quantile", alpha=0.2).item() == pytest.approx(-1.02, abs=5e-6)
    assert cascade_scores(lp, m, "chow_quantile", alpha=0.0).item() == pytest.approx(-2.3, abs=5e-6)
    with pytest.raises(ValueError, match="rule"):
        cascade_scores(lp, m, "chow_max")


@pytest.fixture(scope="module")
def six_prompts():
    ids = torch.randint(3, VOCAB, (6, 5), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[2, :2], mask[2, :2] = PAD, 0
    return ids, mask


def test_cascade_calibration_and_generation(small_large, six_prompts):
    small, large = small_large
    ids, mask = six_prompts
    kwargs = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=PAD)
    theta = calibrate_cascade(small, ids, mask, target_deferral_rate=1 / 3, rule="chow_average", **kwargs)
    out = cascade_generate(small, large, ids, mask, threshold=theta, rule="chow_average", **kwargs)
    deferred = torch.tensor(out.stats["deferred"])
    assert deferred.sum() == 2 and out.stats["deferral_rate"] == pytest.approx(1 / 3)
    small_only = cached_generate(small, ids, mask, **kwargs)
    large_only = cached_generate(large, ids, mask, **kwargs)
    # Deferred rows are the two least confident ones, answered by the large model; the others keep the small answer.
    scores = torch.tensor(out.stats["scores"])
    assert set(torch.argsort(scores)[:2].tolist()) == set(deferred.nonzero().flatten().tolist())
    assert torch.equal(out.completion_ids[deferred], large_only.completion_ids[deferred])
    assert torch.equal(out.completion_ids[~deferred], small_only.completion_ids[~deferred])
    assert torch.equal(out.large_mask, out.completion_mask & deferred.unsqueeze(1))
    assert out.large_token_fraction == pytest.approx(1 / 3)
    assert out.stats["small_tokens_discarded"] == 12 == small_only.completion_mask[deferred].sum()
    # No deferral at θ = −inf; everything deferred at θ = +inf.
    assert cascade_generate(small, large, ids, mask, threshold=-math.inf, **kwargs).large_token_fraction == 0.0
    assert cascade_generate(small, large, ids, mask, threshold=math.inf, **kwargs).large_token_fraction == 1.0


def test_posthoc_deferral_learns_from_token_quantiles():
    g = torch.Generator().manual_seed(0)
    log_probs = -(torch.rand(200, 8, generator=g) ** 3) * 4
    mask = torch.ones_like(log_probs, dtype=torch.bool)
    helps = (log_probs.min(dim=1).values < -2.0).long()
    model = PostHocDeferral().fit(log_probs, mask, helps)
    scores = cascade_scores(log_probs, mask, rule=model)
    # Deferral candidates (low scores) are those where deferring helps: rank AUC close to 1.
    pos, neg = scores[helps.bool()], scores[~helps.bool()]
    auc = (pos.unsqueeze(1) < neg.unsqueeze(0)).float().mean().item()
    assert auc > 0.95
