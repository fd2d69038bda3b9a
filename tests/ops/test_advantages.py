"""Token-level advantage shaping (spec §2-§10): every worked example in float64 at half a unit of the last printed
digit (index/mask outputs exact), plus padding, empty-group and registry contracts."""

import itertools
import math

import pytest
import torch

from trl_tokenlevel.ops.advantages import (
    TOKEN_ADVANTAGE_METHODS,
    TokenAdvantageInputs,
    chord_mix,
    chord_mu,
    chord_sft_loss,
    d3s_keep_ratio,
    d3s_max_variance_subset,
    d3s_token_advantages,
    group_relative_advantages,
    gtpo_conflict_counts,
    gtpo_conflict_runs,
    gtpo_loss,
    gtpo_shaped_advantages,
    gtpo_token_advantages,
    gtpo_token_weights,
    hapo_adaptive_temperature,
    hapo_clip_bounds,
    hapo_dual_clip_loss,
    hapo_entropy_stats,
    hapo_normalized_entropy,
    hapo_redistribute_advantages,
    hapo_tlga_advantages,
    hapo_token_advantages,
    prefix_tree_values,
    resolve_group_index,
    rmt_curriculum_probs,
    rmt_length_reward,
    rmt_ntp_loss,
    rmt_sample_targets,
    rmt_token_budget,
    tempo_advantages,
    ttrl_majority_vote_rewards,
    tvm_value_labels,
    tw_grpo_position_divergence,
    tw_grpo_soft_reward,
    tw_grpo_token_weights,
    tw_grpo_weights_from_divergence,
    ucas_advantages,
    ucas_self_certainty,
    ucas_self_certainty_from_logprobs,
)

F64 = torch.float64


def assert_printed(actual, printed):
    """Compare with digits as printed in the spec: tolerance is half a unit of the last printed digit."""
    values = torch.as_tensor(actual, dtype=F64).reshape(-1).tolist()
    printed = [printed] if isinstance(printed, str) else list(printed)
    assert len(values) == len(printed), (values, printed)
    for value, text in zip(values, printed):
        text = text.replace("−", "-")
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert abs(value - float(text)) <= 0.5 * 10**-decimals + 1e-12, f"{value} != {text}"


def one_group(n):
    return torch.zeros(n, dtype=torch.long)


def t64(values):
    return torch.tensor(values, dtype=F64)


# ---------------------------------------------------------------------------------------------------------------------
# Group helpers
# ---------------------------------------------------------------------------------------------------------------------


class TestGroupHelpers:
    def test_grpo_unbiased_std_eps_1e6(self):
        adv = group_relative_advantages(t64([1, 1, 0, 0]), one_group(4))
        assert_printed(adv, ["0.866024", "0.866024", "-0.866024", "-0.866024"])

    def test_eps_is_a_parameter(self):
        adv = group_relative_advantages(t64([1, 0]), one_group(2), eps=1e-4)
        assert adv[0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4), abs=1e-15)

    def test_groups_are_independent_and_indices_need_not_be_compact(self):
        rewards = t64([1, 0, 3, 5, 7])
        adv = group_relative_advantages(rewards, torch.tensor([4, 4, 9, 9, 9]))
        torch.testing.assert_close(adv[:2], group_relative_advantages(rewards[:2], one_group(2)))
        torch.testing.assert_close(adv[2:], group_relative_advantages(rewards[2:], one_group(3)))

    def test_singleton_group_uses_mean_0_std_1(self):
        adv = group_relative_advantages(t64([0.3, 1, 0]), torch.tensor([0, 1, 1]))
        assert adv[0].item() == pytest.approx(0.3 / (1 + 1e-6), abs=1e-15)
        assert torch.isfinite(adv).all()

    def test_centre_only(self):
        adv = group_relative_advantages(t64([1, 0, 0, 0]), one_group(4), norm_adv_by_std=False)
        assert_printed(adv, ["0.75", "-0.25", "-0.25", "-0.25"])

    def test_resolve_group_index(self):
        assert resolve_group_index(6, num_generations=3).tolist() == [0, 0, 0, 1, 1, 1]
        assert resolve_group_index(4, group_ids=torch.tensor([7, 3, 7, 3])).tolist() == [1, 0, 1, 0]
        with pytest.raises(ValueError, match="num_generations"):
            resolve_group_index(5, num_generations=2)

    def test_inputs_validation(self):
        ids = torch.zeros(2, 3, dtype=torch.long)
        ok = dict(
            completion_ids=ids,
            completion_mask=torch.ones(2, 3),
            per_token_logps=torch.zeros(2, 3),
            per_token_entropy=torch.zeros(2, 3),
            rewards=torch.zeros(2),
            advantages=torch.zeros(2),
        )
        assert TokenAdvantageInputs(**ok, num_generations=2).group_index.tolist() == [0, 0]
        with pytest.raises(ValueError, match="exactly one"):
            TokenAdvantageInputs(**ok)
        with pytest.raises(ValueError, match="exactly one"):
            TokenAdvantageInputs(**ok, num_generations=2, group_ids=torch.zeros(2))
        with pytest.raises(ValueError, match="per_token_entropy"):
            TokenAdvantageInputs(**{**ok, "per_token_entropy": torch.zeros(2, 4)}, num_generations=2)
        with pytest.raises(ValueError, match="rewards"):
            TokenAdvantageInputs(**{**ok, "rewards": torch.zeros(3)}, num_generations=2)


# ---------------------------------------------------------------------------------------------------------------------
# SPINE / TTRL votes (§2)
# ---------------------------------------------------------------------------------------------------------------------


class TestMajorityVote:
    def test_worked_example(self):
        assert ttrl_majority_vote_rewards(["42", "41", "42", "42", None]).tolist() == [1, 0, 1, 1, 0]

    def test_ties(self):
        assert ttrl_majority_vote_rewards(["b", "a", "a", "b", None]).tolist() == [1, 0, 0, 1, 0]
        assert ttrl_majority_vote_rewards(["b", "a", "a", "b"], tie_break="none").tolist() == [0, 0, 0, 0]

    def test_no_parseable_answer(self):
        assert ttrl_majority_vote_rewards([None, None]).tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# UCAS (§3)
# ---------------------------------------------------------------------------------------------------------------------


