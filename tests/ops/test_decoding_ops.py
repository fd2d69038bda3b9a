"""Generation-time ops: worked examples of R2R (§13), EAD (§14), LM cascades (§15) and HAPO adaptive temperature
(§4), plus edge cases."""

import math

import pytest
import torch

from trl_tokenlevel.ops import decoding

F64 = torch.float64


def close(actual, expected, decimals):
    """Spec tolerance: half a unit of the last printed digit."""
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), rtol=0, atol=0.5 * 10**-decimals
    )


# --------------------------------------------------------------------------------------------------------------------
# R2R (§13)
# --------------------------------------------------------------------------------------------------------------------


def test_r2r_routing_worked_example():
    probs = torch.tensor([0.02, 0.9, 0.3, 0.06, 0.55], dtype=F64)
    assert decoding.r2r_route(probs, 0.3).long().tolist() == [0, 1, 1, 0, 1]


def test_r2r_threshold_calibration_worked_example():
    probs = torch.tensor([0.9, 0.8, 0.7, 0.4, 0.35, 0.2, 0.1, 0.05], dtype=F64)
    labels = torch.tensor([1, 1, 0, 1, 0, 1, 0, 0])
    assert decoding.r2r_calibrate_threshold(probs, labels, target_recall=0.95) == 0.2
    # Lower target: θ = 0.4 gives recall 3/4.
    assert decoding.r2r_calibrate_threshold(probs, labels, target_recall=0.75) == 0.4
    # No positives → the default threshold.
    assert decoding.r2r_calibrate_threshold(probs, torch.zeros(8), default_threshold=0.42) == 0.42


def test_r2r_threshold_calibration_ties():
    # θ = 0.5 routes both tied entries, reaching recall 1 at the larger threshold.
    probs = torch.tensor([0.9, 0.5, 0.5, 0.1])
    labels = torch.tensor([0, 0, 1, 0])
    assert decoding.r2r_calibrate_threshold(probs, labels) == 0.5


def test_r2r_labels_and_probabilities():
    slm = torch.tensor([[5, 6, 7, 8]])
    llm = torch.tensor([[5, 9, 7, 1]])
    divergent = torch.tensor([[True, False, True, True]])  # only read where the tokens differ
    assert decoding.r2r_labels(slm, llm, divergent).tolist() == [[0, 0, 0, 1]]
    assert decoding.r2r_labels(slm, llm, divergent, num_classes=3).tolist() == [[0, 1, 0, 2]]
    close(decoding.r2r_divergence_probability(torch.tensor([[0.0], [math.log(3)]], dtype=F64)), [0.5, 0.75], 12)
    three_class = torch.tensor([[0.0, 0.0, math.log(2)]], dtype=F64)
    close(decoding.r2r_divergence_probability(three_class), [0.5], 12)
    with pytest.raises(ValueError, match="head dimension"):
        decoding.r2r_divergence_probability(torch.tensor([0.0, 1.0, 2.0]))  # 3 binary logits, head dim squeezed
    close(decoding.r2r_pos_weight(torch.tensor([1, 0, 0, 0, 1, 0])), [2.0], 12)
    close(decoding.r2r_pos_weight(torch.tensor([1, 0, 0, 0]), recall_factor=1.5), [4.5], 12)


# --------------------------------------------------------------------------------------------------------------------
# EAD (§14)
# --------------------------------------------------------------------------------------------------------------------

EAD_ENTROPIES = torch.tensor([0.2, 0.3, 2.5, 2.8, 0.1, 0.1, 0.1, 0.1, 0.2], dtype=F64)


def test_ead_worked_example():
    schedule = decoding.ead_schedule(EAD_ENTROPIES, threshold=1.2, window=3, min_dwell=2)
    close(schedule.window_means, [0.2, 0.25, 1.0, 1.866667, 1.8, 1.0, 0.1, 0.1, 0.133333], 6)
    models = ["L" if large else "S" for large in schedule.use_large.tolist()]
    assert models == ["S", "S", "S", "S", "L", "L", "S", "S", "S"]


def test_ead_batch_rows_are_independent_and_threshold_is_strict():
    entropies = torch.stack([EAD_ENTROPIES, torch.full_like(EAD_ENTROPIES, 1.2)])
    schedule = decoding.ead_schedule(entropies, threshold=1.2, window=3, min_dwell=2)
    assert schedule.use_large[0].long().tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert not schedule.use_large[1].any()  # a mean equal to τ selects the small model


def test_ead_window_reset_knob_and_stepwise_use():
    switch = decoding.EntropyAdaptiveSwitch(1, threshold=1.0, window=3, min_dwell=1, reset_window_on_switch=True)
    assert switch.step(torch.tensor([3.0])).tolist() == [True]
    assert switch.window_mean().tolist() == [0.0]  # emptied on the switch
    assert switch.step(torch.tensor([0.5])).tolist() == [False]  # only the new entropy counts
    kept = decoding.EntropyAdaptiveSwitch(1, threshold=1.0, window=3, min_dwell=1)
    kept.step(torch.tensor([3.0]))
    assert kept.step(torch.tensor([0.5])).tolist() == [True]  # window mean 1.75 still above τ


def test_entropy_units():
    logits = torch.zeros(2, 8, dtype=F64)
    close(decoding.next_token_entropy(logits, unit="bits"), [3.0, 3.0], 12)
    close(decoding.next_token_entropy(logits), [math.log(8)] * 2, 12)
    masked = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]], dtype=F64)
    close(decoding.next_token_entropy(masked, unit="bits"), [1.0], 12)