class TestUCAS:
    REWARDS = t64([1, 1, 0, 0])
    CERTAINTY = t64([[5, 5], [7, 7], [6, 6], [10, 10]])  # C = [10, 14, 12, 20]
    LOGITS = t64([[20, 22], [15, 25], [18, 30], [10, 12]])

    def test_intermediates(self):
        conf_z = group_relative_advantages(self.CERTAINTY.sum(1), one_group(4))
        assert_printed(conf_z, ["-0.925820", "0.0", "-0.462910", "1.388730"])

    def test_worked_example(self):
        adv = ucas_advantages(self.REWARDS, one_group(4), self.CERTAINTY, self.LOGITS, torch.ones(4, 2))
        assert_printed(
            adv, ["1.066565", "1.061565", "0.853524", "0.828524", "-0.756489", "-0.786489", "-1.408060", "-1.413060"]
        )

    def test_response_modifier(self):
        # κ = 0 leaves A·w = [1.091565, 0.866024, −0.736489, −1.408060] on every token.
        adv = ucas_advantages(self.REWARDS, one_group(4), self.CERTAINTY, self.LOGITS, torch.ones(4, 2), kappa=0.0)
        assert_printed(adv[:, 0], ["1.091565", "0.866024", "-0.736489", "-1.408060"])

    def test_self_certainty(self):
        logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
        probs = logits.softmax(-1)
        kl_uniform_p = (-(probs.log()).mean(-1)) - math.log(7)
        torch.testing.assert_close(ucas_self_certainty(logits), kl_uniform_p + math.log(7))

    def test_self_certainty_from_sampled_logprob(self):
        """`lse(z/T) = z_y/T − log p_T(y)`: the sampled token's logit and log-prob replace the vocabulary sum."""
        raw = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=F64)
        temperature, targets = 0.6, torch.tensor([[2], [0], [6]])
        logps = torch.log_softmax(raw / temperature, -1).gather(-1, targets).squeeze(-1)
        identity = ucas_self_certainty_from_logprobs(raw.gather(-1, targets).squeeze(-1), logps, raw.mean(-1),
                                                     temperature)  # fmt: skip
        torch.testing.assert_close(identity, ucas_self_certainty(raw / temperature))

    def test_padding_excluded_from_min_max_and_zero(self):
        mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]])
        logits = torch.cat([self.LOGITS, t64([[1000], [-1000], [0], [0]])], dim=1)
        certainty = torch.cat([self.CERTAINTY, t64([[50], [50], [50], [50]])], dim=1)
        adv = ucas_advantages(self.REWARDS, one_group(4), certainty, logits, mask)
        assert_printed(
            adv[:, :2],
            ["1.066565", "1.061565", "0.853524", "0.828524", "-0.756489", "-0.786489", "-1.408060", "-1.413060"],
        )
        assert (adv[:, 2] == 0).all()

    def test_zero_variance_group_and_equal_logits(self):
        equal_logits = torch.full((2, 3), 4.0, dtype=F64)
        adv = ucas_advantages(t64([1, 1]), one_group(2), torch.ones(2, 3, dtype=F64), equal_logits, torch.ones(2, 3))
        torch.testing.assert_close(adv, torch.full((2, 3), -0.05 * 0.5, dtype=F64))

    def test_positive_advantage_is_clamped_at_zero(self):
        adv = ucas_advantages(self.REWARDS, one_group(4), self.CERTAINTY, self.LOGITS, torch.ones(4, 2), kappa=5.0)
        assert (adv[:2] >= 0).all() and (adv[:2] == 0).any()
        assert (adv[2:] < -1).all()

    def test_mean_confidence(self):
        mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
        summed = ucas_advantages(self.REWARDS, one_group(4), self.CERTAINTY, self.LOGITS, mask, kappa=0.0)
        meaned = ucas_advantages(
            self.REWARDS, one_group(4), self.CERTAINTY, self.LOGITS, mask, kappa=0.0, confidence_agg="mean"
        )
        assert not torch.allclose(summed, meaned)
        conf_z = group_relative_advantages(t64([5, 7, 6, 10]), one_group(4))
        expected_w = torch.where(t64([1, 1, 0, 0]) > 0, torch.exp(-0.25 * conf_z), torch.exp(0.35 * conf_z))
        torch.testing.assert_close(meaned[:, 0], group_relative_advantages(self.REWARDS, one_group(4)) * expected_w)

    def test_gather_fn_makes_min_max_global(self):
        other_rank_bounds = t64([0.0, 100.0])
        adv = ucas_advantages(
            self.REWARDS,
            one_group(4),
            self.CERTAINTY,
            self.LOGITS,
            torch.ones(4, 2),
            gather_fn=lambda local: torch.cat([local, other_rank_bounds]),
        )
        no_penalty = ucas_advantages(
            self.REWARDS, one_group(4), self.CERTAINTY, self.LOGITS, torch.ones(4, 2), kappa=0.0
        )
        torch.testing.assert_close(adv[3], no_penalty[3] - 0.05 * self.LOGITS[3] / (100 + 1e-6))

    def test_gather_fn_ignores_a_rank_without_valid_tokens(self):
        # The empty rank sends (+inf, −inf): the bounds must stay this rank's own, not collapse to "no valid token".
        empty_rank_bounds = t64([float("inf"), float("-inf")])
        adv = ucas_advantages(
            self.REWARDS,
            one_group(4),
            self.CERTAINTY,
            self.LOGITS,
            torch.ones(4, 2),
            gather_fn=lambda local: torch.cat([empty_rank_bounds, local, empty_rank_bounds]),
        )
        local = ucas_advantages(self.REWARDS, one_group(4), self.CERTAINTY, self.LOGITS, torch.ones(4, 2))
        torch.testing.assert_close(adv, local, rtol=0, atol=0)
        assert (adv != 0).any()

    def test_gather_fn_on_the_empty_rank_uses_the_other_ranks_bounds(self):
        other_rank_bounds = t64([0.0, 100.0])
        adv = ucas_advantages(
            self.REWARDS,
            one_group(4),
            self.CERTAINTY,
            self.LOGITS,
            torch.zeros(4, 2),
            gather_fn=lambda local: torch.cat([local, other_rank_bounds]),
        )
        assert torch.equal(adv, torch.zeros(4, 2, dtype=F64))  # no valid token here: every entry is padding

    def test_all_masked(self):
        adv = ucas_advantages(self.REWARDS, one_group(4), self.CERTAINTY, self.LOGITS, torch.zeros(4, 2))
        assert torch.equal(adv, torch.zeros(4, 2, dtype=F64))


# ---------------------------------------------------------------------------------------------------------------------
# HAPO (§4)
# ---------------------------------------------------------------------------------------------------------------------


def lengths_mask(lengths, width):
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


class TestHAPO:
    H = t64([[0.01, 0.1, 0.5, 1.0, 2.0]])
    ONES = torch.ones(1, 5)

    def test_tlga(self):
        adv = hapo_tlga_advantages(t64([1, 0]), lengths_mask([3, 1], 3), one_group(2))
        assert_printed(adv, ["0.577349", "-1.732047"])

    def test_tlga_fallback(self):
        mask = lengths_mask([30, 1], 30)
        raw = hapo_tlga_advantages(t64([1, 0]), mask, one_group(2), fallback_threshold=100.0)
        assert_printed(raw, ["0.182573", "-5.477195"])
        assert_printed(hapo_tlga_advantages(t64([1, 0]), mask, one_group(2)), ["0.707106", "-0.707106"])

    def test_padding_quirk(self):
        mask = lengths_mask([4, 2], 4)
        default = hapo_tlga_advantages(t64([1, 0.8]), mask, one_group(2))
        assert_printed(default, ["0.707099", "-1.414199"])
        official = hapo_tlga_advantages(t64([1, 0.8]), mask, one_group(2), hapo_fallback_include_padding=True)
        assert_printed(official, ["0.707102", "-0.707102"])
        # Without padding the official test has no pad entries to trip on.
        unpadded = hapo_tlga_advantages(
            t64([1, 0.8]), lengths_mask([2, 2], 2), one_group(2), hapo_fallback_include_padding=True
        )
        assert_printed(unpadded, ["0.99999", "-0.99999"])

    def test_tlga_identical_rewards_and_empty_rows(self):
        adv = hapo_tlga_advantages(t64([0.5, 0.5, 1, 0]), lengths_mask([3, 2, 0, 0], 3), torch.tensor([0, 0, 1, 1]))
        assert torch.isfinite(adv).all()
        assert adv[:2].abs().max() < 1e-9

    def test_fallback_ignores_rows_without_tokens(self):
        # The empty row's TLGA value (10 − 0.5)/0.5 = 19 would trigger the fallback if it counted.
        adv = hapo_tlga_advantages(t64([1, 0, 10]), lengths_mask([1, 1, 0], 2), one_group(3))
        assert_printed(adv[:2], ["0.999998", "-0.999998"])

    def test_normalized_entropy(self):
        stats = hapo_entropy_stats(self.H, self.ONES, 0.8, False)
        assert_printed(stats.pivot, "0.0")
        assert_printed(stats.scale, "2.343945")
        h = (self.H.log() - stats.pivot) / stats.scale
        assert_printed(h, ["-1.964709", "-0.982354", "-0.295718", "0.0", "0.295718"])
        assert_printed(hapo_normalized_entropy(self.H, stats), ["-1.0", "-0.5", "-0.150515", "0.0", "1.0"])
        repo = hapo_entropy_stats(self.H, self.ONES, 0.8, True)
        assert_printed(hapo_normalized_entropy(self.H, repo), ["1.0", "0.5", "0.150515", "0.0", "1.0"])

    def test_clip_bounds(self):
        h_hat = t64([[-1.0, -0.5, -0.150515, 0.0, 1.0]])
        eps_low, eps_high = hapo_clip_bounds(h_hat)
        assert_printed(eps_low, ["0.4", "0.3", "0.230103", "0.2", "0.2"])
        assert_printed(eps_high, ["0.2", "0.2", "0.2", "0.2", "0.4"])
        eps_low, eps_high = hapo_clip_bounds(h_hat.abs())  # repository sign
        assert_printed(eps_low, ["0.2"] * 5)
        assert_printed(eps_high, ["0.4", "0.3", "0.230103", "0.2", "0.4"])

    def test_redistribution(self):
        ratio, adv = t64([[1.0, 1.3, 1.0, 0.8, 1.0]]), t64([[1, 1, -1, 1, -1]])
        intended = hapo_normalized_entropy(self.H, hapo_entropy_stats(self.H, self.ONES, 0.8, False))
        assert_printed(
            hapo_redistribute_advantages(adv, intended, ratio, self.ONES), ["0.0", "1.0", "-0.849485", "1.0", "-1.0"]
        )
        repo = hapo_normalized_entropy(self.H, hapo_entropy_stats(self.H, self.ONES, 0.8, True))
        assert_printed(hapo_redistribute_advantages(adv, repo, ratio, self.ONES), ["1.0", "1.5", "-1.0", "1.0", "-1.0"])

    def test_adaptive_temperature(self):
        intended = hapo_entropy_stats(self.H, self.ONES, 0.8, False)
        assert_printed(
            hapo_adaptive_temperature(self.H, intended, 1.0, 0.05), ["0.95", "0.975", "0.992474", "1.0", "1.05"]
        )
        repo = hapo_entropy_stats(self.H, self.ONES, 0.8, True)
        assert_printed(hapo_adaptive_temperature(self.H, repo, 1.0, 0.05), ["1.05", "1.025", "1.007526", "1.0", "1.05"])
        assert_printed(hapo_adaptive_temperature(self.H, None, 0.7, 0.05), ["0.7"] * 5)

    def test_registry_composes_tlga_entropy_and_ratio(self):
        entropy = torch.cat([self.H, t64([[0.3, 0.7, 1.5, 0.0, 0.0]])])
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        logps = t64([[-1.0, -0.5, -0.2, -2.0, -1.0], [-0.3, -0.1, -0.7, 0.0, 0.0]])
        old = logps - t64([[0.0, 0.25, 0.0, -0.2, 0.0], [0.1, -0.3, 0.0, 0.0, 0.0]])
        batch = TokenAdvantageInputs(
            torch.zeros(2, 5, dtype=torch.long),
            mask,
            logps,
            entropy,
            t64([1, 0]),
            t64([0, 0]),
            old_per_token_logps=old,
            num_generations=2,
        )
        adv = hapo_token_advantages(batch)
        stats = hapo_entropy_stats(entropy, mask, 0.8, False)
        expected = hapo_redistribute_advantages(
            hapo_tlga_advantages(t64([1, 0]), mask, one_group(2)),
            hapo_normalized_entropy(entropy, stats) * mask,
            (logps - old).exp(),
            mask,
        )
        torch.testing.assert_close(adv, expected)
        assert (adv[1, 3:] == 0).all()
        generation_time = hapo_token_advantages(
            TokenAdvantageInputs(
                batch.completion_ids, mask, logps, entropy, t64([1, 0]), t64([0, 0]), num_generations=2
            )
        )
        assert not torch.allclose(generation_time, adv)