# --------------------------------------------------------------------------------------------------------------------
# LM cascades (§15)
# --------------------------------------------------------------------------------------------------------------------

CASCADE_LOG_PROBS = torch.tensor([[-0.01, -0.05, -2.3, -0.02, -0.7]], dtype=F64)


def test_cascade_scores_worked_example():
    close(decoding.chow_sum(CASCADE_LOG_PROBS), [-3.08], 2)
    close(decoding.chow_average(CASCADE_LOG_PROBS), [-0.616], 3)
    close(decoding.chow_quantile(CASCADE_LOG_PROBS, 0.2), [-1.02], 2)
    close(decoding.chow_quantile(CASCADE_LOG_PROBS, 0.0), [-2.3], 1)


def test_cascade_quantile_matches_torch_with_ragged_rows_and_empty_output():
    gen = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(3, 6, generator=gen, dtype=F64) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    alphas = (0.0, 0.1, 0.35, 0.5, 1.0)
    quantiles = decoding.chow_quantile(log_probs, alphas, mask, empty_score=-math.inf)
    for row in range(2):
        expected = torch.quantile(log_probs[row][mask[row]], torch.tensor(alphas, dtype=F64))
        torch.testing.assert_close(quantiles[row], expected, rtol=0, atol=1e-12)
    assert torch.isneginf(quantiles[2]).all()
    assert decoding.chow_average(log_probs, mask)[2] == 0.0
    features = decoding.token_quantile_features(log_probs, mask)
    assert features.shape == (3, 12)
    assert features[:, -1].tolist() == [6.0, 3.0, 0.0]


def test_cascade_threshold_for_target_deferral_rate():
    scores = torch.tensor([-3.0, -0.5, -2.0, -0.1, -1.0, -4.0, -0.2, -0.3, -0.05, -0.6])
    threshold = decoding.deferral_threshold(scores, 0.3)
    deferred = decoding.cascade_defer(scores, threshold)
    assert threshold == -1.0 and deferred.sum() == 3
    assert decoding.deferral_threshold(scores, 0.0) == -4.0 and not decoding.cascade_defer(scores, -4.0).any()
    assert decoding.deferral_threshold(scores, 1.0) == math.inf
    # Ties at the boundary stay with the small model: the rate never exceeds the target.
    tied = torch.tensor([-1.0, -1.0, -1.0, 0.0])
    assert decoding.cascade_defer(tied, decoding.deferral_threshold(tied, 0.5)).sum() == 0


# --------------------------------------------------------------------------------------------------------------------
# HAPO adaptive temperature (§4 (a))
# --------------------------------------------------------------------------------------------------------------------

HAPO_ENTROPY = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0], dtype=F64)


def test_hapo_normalized_entropy_worked_example():
    stats = decoding.hapo_entropy_stats(HAPO_ENTROPY, entropy_pivot=0.8)
    close(stats.pivot, 0.0, 12)
    close(stats.scale, 2.343945, 6)
    close(decoding.hapo_normalized_entropy(HAPO_ENTROPY, stats), [-1.0, -0.5, -0.150515, 0.0, 1.0], 6)
    repo = decoding.hapo_entropy_stats(HAPO_ENTROPY, entropy_pivot=0.8, repo_sign_compat=True)
    close(decoding.hapo_normalized_entropy(HAPO_ENTROPY, repo), [1.0, 0.5, 0.150515, 0.0, 1.0], 6)


def test_hapo_adaptive_temperature_worked_example():
    stats = decoding.hapo_entropy_stats(HAPO_ENTROPY, entropy_pivot=0.8)
    temperature = decoding.hapo_adaptive_temperature(HAPO_ENTROPY, stats, temperature=1.0, tau=0.05)
    close(temperature, [0.95, 0.975, 0.992474, 1.0, 1.05], 6)
    repo = decoding.hapo_entropy_stats(HAPO_ENTROPY, entropy_pivot=0.8, repo_sign_compat=True)
    close(decoding.hapo_adaptive_temperature(HAPO_ENTROPY, repo), [1.05, 1.025, 1.007526, 1.0, 1.05], 6)


def test_hapo_temperature_before_first_step_clipping_and_mask():
    entropy = torch.tensor([0.3, 5.0], dtype=F64)
    close(decoding.hapo_adaptive_temperature(entropy, None, temperature=0.7), [0.7, 0.7], 12)
    stats = decoding.hapo_entropy_stats(HAPO_ENTROPY)
    # 1e-4 nats is far below the training minimum and 100 nats far above: ĥ is clipped to ±1.
    close(decoding.hapo_adaptive_temperature(torch.tensor([1e-4, 100.0], dtype=F64), stats), [0.95, 1.05], 12)
    padded = torch.cat([HAPO_ENTROPY, torch.tensor([50.0, 0.0], dtype=F64)])
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    masked_stats = decoding.hapo_entropy_stats(padded, mask)
    close(masked_stats.scale, stats.scale, 12)
    # A single token: ĥ = 0.
    single = decoding.hapo_entropy_stats(torch.tensor([0.4], dtype=F64))
    close(decoding.hapo_normalized_entropy(torch.tensor([0.4], dtype=F64), single), [0.0], 12)
    with pytest.raises(ValueError, match="valid token"):
        decoding.hapo_entropy_stats(HAPO_ENTROPY, torch.zeros(5, dtype=torch.bool))