class TestHAPODualClip:
    """Loss (d): PPO dual clip c = 10 with per-token clip ranges (no worked example in the spec: this one is ours).

    ε from the spec's ĥ example (ε_low = [0.4, 0.3, 0.230103, 0.2, 0.2] rounded, ε_high = [0.2, 0.2, 0.2, 0.2, 0.4]);
    ratios r = [0.5, 1.3, 12, 11, 20], A = [−1, −1, −1, 1, −0.5]:
    ℓ_PPO = max(−A r, −A clip(r)) = [0.6, 1.3, 12, −1.2, 10]; the dual clip caps A < 0 at c|A|:
    ℓ = [0.6, 1.3, 10, −1.2, 5], and the capped tokens (2, 4) get no gradient.
    """

    EPS_LOW = t64([[0.4, 0.3, 0.230103, 0.2, 0.2]])
    EPS_HIGH = t64([[0.2, 0.2, 0.2, 0.2, 0.4]])
    ADV = t64([[-1.0, -1.0, -1.0, 1.0, -0.5]])
    RATIO = t64([[0.5, 1.3, 12.0, 11.0, 20.0]])

    def test_worked_example(self):
        log_ratio = self.RATIO.log().requires_grad_()
        loss = hapo_dual_clip_loss(log_ratio.exp(), self.ADV, self.EPS_LOW, self.EPS_HIGH, dual_clip=10.0)
        assert_printed(loss, ["0.6", "1.3", "10", "-1.2", "5"])
        loss.sum().backward()
        # dℓ/d log r = −A·r on the unclipped branch, 0 on the clipped and dual-clipped ones.
        torch.testing.assert_close(log_ratio.grad, t64([[0.0, 1.3, 0.0, 0.0, 0.0]]))
        plain = hapo_dual_clip_loss(self.RATIO, self.ADV, self.EPS_LOW, self.EPS_HIGH, dual_clip=None)
        assert_printed(plain, ["0.6", "1.3", "12", "-1.2", "10"])

    @pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
    @pytest.mark.parametrize("shape", [(1, 2), (3, 7), (8, 33)])
    def test_trl_delta_cap_is_the_dual_clip(self, shape, dtype, tol):
        """The trainer's route: TRL's clipped loss with ``delta = c`` (``coef_1 = min(r, c)``) equals the dual clip,
        values and gradients, whenever c ≥ 1 + ε_high' (here ratios span 0.05..40 around c = 10)."""
        gen = torch.Generator().manual_seed(sum(shape))
        log_ratio = torch.rand(shape, generator=gen, dtype=dtype) * 6.7 - 3.0  # r in [0.05, 40]
        adv = torch.randn(shape, generator=gen, dtype=dtype)
        adv[0, 0], log_ratio[0, 0] = -1.0, math.log(20.0)  # at least one dual-clipped token
        adv[-1, -1] = 0.0
        log_ratio.requires_grad_()
        h_hat = torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1
        eps_low, eps_high = hapo_clip_bounds(h_hat, epsilon_low=0.2, epsilon_high=0.28, clip_alpha=1.0)
        reference = hapo_dual_clip_loss(log_ratio.exp(), adv, eps_low, eps_high, dual_clip=10.0)
        (ref_grad,) = torch.autograd.grad(reference.sum(), log_ratio)

        coef_1 = torch.exp(log_ratio)  # TRL grpo_trainer._compute_loss, loss_type in CLIPPED_LOSS_TYPES
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        coef_1 = torch.clamp(coef_1, max=10.0)  # `delta`
        trl = -torch.min(coef_1 * adv, coef_2 * adv)
        (trl_grad,) = torch.autograd.grad(trl.sum(), log_ratio)
        torch.testing.assert_close(trl, reference, atol=tol, rtol=tol)
        torch.testing.assert_close(trl_grad, ref_grad, atol=tol, rtol=tol)
        capped = (adv < 0) & (log_ratio.detach().exp() > 10)
        assert capped.any() and (ref_grad[capped] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# GTPO (§5)
# ---------------------------------------------------------------------------------------------------------------------


class TestGTPO:
    IDS = torch.tensor([[5, 7, 8, 9], [5, 7, 3, 9], [5, 7, 4, 9], [5, 2, 9, 0]])
    MASK = lengths_mask([4, 4, 4, 3], 4)
    ADV = t64([1.0, 0.5, -0.5, -1.0])
    MEAN_H = t64([0.3, 0.9, 0.2, 0.5])

    def batch(self, ids=None, mask=None):
        ids = self.IDS if ids is None else ids
        mask = self.MASK if mask is None else mask
        entropy = self.MEAN_H[:, None].expand(4, ids.shape[1]).clone()
        return TokenAdvantageInputs(
            ids,
            mask,
            torch.zeros(ids.shape, dtype=F64),
            entropy,
            torch.zeros(4, dtype=F64),
            self.ADV,
            num_generations=4,
        )

    def test_runs_weights_counts(self):
        forward, backward = gtpo_conflict_runs(self.IDS, self.MASK, self.ADV, one_group(4))
        assert forward.long().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
        assert backward.long().tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 0]]
        delta = gtpo_token_weights(forward, backward, self.ADV, self.MASK)
        assert delta.tolist() == [[2, 2, 1, 2], [2, 2, 1, 2], [0, 0, 1, 0], [0, 1, 0, 0]]
        assert gtpo_conflict_counts(forward, backward, self.MASK).tolist() == [3, 3, 3, 2]
        official = gtpo_conflict_counts(forward, backward, self.MASK, n_conflict_count="official")
        assert official.tolist() == [2, 2, 2, 1]

    def test_entropy_shaping(self):
        assert_printed(gtpo_shaped_advantages(self.ADV, self.MEAN_H), ["0.97", "0.0", "-0.52", "-1.05"])

    @pytest.mark.parametrize(
        "knobs, per_completion, mean",
        [
            ({}, ["-1.6975", "0.0", "0.13", "0.35"], "-0.304375"),
            ({"divide_by_n_conflict": True}, ["-0.565833", "0.0", "0.0433333", "0.175"], "-0.086875"),
            (
                {"divide_by_n_conflict": True, "n_conflict_count": "official"},
                ["-0.84875", "0.0", "0.065", "0.35"],
                "-0.1084375",
            ),
        ],
    )
    def test_losses(self, knobs, per_completion, mean):
        adv = gtpo_token_advantages(self.batch(), **knobs)
        assert_printed(-adv.sum(1) / self.MASK.sum(1), per_completion)
        logps = torch.zeros(4, 4, dtype=F64, requires_grad=True)
        loss = gtpo_loss(logps, adv, self.MASK)
        assert_printed(loss, mean)
        assert_printed(gtpo_loss(logps, adv, self.MASK, completion_reduction="sum"), str(4 * float(mean)))
        loss.backward()
        torch.testing.assert_close(logps.grad, -adv / self.MASK.sum(1, keepdim=True) / 4)

    def test_registry_default_is_paper_formula(self):
        adv = TOKEN_ADVANTAGE_METHODS["gtpo"](self.batch())
        assert_printed(gtpo_loss(torch.zeros(4, 4, dtype=F64), adv, self.MASK), "-0.304375")

    def test_left_padding_gives_the_same_weights(self):
        left_ids = torch.tensor([[5, 7, 8, 9], [5, 7, 3, 9], [5, 7, 4, 9], [0, 5, 2, 9]])
        left_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
        forward, backward = gtpo_conflict_runs(left_ids, left_mask, self.ADV, one_group(4))
        delta = gtpo_token_weights(forward, backward, self.ADV, left_mask)
        assert delta.tolist() == [[2, 2, 1, 2], [2, 2, 1, 2], [0, 0, 1, 0], [0, 0, 1, 0]]
        assert gtpo_conflict_counts(forward, backward, left_mask).tolist() == [3, 3, 3, 2]

    def test_no_negatives_means_no_conflicts_and_groups_are_separate(self):
        adv = t64([1.0, 0.5, -0.5, -1.0])
        forward, backward = gtpo_conflict_runs(self.IDS, self.MASK, adv, torch.tensor([0, 0, 1, 1]))
        assert not forward[:2].any() and not backward[:2].any()  # group 0 has no negatives
        assert gtpo_token_weights(forward, backward, adv, self.MASK)[:2].tolist() == self.MASK[:2].tolist()
        assert gtpo_conflict_counts(forward, backward, self.MASK)[:2].tolist() == [1, 1]

    def test_zero_advantage_rows_get_no_conflict_processing(self):
        adv = t64([1.0, 0.0, -0.5, -1.0])
        forward, backward = gtpo_conflict_runs(self.IDS, self.MASK, adv, one_group(4))
        assert not forward[1].any() and not backward[1].any()
        assert gtpo_token_weights(forward, backward, adv, self.MASK)[1].tolist() == [1, 1, 1, 1]

    def test_readme_entropy_filter(self):
        initial = t64([0.5, 0.5, 0.9, 0.5])
        current = t64([0.3, 0.9, 0.9, 0.69])
        shaped = gtpo_shaped_advantages(self.ADV, current, entropy_filter="readme", initial_mean_entropy=initial)
        assert_printed(shaped, ["0.97", "0.0", "-0.59", "-1.069"])
        with pytest.raises(ValueError, match="initial_mean_entropy"):
            gtpo_shaped_advantages(self.ADV, current, entropy_filter="readme")


# ---------------------------------------------------------------------------------------------------------------------
# D³S (§6)
# ---------------------------------------------------------------------------------------------------------------------


def population_variance(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


class TestD3S:
    REWARDS = t64([1, 1, 1, 0, 0, 1, 0, 1])

    def test_worked_example(self):
        keep = d3s_max_variance_subset(self.REWARDS, one_group(8), 4)
        assert keep.nonzero().flatten().tolist() == [0, 1, 4, 6]
        assert_printed(population_variance(self.REWARDS[keep].tolist()), "0.25")

    @pytest.mark.parametrize("seed", range(5))
    def test_exact_over_all_subsets(self, seed):
        rewards = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(seed)).to(F64) / 3
        for m in (2, 3, 5):
            keep = d3s_max_variance_subset(rewards, one_group(8), m)
            assert int(keep.sum()) == m
            best = max(population_variance(list(c)) for c in itertools.combinations(rewards.tolist(), m))
            assert population_variance(rewards[keep].tolist()) == pytest.approx(best, abs=1e-12)

    def test_float_ties_go_to_the_smallest_i(self):
        # Candidates i = 1 ({0.994, 0.894, 0.844}) and i = 2 ({0.994, 0.944, 0.844}) have mathematically equal
        # variances; in float64 the second comes out larger, which must not win.
        rewards = t64([0.844, 0.994, 0.894, 0.944])
        keep = d3s_max_variance_subset(rewards, one_group(4), 3)
        assert keep.long().tolist() == [1, 1, 1, 0]  # stable order [1, 3, 2, 0]; i = 1 keeps rows 1, 2, 0

    def test_groups_of_different_sizes_and_edge_cases(self):
        rewards = t64([1, 0, 1, 0, 0.5, 0.5, 0.5, 0.2, 0.9])
        groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
        keep = d3s_max_variance_subset(rewards, groups, torch.tensor([2, 2, 5]))
        # [1, 0, 1, 0]: stable order [0, 2, 1, 3], i = 1 (ties -> smallest i) keeps {0, 3}; equal rewards keep the first
        # m rows; m ≥ n keeps all.
        assert keep.long().tolist() == [1, 0, 0, 1, 1, 1, 0, 1, 1]
        skip = d3s_max_variance_subset(rewards, groups, 2, equal_rewards="skip")
        assert skip[4:7].sum() == 0 and skip[:4].sum() == 2

    def test_keep_ratio_schedule(self):
        assert d3s_keep_ratio(0, 100, ratio_start=0.2, ratio_end=1.0) == pytest.approx(0.2)
        assert d3s_keep_ratio(50, 100, ratio_start=0.2, ratio_end=1.0) == pytest.approx(0.6)
        assert d3s_keep_ratio(500, 100, ratio_start=0.5, ratio_end=1.0) == pytest.approx(1.0)

    def test_registry_drops_rows_and_tokens(self):
        mask = torch.ones(8, 3, dtype=torch.long)
        mask[7, 1:] = 0
        entropy = torch.rand(8, 3, generator=torch.Generator().manual_seed(0), dtype=F64) + 0.1
        batch = TokenAdvantageInputs(
            torch.zeros(8, 3, dtype=torch.long),
            mask,
            torch.zeros(8, 3, dtype=F64),
            entropy,
            self.REWARDS,
            torch.zeros(8, dtype=F64),
            num_generations=8,
        )
        rows_only = d3s_token_advantages(batch, sample_keep_ratio=0.5, token_keep_ratio=1.0)
        assert rows_only.ne(0).any(1).nonzero().flatten().tolist() == [0, 1, 4, 6]
        assert_printed(rows_only[rows_only.ne(0)].abs().unique(), ["0.866024"])  # recomputed on the kept subset
        adv = d3s_token_advantages(batch, sample_keep_ratio=0.5, token_keep_ratio=0.5)
        assert int(adv.ne(0).sum()) == 6  # ceil(0.5 · 12 valid tokens of the kept rows)
        kept_entropy = torch.where(rows_only.ne(0), entropy, torch.zeros_like(entropy))
        assert torch.equal(adv.ne(0), kept_entropy >= kept_entropy.flatten().topk(6).values[-1])
        full = d3s_token_advantages(batch, sample_keep_ratio=1.0, token_keep_ratio=1.0)
        torch.testing.assert_close(full, group_relative_advantages(self.REWARDS, one_group(8))[:, None] * mask)


# ---------------------------------------------------------------------------------------------------------------------
# CHORD (§7), implemented in ops.sft and re-exported
# ---------------------------------------------------------------------------------------------------------------------


class TestCHORD:
    def test_mu_schedule(self):
        assert_printed(
            [chord_mu(s) for s in (0, 100, 200, 400, 600, 1000)], ["0.0", "0.25", "0.5", "0.26", "0.02", "0.02"]
        )
        assert_printed(chord_mu(0, 0, 0, 0.1, 0.1), "0.1")

    def test_sft_loss_and_mix(self):
        logps = t64([[0.9, 0.5, 0.1]]).log()
        sft = chord_sft_loss(logps, torch.ones(1, 3))
        assert_printed(sft, "0.130001")
        assert_printed(chord_sft_loss(logps, torch.ones(1, 3), weighting="none"), "1.033698")
        assert_printed(chord_mix(t64(0.2), sft, chord_mu(400)), "0.181800")


# ---------------------------------------------------------------------------------------------------------------------
# TW-GRPO (§8)
# ---------------------------------------------------------------------------------------------------------------------


class TestTWGRPO:
    PROBS = t64(
        [
            [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.6, 0.2, 0.2]],
            [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05]],  # position 2 is padding (replaced by uniform)
        ]
    )
    MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])

    def test_worked_example(self):
        logps = self.PROBS.log()
        assert_printed(tw_grpo_position_divergence(logps, self.MASK, one_group(2)), ["1.023716", "0.0", "0.109090"])
        weights = tw_grpo_token_weights(logps, self.MASK, one_group(2))
        assert_printed(weights, ["1.7", "1.0", "1.074594", "1.7", "1.0", "0"])

    def test_three_completions_against_a_loop(self):
        gen = torch.Generator().manual_seed(0)
        logps = torch.randn(3, 4, 5, generator=gen, dtype=F64).log_softmax(-1)
        mask = lengths_mask([4, 2, 3], 4)
        filled = [
            [logps[g, t] if mask[g, t] else torch.full((5,), -math.log(5), dtype=F64) for t in range(4)]
            for g in range(3)
        ]
        expected = []
        for t in range(4):
            mean = sum(filled[g][t] for g in range(3)) / 3
            kappas = [((mean - filled[g][t]).exp() - (mean - filled[g][t]) - 1).sum() for g in range(3)]
            expected.append(sum(kappas) / 3)
        divergence = tw_grpo_position_divergence(logps, mask, one_group(3))
        torch.testing.assert_close(divergence[0], torch.stack(expected))

    def test_weight_gradient_flag(self):
        logps = self.PROBS.log().requires_grad_(True)
        assert not tw_grpo_token_weights(logps, self.MASK, one_group(2)).requires_grad
        assert tw_grpo_token_weights(logps, self.MASK, one_group(2), tw_weight_grad=True).requires_grad

    def test_groups_and_singletons(self):
        logps = torch.cat([self.PROBS, self.PROBS[:1]]).log()
        mask = torch.cat([self.MASK, torch.tensor([[1, 1, 0]])])
        weights = tw_grpo_token_weights(logps, mask, torch.tensor([0, 0, 1]))
        assert_printed(weights[:2], ["1.7", "1.0", "1.074594", "1.7", "1.0", "0"])
        assert weights[2].tolist() == [1.0, 1.0, 0.0]

    def test_registry(self):
        batch = TokenAdvantageInputs(
            torch.zeros(2, 3, dtype=torch.long),
            self.MASK,
            torch.zeros(2, 3, dtype=F64),
            torch.zeros(2, 3, dtype=F64),
            t64([1, 0]),
            t64([0.7, -0.7]),
            num_generations=2,
            full_logps=self.PROBS.log(),
        )
        adv = TOKEN_ADVANTAGE_METHODS["tw_grpo"](batch)
        assert_printed(adv, ["1.19", "0.7", "0.752216", "-1.19", "-0.7", "0"])

    def test_registry_from_divergence(self):
        """Without (B, T, V) log-probs: the per-row divergence (what `ops.chunked.chunked_tw_grpo_divergence` builds
        from hidden states) gives the same advantages, with α applied by the entry."""
        divergence = tw_grpo_position_divergence(self.PROBS.log(), self.MASK, one_group(2))[one_group(2)]
        batch = TokenAdvantageInputs(
            torch.zeros(2, 3, dtype=torch.long),
            self.MASK,
            torch.zeros(2, 3, dtype=F64),
            torch.zeros(2, 3, dtype=F64),
            t64([1, 0]),
            t64([0.7, -0.7]),
            num_generations=2,
            tw_grpo_divergence=divergence,
        )
        assert_printed(TOKEN_ADVANTAGE_METHODS["tw_grpo"](batch), ["1.19", "0.7", "0.752216", "-1.19", "-0.7", "0"])
        assert_printed(
            tw_grpo_weights_from_divergence(divergence, self.MASK, tw_alpha=1.7),
            ["1.7", "1.0", "1.074594", "1.7", "1.0", "0"],
        )
        with pytest.raises(ValueError, match="full_logps"):
            TOKEN_ADVANTAGE_METHODS["tw_grpo"](batch, tw_weight_grad=True)

    def test_soft_reward(self):
        assert tw_grpo_soft_reward("A, C", "A,B,C") == pytest.approx(2 / 3)
        assert tw_grpo_soft_reward("A,D", "A,B,C") == 0.0
        assert tw_grpo_soft_reward("", "A,B") == 0.0
        assert tw_grpo_soft_reward("D", "A", verified=True) == 1.0
        assert tw_grpo_soft_reward("A,B", "B , A") == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# RMT (§9)
# ---------------------------------------------------------------------------------------------------------------------


class TestRMT:
    def test_budget_worked_example(self):
        knobs = dict(budget_init=1024, budget_min=64, gamma=0.5)
        for form in ("as_rendered", "scaled"):
            assert rmt_token_budget(0, 100, **knobs, exponent_form=form) == 1024
            assert rmt_token_budget(100, 100, **knobs, exponent_form=form) == 512
        # The forms differ for k ≠ 1 and never go below B_min.
        assert rmt_token_budget(100, 100, **knobs, k=2) == 1016
        assert rmt_token_budget(100, 100, **knobs, k=2, exponent_form="scaled") == 256
        assert rmt_token_budget(100, 100, **knobs, k=10, exponent_form="scaled") == 64
        with pytest.raises(ValueError):
            rmt_token_budget(0, 100, budget_init=1024, budget_min=0, gamma=0.5)

    def test_length_reward(self):
        assert_printed(rmt_length_reward(t64([0, 50, 100, 150, 250]), 100), ["0", "0.5", "1", "0.5", "0"])

    def test_curriculum(self):
        entropy = t64([[0.1, 1.0, 3.0], [2.0, 0.5, 9.0]])
        candidates = torch.tensor([[1, 1, 1], [1, 1, 0]])
        early = rmt_curriculum_probs(entropy, candidates, 0, 100)
        late = rmt_curriculum_probs(entropy, candidates, 100, 100)
        assert_printed(early.sum(), "1.0")
        assert early[1, 2] == 0 and late[1, 2] == 0
        assert early[0, 0] == early.max() and late[0, 2] == late.max()
        window = rmt_curriculum_probs(entropy, candidates, 0, 100, curriculum="percentile")
        assert (window > 0).long().tolist() == [[1, 0, 0], [0, 1, 0]]  # percentiles 0 and 0.25 are in [0, 0.3]
        assert not rmt_curriculum_probs(entropy, torch.zeros(2, 3), 0, 100).any()

    def test_sample_targets_follow_the_curriculum(self):
        entropy = t64([[0.1, 1.0, 3.0, 0.5], [2.0, 0.5, 9.0, 4.0]])
        candidates = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]])
        gen = torch.Generator().manual_seed(0)
        # A sharp curriculum (τ → 0) picks the easiest candidate of each row first and the hardest last.
        sharp = dict(curriculum_temperature=0.05, generator=gen)
        assert rmt_sample_targets(entropy, candidates, 0, 10, **sharp).nonzero().tolist() == [[0, 0], [1, 1]]
        assert rmt_sample_targets(entropy, candidates, 10, 10, **sharp).nonzero().tolist() == [[0, 2], [1, 3]]
        # Never a non-candidate; two targets per row without replacement; a row without candidates gets none.
        for step in range(11):
            picked = rmt_sample_targets(entropy, candidates, step, 10, num_targets=2, generator=gen)
            assert (picked.sum(1) == 2).all() and not (picked & ~candidates.bool()).any()
        empty = rmt_sample_targets(entropy, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), 0, 10, num_targets=3,
                                   generator=gen)  # fmt: skip
        assert empty.sum(1).tolist() == [2, 0]
        # Sampling frequencies follow rmt_curriculum_probs (restricted to the row, renormalised).
        counts = torch.zeros(4, dtype=F64)
        for _ in range(4000):
            counts += rmt_sample_targets(entropy, candidates, 3, 10, generator=gen)[0].double()
        expected = rmt_curriculum_probs(entropy, candidates, 3, 10)[0]
        torch.testing.assert_close(counts / 4000, expected / expected.sum(), atol=0.03, rtol=0)

    def test_ntp_loss(self):
        logps = t64([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
        mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
        sampled = torch.tensor([[1, 0, 0], [0, 1, 0]])
        assert_printed(rmt_ntp_loss(logps, mask, sampled, ntp_coef=0.5), "1.5")


# ---------------------------------------------------------------------------------------------------------------------
# TEMPO / TVM (§10)
# ---------------------------------------------------------------------------------------------------------------------

A_, B_, C_, D_, E_, F_, EOS, PAD = 1, 2, 3, 4, 5, 6, 9, 0


class TestTEMPO:
    IDS = torch.tensor([[A_, B_, C_, EOS], [A_, B_, D_, EOS], [A_, E_, EOS, PAD], [A_, E_, F_, EOS]])
    MASK = lengths_mask([4, 4, 3, 4], 4)
    REWARDS = t64([1, 0, 1, 0])

    def test_worked_example(self):
        adv = group_relative_advantages(self.REWARDS, one_group(4))
        assert_printed(adv, ["0.866024", "-0.866024", "0.866024", "-0.866024"])
        token_adv = tempo_advantages(adv, self.IDS, self.MASK, one_group(4))
        assert_printed(token_adv[0], ["0.866024", "0.866024", "1.732048", "0.866024"])
        assert_printed(token_adv[1], ["-0.866024", "-0.866024", "-1.732048", "-0.866024"])
        assert_printed(token_adv[2, :3], ["0.866024", "0.866024", "1.732048"])
        assert token_adv[2, 3] == 0
        assert_printed(token_adv[3], ["-0.866024", "-0.866024", "-1.732048", "-0.866024"])

    def test_td_only_at_branch_tokens(self):
        adv = group_relative_advantages(self.REWARDS, one_group(4))
        tree = prefix_tree_values(self.IDS, self.MASK, one_group(4), adv)
        assert tree.branch.long().tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0]]
        td = torch.where(tree.branch, tree.node_value - tree.parent_value, torch.zeros_like(adv[:, None]))
        assert (td.abs() > 1e-9).long().tolist() == [[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0]]

    def test_tvm_labels(self):
        labels = tvm_value_labels(self.REWARDS, self.IDS, self.MASK, one_group(4))
        assert_printed(labels[0, 1], "0.5")  # v(ab)
        assert_printed(labels[2, 1], "0.5")  # v(ae)
        assert_printed(labels[3, 2], "0.0")  # v(aef)
        assert_printed(labels[0, 0], "0.5")  # v(a)
        assert labels[2, 3] == 0

    def test_lambda_left_padding_and_duplicates(self):
        adv = group_relative_advantages(self.REWARDS, one_group(4))
        half = tempo_advantages(adv, self.IDS, self.MASK, one_group(4), tempo_lambda=0.5)
        assert_printed(half[0, 2], "1.299036")
        left_ids = torch.tensor([[A_, B_, C_, EOS], [A_, B_, D_, EOS], [PAD, A_, E_, EOS], [A_, E_, F_, EOS]])
        left_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
        left = tempo_advantages(adv, left_ids, left_mask, one_group(4))
        assert torch.equal(left[2, 1:], tempo_advantages(adv, self.IDS, self.MASK, one_group(4))[2, :3])
        duplicates = tempo_advantages(
            t64([0.5, 0.5]), self.IDS[:1].repeat(2, 1), self.MASK[:1].repeat(2, 1), one_group(2)
        )
        assert torch.equal(duplicates, torch.full((2, 4), 0.5, dtype=F64))

    def test_stopping_is_a_branch_without_eos(self):
        ids = torch.tensor([[A_, E_, PAD], [A_, E_, F_]])
        mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
        adv = tempo_advantages(t64([1.0, -1.0]), ids, mask, one_group(2))
        assert adv.tolist() == [[1.0, 1.0, 0.0], [-1.0, -1.0, -2.0]]

    def test_groups_are_separate_trees(self):
        ids = torch.cat([self.IDS, self.IDS])
        mask = torch.cat([self.MASK, self.MASK])
        adv = t64([0.866024, -0.866024, 0.866024, -0.866024, 1.0, 1.0, 1.0, 1.0])
        token_adv = tempo_advantages(adv, ids, mask, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
        assert torch.equal(token_adv[4:], mask[4:].to(F64))


# ---------------------------------------------------------------------------------------------------------------------
# Registry contract
# ---------------------------------------------------------------------------------------------------------------------


def random_batch(seed=0, vocab=5):
    """Two groups (sizes 3 and 1 via group_ids), one all-masked row, NaN on padding where a model could leave it."""
    gen = torch.Generator().manual_seed(seed)
    batch_size, seq_len = 4, 6
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=gen)
    ids[:2, :2] = 1  # a shared prefix so GTPO and TEMPO have conflicts and branches
    mask = lengths_mask([6, 4, 0, 5], seq_len)
    entropy = torch.rand(batch_size, seq_len, generator=gen, dtype=F64)
    logps = -torch.rand(batch_size, seq_len, generator=gen, dtype=F64)
    full_logps = torch.randn(batch_size, seq_len, vocab, generator=gen, dtype=F64).log_softmax(-1)
    pad = ~mask.bool()
    for tensor in (entropy, logps):
        tensor[pad] = float("nan")
    rewards = t64([1.0, 0.0, 1.0, 0.5])
    return TokenAdvantageInputs(
        completion_ids=ids,
        completion_mask=mask,
        per_token_logps=logps,
        old_per_token_logps=logps - 0.1 * torch.rand(batch_size, seq_len, generator=gen, dtype=F64),
        per_token_entropy=entropy,
        rewards=rewards,
        advantages=group_relative_advantages(rewards, torch.tensor([0, 0, 0, 1])),
        group_ids=torch.tensor([10, 10, 10, 20]),
        self_certainty=torch.rand(batch_size, seq_len, generator=gen, dtype=F64),
        sampled_token_logits=torch.randn(batch_size, seq_len, generator=gen, dtype=F64),
        full_logps=full_logps,
        initial_mean_entropy=torch.rand(batch_size, generator=gen, dtype=F64),
    )


class TestRegistry:
    def test_names(self):
        assert set(TOKEN_ADVANTAGE_METHODS) == {"ucas", "hapo", "gtpo", "d3s", "tw_grpo", "tempo"}

    @pytest.mark.parametrize("name", sorted(TOKEN_ADVANTAGE_METHODS))
    def test_shape_padding_and_no_nan(self, name):
        batch = random_batch()
        adv = TOKEN_ADVANTAGE_METHODS[name](batch)
        assert adv.shape == batch.completion_ids.shape
        assert torch.isfinite(adv).all()
        assert (adv[~batch.completion_mask.bool()] == 0).all()
        assert adv.abs().sum() > 0

    @pytest.mark.parametrize("name", sorted(TOKEN_ADVANTAGE_METHODS))
    def test_all_masked_batch(self, name):
        batch = random_batch()
        batch.completion_mask = torch.zeros_like(batch.completion_mask)
        adv = TOKEN_ADVANTAGE_METHODS[name](batch)
        assert torch.equal(adv, torch.zeros_like(adv))

    @pytest.mark.parametrize(
        "name, field", [("ucas", "self_certainty"), ("ucas", "sampled_token_logits"), ("tw_grpo", "full_logps")]
    )
    def test_missing_fields_are_named(self, name, field):
        batch = random_batch()
        setattr(batch, field, None)
        with pytest.raises(ValueError, match=field):
            TOKEN_ADVANTAGE_METHODS[name](batch)

    def test_knobs_pass_through(self):
        batch = random_batch()
        default = TOKEN_ADVANTAGE_METHODS["tempo"](batch)
        assert not torch.equal(default, TOKEN_ADVANTAGE_METHODS["tempo"](batch, tempo_lambda=0.0))
        with pytest.raises(ValueError, match="entropy_filter"):
            TOKEN_ADVANTAGE_METHODS["gtpo"](batch, entropy_filter="initial")
