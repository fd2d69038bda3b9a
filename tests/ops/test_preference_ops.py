"""Worked examples of `shared/specs/preference.md` (§11) and the gradient/detach/padding rules of §9.

Every expected number is copied from the spec as printed; the tolerance is half a unit of its last printed digit. All
inputs are built from the spec's logits and log-probs, so a wrong formula fails.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_tokenlevel.ops.preference import (
    aligndistil_loss_from_logits,
    cdpo_contrastive_probs,
    cdpo_contrastive_weights,
    cdpo_loss,
    implicit_token_rewards,
    mapo_zn_rescale,
    masked_sum,
    per_token_kl_from_logits,
    rto_token_rewards,
    sparsepo_loss,
    tdpo_loss,
    tgdpo_token_weights,
    treg_loss,
    treg_token_rewards,
    weighted_dpo_loss,
)

DTYPE = torch.float64
BETA = 0.1
ALPHA = 0.5


def t(values, dtype=DTYPE):
    return torch.tensor(values, dtype=dtype)


def assert_printed(actual, *printed: str):
    """`actual` (tensor or float) equals the printed numbers to half a unit of each one's last digit."""
    values = actual.detach().reshape(-1).tolist() if torch.is_tensor(actual) else [float(actual)]
    assert len(values) == len(printed), f"{len(values)} values for {len(printed)} expected numbers"
    for value, text in zip(values, printed):
        decimals = len(text.split(".")[1]) if "." in text else 0
        tolerance = 0.5 * 10.0**-decimals
        assert abs(value - float(text)) <= tolerance, f"{value!r} != {text} (tolerance {tolerance:g})"


def token_logps(logits, labels):
    return F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Toy batch of §0.2: B=1, V=3, T=2, both positions real.

CHOSEN_LABELS = [[0, 2]]
REJECTED_LABELS = [[1, 0]]
CHOSEN_POLICY = [[[1.0, 0.0, -1.0], [0.5, 0.2, 0.3]]]
CHOSEN_REF = [[[0.0, 0.0, 0.0], [0.2, 0.2, 0.6]]]
REJECTED_POLICY = [[[0.0, 1.0, 0.0], [0.3, -0.2, 0.1]]]
REJECTED_REF = [[[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]]


class Side:
    """Per-token quantities of one side of the toy batch, computed from logits (policy logits are leaves with grad)."""

    def __init__(self, policy, ref, labels, mask):
        self.policy_logits = t(policy).requires_grad_(True)
        self.ref_logits = t(ref)
        self.labels = torch.tensor(labels)
        self.mask = t(mask)
        self.logps = token_logps(self.policy_logits, self.labels)
        self.ref_logps = token_logps(self.ref_logits, self.labels)
        self.logratios = self.logps - self.ref_logps
        self.kl = per_token_kl_from_logits(self.policy_logits, self.ref_logits)


def chosen_side(mask=((1.0, 1.0),)):
    return Side(CHOSEN_POLICY, CHOSEN_REF, CHOSEN_LABELS, [list(mask[0])])


def rejected_side(mask=((1.0, 1.0),)):
    return Side(REJECTED_POLICY, REJECTED_REF, REJECTED_LABELS, [list(mask[0])])


def run_tdpo(chosen, rejected, **kwargs):
    return tdpo_loss(
        chosen.logratios, rejected.logratios, chosen.kl, rejected.kl, chosen.mask, rejected.mask, BETA, **kwargs
    )


def run_dpo(chosen, rejected):
    return weighted_dpo_loss(chosen.logratios, rejected.logratios, None, None, chosen.mask, rejected.mask, BETA)


# ---------------------------------------------------------------------------------------------------------------------
# Toy batch and plain DPO


def test_toy_batch_derived_quantities():
    chosen, rejected = chosen_side(), rejected_side()
    assert_printed(chosen.logratios, "0.691006", "-0.289407")
    assert_printed(rejected.logratios, "0.406575", "0.212673")
    assert_printed(chosen.kl, "0.308994", "0.0316617")
    assert_printed(rejected.kl, "0.0934246", "0.0206604")
    assert_printed(masked_sum(chosen.logratios, chosen.mask), "0.401600")
    assert_printed(masked_sum(rejected.logratios, rejected.mask), "0.619248")
    assert_printed(masked_sum(chosen.kl, chosen.mask), "0.340655")
    assert_printed(masked_sum(rejected.kl, rejected.mask), "0.114085")
    # Hand check of the first chosen token.
    assert_printed(chosen.logps[0, 0], "-0.407606")


def test_plain_dpo():
    chosen, rejected = chosen_side(), rejected_side()
    assert_printed(run_dpo(chosen, rejected), "0.704089")
    ones = torch.ones(1, 2, dtype=DTYPE)
    uniform = weighted_dpo_loss(chosen.logratios, rejected.logratios, ones, ones, chosen.mask, rejected.mask, BETA)
    assert_printed(uniform, "0.704089")
    assert_printed(math.log1p(math.exp(0.0217649)), "0.704089")


def test_masked_sum_ignores_junk_in_value_and_gradient():
    values = t([[1.0, float("nan"), float("inf"), 2.0]]).requires_grad_(True)
    mask = torch.tensor([[True, False, False, True]])
    total = masked_sum(values, mask)
    total.sum().backward()
    assert total.item() == 3.0
    assert values.grad.tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_weighted_dpo_junk_weights_at_padding_stay_finite():
    logratios = t([[0.5, float("nan")]]).requires_grad_(True)
    weights = t([[2.0, float("inf")]])
    mask = t([[1.0, 0.0]])
    loss = weighted_dpo_loss(logratios, logratios, weights, weights, mask, mask, BETA)
    loss.backward()
    assert_printed(loss, f"{math.log(2):.9f}")
    assert torch.isfinite(logratios.grad).all()


# ---------------------------------------------------------------------------------------------------------------------
# TDPO


def test_tdpo1_and_tdpo2():
    chosen, rejected = chosen_side(), rejected_side()
    assert_printed(run_tdpo(chosen, rejected, variant="tdpo1")[0], "0.692701")
    loss, metrics = run_tdpo(chosen, rejected)  # default variant is tdpo2 with alpha 0.5
    assert_printed(loss, "0.698379")
    assert_printed(metrics["seq_kl_chosen"], "0.340655")
    assert_printed(metrics["seq_kl_rejected"], "0.114085")
    assert abs(metrics["chosen_rewards"].item() - BETA * (0.401600 + 0.340655)) <= 1e-6
    assert abs(metrics["rejected_rewards"].item() - BETA * (0.619248 + 0.114085)) <= 1e-6
    assert not any(value.requires_grad for value in metrics.values())


def test_tdpo2_gradient_is_dpo_gradient_times_constant():
    chosen, rejected = chosen_side(), rejected_side()
    run_tdpo(chosen, rejected)[0].sum().backward()
    tdpo_grad = chosen.policy_logits.grad.clone()
    assert_printed(tdpo_grad, "-0.016825", "0.012300", "0.004525", "0.019637", "0.014547", "-0.034184")

    chosen, rejected = chosen_side(), rejected_side()
    run_dpo(chosen, rejected).sum().backward()
    ratio = tdpo_grad / chosen.policy_logits.grad
    assert_printed(ratio, *["0.994397"] * 6)


def test_tdpo1_chosen_kl_keeps_its_gradient():
    # With D_w detached the TDPO1 chosen-logit gradient would be proportional to DPO's; it is not.
    chosen, rejected = chosen_side(), rejected_side()
    run_tdpo(chosen, rejected, variant="tdpo1")[0].sum().backward()
    tdpo1_grad = chosen.policy_logits.grad.clone()
    chosen, rejected = chosen_side(), rejected_side()
    run_dpo(chosen, rejected).sum().backward()
    ratio = tdpo1_grad / chosen.policy_logits.grad
    assert (ratio.max() - ratio.min()) > 1e-3


def test_tdpo2_rejected_padding_with_junk_logits():
    chosen = chosen_side()
    rejected = Side(
        [[*REJECTED_POLICY[0], [9.0, -9.0, 3.0]]],
        [[*REJECTED_REF[0], [-4.0, 2.0, 0.0]]],
        [[*REJECTED_LABELS[0], 0]],
        [[1.0, 1.0, 0.0]],
    )
    assert_printed(run_tdpo(chosen, rejected)[0], "0.698379")


def test_tdpo2_nonfinite_junk_at_padding():
    chosen, rejected = chosen_side(), rejected_side()
    junk = t([[float("nan")]])
    rejected_logratios = torch.cat([rejected.logratios, junk], dim=1)
    rejected_kl = torch.cat([rejected.kl, t([[float("inf")]])], dim=1)
    loss, _ = tdpo_loss(
        chosen.logratios, rejected_logratios, chosen.kl, rejected_kl, chosen.mask, t([[1.0, 1.0, 0.0]]), BETA
    )
    loss.sum().backward()
    assert_printed(loss, "0.698379")
    assert torch.isfinite(rejected.policy_logits.grad).all()


def test_tdpo2_empty_rejected():
    chosen, rejected = chosen_side(), rejected_side(mask=((0.0, 0.0),))
    assert_printed(run_tdpo(chosen, rejected)[0], "0.664960")


def test_tdpo_output_is_float32_for_bf16_inputs():
    x = torch.zeros(1, 2, dtype=torch.bfloat16)
    loss, _ = tdpo_loss(x, x, x, x, torch.ones(1, 2), torch.ones(1, 2), BETA)
    assert loss.dtype == torch.float32


def test_per_token_kl_handles_zero_reference_probability():
    policy = t([[[0.0, 0.0, float("-inf")]]])
    ref = t([[[1.0, 0.0, float("-inf")]]])
    kl = per_token_kl_from_logits(policy, ref)
    p = torch.softmax(t([1.0, 0.0]), -1)
    expected = (p * (p.log() - math.log(0.5))).sum()
    assert torch.isfinite(kl).all()
    assert_printed(kl, f"{expected.item():.12f}")


# ---------------------------------------------------------------------------------------------------------------------
# SparsePO / MaPO

REWARD_MASK_CHOSEN = [[1.0, 0.0]]
REWARD_MASK_REJECTED = [[0.5, 1.0]]


def run_sparsepo(reward_chosen=REWARD_MASK_CHOSEN, reward_rejected=REWARD_MASK_REJECTED, **kwargs):
    chosen, rejected = chosen_side(), rejected_side()
    reward_chosen = reward_chosen if torch.is_tensor(reward_chosen) else t(reward_chosen)
    reward_rejected = reward_rejected if torch.is_tensor(reward_rejected) else t(reward_rejected)
    return sparsepo_loss(
        chosen.logratios,
        rejected.logratios,
        chosen.kl,
        rejected.kl,
        chosen.mask,
        rejected.mask,
        reward_chosen,
        reward_rejected,
        beta=BETA,
        **kwargs,
    )


def test_sparsepo_common_mask():
    loss, metrics = run_sparsepo()
    assert_printed(loss, "0.667647")
    assert_printed(metrics["mask_sparsity_chosen"], "0.5")
    assert_printed(metrics["mask_sparsity_rejected"], "0.0")


def test_sparsepo_common_mask_l1_is_halved():
    loss, metrics = run_sparsepo(l1_reward=0.001, l1_kl=0.001)
    assert_printed(loss, "0.670147")
    assert_printed(metrics["l1_penalty"], "0.0025")
    unhalved, _ = run_sparsepo(l1_reward=0.001, l1_kl=0.001, halve_l1_for_common_mask=False)
    assert_printed(unhalved, f"{0.667647 + 0.005:.6f}")


def test_sparsepo_independent_masks():
    loss, _ = run_sparsepo(kl_mask_chosen=t([[0.2, 0.8]]), kl_mask_rejected=t([[0.0, 0.3]]))
    assert_printed(loss, "0.675507")


def test_sparsepo_all_ones_is_tdpo1():
    loss, _ = run_sparsepo([[1.0, 1.0]], [[1.0, 1.0]])
    assert_printed(loss, "0.692701")


def test_sparsepo_learnable_mask_receives_gradient():
    reward_chosen = t(REWARD_MASK_CHOSEN).requires_grad_(True)
    reward_rejected = t(REWARD_MASK_REJECTED).requires_grad_(True)
    loss, _ = run_sparsepo(reward_chosen, reward_rejected, l1_reward=0.001)
    loss.sum().backward()
    assert reward_chosen.grad is not None and reward_chosen.grad.abs().sum() > 0
    assert reward_rejected.grad is not None and reward_rejected.grad.abs().sum() > 0


def test_sparsepo_requires_both_kl_masks():
    with pytest.raises(ValueError, match="kl_mask_rejected"):
        run_sparsepo(kl_mask_chosen=t([[0.2, 0.8]]))


def test_mapo_zn_rescale():
    activations = t([[[1, 3], [0, 2], [4, 6], [9, 9]]])
    mask = t([[1, 1, 1, 0]])
    assert_printed(mapo_zn_rescale(activations, mask), "0.25", "0.0", "1.0", "0.0")
    assert_printed(mapo_zn_rescale(activations.mean(-1), mask), "0.25", "0.0", "1.0", "0.0")


def test_mapo_degenerate_guard():
    constant = t([[[1, 3], [2, 2], [0, 4]]])
    assert_printed(mapo_zn_rescale(constant, t([[1, 1, 1]])), "1.0", "1.0", "1.0")
    assert_printed(mapo_zn_rescale(constant, t([[1, 1, 1]]), degenerate_fill=0.0), "0.0", "0.0", "0.0")
    single = mapo_zn_rescale(t([[5.0, 7.0, 2.0]]), t([[0, 1, 0]]))
    assert_printed(single, "0.0", "1.0", "0.0")


def test_mapo_empty_and_junk_rows_and_detach():
    activations = t([[float("nan"), float("inf")], [3.0, 1.0]]).requires_grad_(True)
    mask_out = mapo_zn_rescale(activations, t([[0, 0], [1, 1]]))
    assert_printed(mask_out, "0.0", "0.0", "1.0", "0.0")
    assert not mask_out.requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# TGDPO

TOKEN_REWARD_MODEL_CHOSEN = [[[0.8, 0.1, -0.5], [0.0, 0.0, 1.0]]]
TOKEN_REWARD_MODEL_REJECTED = [[[0.2, 0.9, 0.1], [-0.2, 0.1, 0.0]]]


def tgdpo_rewards(chosen, rejected):
    # r̂ = log π_g − log π_ref is the implicit reward with β = 1.
    chosen_rewards = implicit_token_rewards(
        token_logps(t(TOKEN_REWARD_MODEL_CHOSEN), chosen.labels), chosen.ref_logps, chosen.mask, 1.0
    )
    rejected_rewards = implicit_token_rewards(
        token_logps(t(TOKEN_REWARD_MODEL_REJECTED), rejected.labels), rejected.ref_logps, rejected.mask, 1.0
    )
    return chosen_rewards, rejected_rewards


def test_tgdpo():
    chosen, rejected = chosen_side(), rejected_side()
    chosen_rewards, rejected_rewards = tgdpo_rewards(chosen, rejected)
    assert_printed(chosen_rewards, "0.528132", "0.298980")
    assert_printed(rejected_rewards, "0.292288", "-0.174307")
    chosen_weights, rejected_weights = tgdpo_token_weights(chosen_rewards, rejected_rewards, ALPHA, BETA)
    assert_printed(chosen_weights, "1.026407", "1.014949")
    assert_printed(rejected_weights, "0.985386", "1.008715")
    loss = weighted_dpo_loss(
        chosen.logratios, rejected.logratios, chosen_weights, rejected_weights, chosen.mask, rejected.mask, BETA
    )
    assert_printed(loss, "0.703179")


def test_tgdpo_weights_carry_no_gradient_and_alpha_zero_is_dpo():
    chosen_rewards = t([[0.5, -0.3]]).requires_grad_(True)
    rejected_rewards = t([[0.2, 0.1]]).requires_grad_(True)
    chosen_weights, rejected_weights = tgdpo_token_weights(chosen_rewards, rejected_rewards, ALPHA, BETA)
    assert not chosen_weights.requires_grad and not rejected_weights.requires_grad

    chosen, rejected = chosen_side(), rejected_side()
    ones_w, ones_l = tgdpo_token_weights(chosen_rewards, rejected_rewards, 0.0, BETA)
    loss = weighted_dpo_loss(chosen.logratios, rejected.logratios, ones_w, ones_l, chosen.mask, rejected.mask, BETA)
    assert_printed(loss, "0.704089")


def test_tgdpo_min_weight_clamp():
    chosen_weights, rejected_weights = tgdpo_token_weights(t([[-30.0, 0.0]]), t([[30.0, 0.0]]), ALPHA, BETA)
    assert_printed(chosen_weights, "-0.5", "1.0")  # no clamp by default, as in the official code
    chosen_weights, rejected_weights = tgdpo_token_weights(
        t([[-30.0, 0.0]]), t([[30.0, 0.0]]), ALPHA, BETA, min_weight=0.0
    )
    assert_printed(chosen_weights, "0.0", "1.0")
    assert_printed(rejected_weights, "0.0", "1.0")


# ---------------------------------------------------------------------------------------------------------------------
# T-REG


def treg_rewards(chosen, rejected):
    chosen_rewards = treg_token_rewards(t([[-0.5, -1.0]]), t([[-1.5, -0.8]]), chosen.mask)
    rejected_rewards = treg_token_rewards(t([[-2.0, -0.7]]), t([[-0.6, -0.9]]), rejected.mask)
    return chosen_rewards, rejected_rewards


def run_treg(chosen, rejected, chosen_rewards=None, rejected_rewards=None, **kwargs):
    if chosen_rewards is None:
        chosen_rewards, rejected_rewards = treg_rewards(chosen, rejected)
    return treg_loss(
        chosen.logratios,
        rejected.logratios,
        chosen_rewards,
        rejected_rewards,
        chosen.mask,
        rejected.mask,
        BETA,
        ALPHA,
        **kwargs,
    )


def test_treg_token_rewards():
    chosen_rewards, rejected_rewards = treg_rewards(chosen_side(), rejected_side())
    assert_printed(chosen_rewards, "0.231059", "-0.049834")
    assert_printed(rejected_rewards, "-0.302184", "0.049834")


def test_treg_logratio_form():
    loss, metrics = run_treg(chosen_side(), rejected_side())
    assert_printed(loss, "0.702526")
    assert_printed(metrics["dpo"], "0.704089")
    assert_printed(metrics["pair_weight"], "0.505441")
    assert_printed(metrics["reg_chosen"], "-0.0174085")
    assert_printed(metrics["reg_rejected"], "0.0112262")
    assert_printed(metrics["reg_chosen"] + metrics["reg_rejected"], "-0.00618230")


def test_treg_logprob_form():
    chosen, rejected = chosen_side(), rejected_side()
    loss, metrics = run_treg(
        chosen, rejected, reg_form="logprob", chosen_logps=chosen.logps, rejected_logps=rejected.logps
    )
    assert_printed(loss, "0.701938")
    assert_printed(metrics["reg_chosen"], "0.00373785")
    assert_printed(metrics["reg_rejected"], "-0.0122488")


def test_treg_logprob_form_needs_logps():
    with pytest.raises(ValueError, match="chosen_logps and rejected_logps"):
        run_treg(chosen_side(), rejected_side(), reg_form="logprob")


def test_treg_zero_rewards_is_dpo():
    zeros = torch.zeros(1, 2, dtype=DTYPE)
    loss, _ = run_treg(chosen_side(), rejected_side(), zeros, zeros)
    assert_printed(loss, "0.704089")


def test_treg_mean_reduction():
    loss, metrics = run_treg(chosen_side(), rejected_side(), reg_reduction="mean")
    assert abs(metrics["reg_chosen"].item() - (-0.0174085 / 2)) <= 1e-7
    assert abs(metrics["reg_rejected"].item() - 0.0112262 / 2) <= 1e-7
    expected = 0.704089 + ALPHA * 0.505441 * (-0.00618230 / 2)
    assert abs(loss.item() - expected) <= 1e-6

    # A padded chosen position with junk changes neither the token count nor the value.
    chosen, rejected = chosen_side(), rejected_side()
    chosen_rewards, rejected_rewards = treg_rewards(chosen, rejected)
    pad = t([[float("nan")]])
    padded, _ = treg_loss(
        torch.cat([chosen.logratios, pad], dim=1),
        rejected.logratios,
        torch.cat([chosen_rewards, pad], dim=1),
        rejected_rewards,
        t([[1.0, 1.0, 0.0]]),
        rejected.mask,
        BETA,
        ALPHA,
        reg_reduction="mean",
    )
    assert abs(padded.item() - loss.item()) <= 1e-12


def test_treg_pair_weight_is_detached():
    # With w = sg(σ(R_l − R_w)): ∂L/∂Δ_w,t = −β·w − α·w·β·r̂_w,t exactly. A differentiable w adds ≈ 8e-5.
    chosen, rejected = chosen_side(), rejected_side()
    chosen_logratios = chosen.logratios.detach().requires_grad_(True)
    chosen_rewards, rejected_rewards = treg_rewards(chosen, rejected)
    loss, metrics = treg_loss(
        chosen_logratios, rejected.logratios, chosen_rewards, rejected_rewards, chosen.mask, rejected.mask, BETA, ALPHA
    )
    loss.sum().backward()
    w = 0.505441
    expected = [-BETA * w - ALPHA * w * BETA * r for r in (0.231059, -0.049834)]
    assert_printed(chosen_logratios.grad, *(f"{e:.7f}" for e in expected))
    assert not metrics["pair_weight"].requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# cDPO

CE_CHOSEN_POS = [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]
CE_CHOSEN_NEG = [[[0.0, 0.0, 0.0], [0.0, 0.5, 0.5]]]
CE_REJECTED_POS = [[[0.0, 0.2, 0.0], [1.0, 0.0, 0.0]]]
CE_REJECTED_NEG = [[[0.0, 1.5, 0.0], [0.5, 0.0, 0.0]]]
EOS_AT_END = [[0.0, 1.0]]


def cdpo_weights(chosen, rejected, only_neg=True, eos=False):
    chosen_probs = cdpo_contrastive_probs(t(CE_CHOSEN_POS), t(CE_CHOSEN_NEG), chosen.labels, chosen.mask)
    rejected_probs = cdpo_contrastive_probs(t(CE_REJECTED_POS), t(CE_REJECTED_NEG), rejected.labels, rejected.mask)
    eos_mask = t(EOS_AT_END) if eos else None
    return cdpo_contrastive_weights(
        chosen_probs,
        rejected_probs,
        chosen.mask,
        rejected.mask,
        only_neg,
        chosen_eos_mask=eos_mask,
        rejected_eos_mask=eos_mask,
    )


def run_cdpo(aggregation, only_neg=True, eos=False):
    chosen, rejected = chosen_side(), rejected_side()
    chosen_weights, rejected_weights = cdpo_weights(chosen, rejected, only_neg, eos)
    return cdpo_loss(
        chosen.logratios,
        rejected.logratios,
        chosen_weights,
        rejected_weights,
        chosen.mask,
        rejected.mask,
        BETA,
        aggregation=aggregation,
    )


def test_cdpo_contrastive_probs_and_weights():
    chosen, rejected = chosen_side(), rejected_side()
    assert_printed(
        cdpo_contrastive_probs(t(CE_CHOSEN_POS), t(CE_CHOSEN_NEG), chosen.labels, chosen.mask), "0.786986", "0.736125"
    )
    assert_printed(
        cdpo_contrastive_probs(t(CE_REJECTED_POS), t(CE_REJECTED_NEG), rejected.labels, rejected.mask),
        "0.142687",
        "0.691438",
    )
    chosen_weights, rejected_weights = cdpo_weights(chosen, rejected)
    assert_printed(chosen_weights, "1.0", "1.0")
    assert_printed(rejected_weights, "0.857313", "0.308562")
    chosen_weights, rejected_weights = cdpo_weights(chosen, rejected, only_neg=False, eos=True)
    assert_printed(chosen_weights, "0.786986", "1.0")
    assert_printed(rejected_weights, "0.857313", "1.0")


def test_cdpo_weights_carry_no_gradient_and_ignore_padding_labels():
    positive = t(CE_CHOSEN_POS).requires_grad_(True)
    labels = torch.tensor([[0, -100]])
    probs = cdpo_contrastive_probs(positive, t(CE_CHOSEN_NEG), labels, t([[1.0, 0.0]]))
    assert not probs.requires_grad
    assert_printed(probs, "0.786986", "0.0")


@pytest.mark.parametrize(
    "aggregation, only_neg, eos, expected",
    [
        ("sequence", True, False, "0.693777"),
        ("sequence", False, False, "0.697326"),
        ("per_token", True, False, "0.693614"),
        ("per_token", False, False, "0.695305"),
        ("sequence", True, True, "0.701161"),
        ("sequence", False, True, "0.708606"),
        ("per_token", True, True, "0.697369"),
        ("per_token", False, True, "0.700999"),
    ],
)
def test_cdpo_worked_examples(aggregation, only_neg, eos, expected):
    assert_printed(run_cdpo(aggregation, only_neg, eos), expected)


def test_cdpo_default_aggregation_is_sequence():
    chosen, rejected = chosen_side(), rejected_side()
    chosen_weights, rejected_weights = cdpo_weights(chosen, rejected)
    loss = cdpo_loss(
        chosen.logratios, rejected.logratios, chosen_weights, rejected_weights, chosen.mask, rejected.mask, BETA
    )
    assert_printed(loss, "0.693777")


def with_prompt_position(tensor, fill):
    return torch.cat([torch.full((1, 1), fill, dtype=DTYPE), tensor], dim=1)


def run_cdpo_with_prompt_position(aggregation):
    chosen, rejected = chosen_side(), rejected_side()
    chosen_weights, rejected_weights = cdpo_weights(chosen, rejected)
    mask = t([[0.0, 1.0, 1.0]])
    # The prompt position holds junk: it is masked, so each side's term there is exactly 0.
    return cdpo_loss(
        with_prompt_position(chosen.logratios, float("nan")),
        with_prompt_position(rejected.logratios, float("inf")),
        with_prompt_position(chosen_weights, 5.0),
        with_prompt_position(rejected_weights, float("nan")),
        mask,
        mask,
        BETA,
        aggregation=aggregation,
    )


def test_cdpo_per_token_with_prompt_position():
    assert_printed(run_cdpo_with_prompt_position("per_token"), "0.693458")
    # Sequence DPO and the completion-only token mean ignore the prompt position.
    assert_printed(run_cdpo_with_prompt_position("sequence"), "0.693777")
    assert_printed(run_cdpo_with_prompt_position("per_token_completion"), "0.693614")


def test_cdpo_per_token_completion_mean_is_batch_wide():
    logratios = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    zeros = torch.zeros_like(logratios)
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss = cdpo_loss(logratios, zeros, torch.ones_like(logratios), zeros, mask, mask, 1.0, "per_token_completion")
    expected = -F.logsigmoid(t([1.0, 2.0, 3.0, 4.0])).mean()
    assert abs(loss.mean().item() - expected.item()) < 1e-12


def test_cdpo_unknown_aggregation():
    with pytest.raises(ValueError, match="'sequence', 'per_token', 'per_token_completion'"):
        run_cdpo("mean")


# ---------------------------------------------------------------------------------------------------------------------
# AlignDistil

STUDENT = [[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]
DPO_TEACHER = [[[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]]
REVERSE_TEACHER = [[[0.0, 0.5, 0.0], [0.0, 1.0, 0.2]]]


def run_aligndistil(mask=((1.0, 1.0),), student=None, **kwargs):
    student = t(STUDENT) if student is None else student
    return aligndistil_loss_from_logits(student, t(DPO_TEACHER), t(REVERSE_TEACHER), t(mask), **kwargs)


def test_aligndistil_default_mode():
    loss, metrics = run_aligndistil()
    assert_printed(loss, "0.0835573")
    assert_printed(metrics["omega"], "7.824447", "0.707435")
    assert_printed(metrics["token_coef"], "0.0127805", "0.141356")
    assert_printed(metrics["token_kl"], "9.029912", "0.365802")
    # TVD = (ω − 1e-3)/β₂
    assert_printed((metrics["omega"] - 1e-3) / 10, "0.782345", "0.0706435")
    unnormalised, _ = run_aligndistil(len_norm=False)
    assert_printed(unnormalised, "0.167115")


def test_aligndistil_padding_with_junk_logits():
    # Length normalisation divides by the completion tokens only; junk logits at padding change nothing.
    junk = t([[[float("nan"), float("inf"), 2.0]]])
    student = torch.cat([t(STUDENT), junk], dim=1).requires_grad_(True)
    dpo = torch.cat([t(DPO_TEACHER), junk], dim=1)
    reverse = torch.cat([t(REVERSE_TEACHER), junk], dim=1)
    loss, metrics = aligndistil_loss_from_logits(student, dpo, reverse, t([[1.0, 1.0, 0.0]]))
    loss.sum().backward()
    assert_printed(loss, "0.0835573")
    assert_printed(metrics["omega"], "7.824447", "0.707435", "0.0")
    assert torch.isfinite(student.grad).all()


def test_aligndistil_theorem_modes():
    loss, metrics = run_aligndistil(mode="theorem1", ref_logits=t(REVERSE_TEACHER))
    assert_printed(metrics["token_kl"], "0.0285357", "0.367574")
    assert_printed(loss, "1.980546")
    loss, metrics = run_aligndistil(mode="theorem1_contrast")
    assert_printed(metrics["token_kl"], "0.315219", "0.364176")
    assert_printed(loss, "3.396975")


def test_aligndistil_theorem1_adaptive():
    """Adaptive ω (as in the default mode) with linear interpolation z* = ω·z^d + (1 − ω)·z^r, coefficient β/ω (no
    spec digits: ours, from the spec's toy logits). t = 1: ω = 7.824447, z* = [7.824447, −3.412223, −7.824447], and the
    uniform student gives KL = −log 3 − mean(log π*) = 7.863256."""
    loss, metrics = run_aligndistil(mode="theorem1_adaptive")
    assert_printed(metrics["omega"], "7.824447", "0.707435")
    assert_printed(metrics["token_coef"], "0.0127805", "0.141356")
    assert_printed(metrics["token_kl"], "7.863256", "0.364464")
    assert_printed(loss, "0.0760076")
    z_star = 7.824447 * t(DPO_TEACHER)[0, 0] + (1 - 7.824447) * t(REVERSE_TEACHER)[0, 0]
    assert_printed(-math.log(3) - torch.log_softmax(z_star, -1).mean(), "7.863256")
    unnormalised, _ = run_aligndistil(mode="theorem1_adaptive", len_norm=False)
    assert_printed(unnormalised, "0.152015")


def test_aligndistil_empty_sequence_is_zero():
    loss, _ = run_aligndistil(mask=((0.0, 0.0),))
    assert_printed(loss, "0.0")


def test_aligndistil_gradient_reaches_student_only():
    student = t(STUDENT).requires_grad_(True)
    dpo = t(DPO_TEACHER).requires_grad_(True)
    reverse = t(REVERSE_TEACHER).requires_grad_(True)
    loss, _ = aligndistil_loss_from_logits(student, dpo, reverse, t([[1.0, 1.0]]))
    loss.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert dpo.grad is None and reverse.grad is None


def test_aligndistil_argument_validation():
    with pytest.raises(ValueError, match="ref_logits"):
        run_aligndistil(mode="theorem1")
    with pytest.raises(ValueError, match="'aligndistil', 'theorem1', 'theorem1_contrast'"):
        run_aligndistil(mode="theorem2")


# ---------------------------------------------------------------------------------------------------------------------
# RTO

LOGP_DPO = [[-0.5, -1.0, -2.0]]
LOGP_SFT = [[-2.0, -1.0, -1.0]]
LOGP_OLD = [[-0.8, -1.2, -1.5]]


def test_rto_token_rewards():
    mask = t([[1.0, 1.0, 1.0]])
    rewards = rto_token_rewards(t(LOGP_DPO), t(LOGP_SFT), t(LOGP_OLD), mask, t([2.5]))
    assert_printed(rewards, "0.038", "0.002", "2.455")
    no_clip = rto_token_rewards(t(LOGP_DPO), t(LOGP_SFT), t(LOGP_OLD), mask, t([2.5]), dpo_reward_clip=0.0)
    assert_printed(no_clip, "0.063", "0.002", "2.455")
    clamped = rto_token_rewards(
        t(LOGP_DPO), t(LOGP_SFT), t(LOGP_OLD), mask, t([20.0]), dpo_reward_scale=1.0, dpo_reward_clip=0.0
    )
    assert_printed(clamped, "1.488", "0.002", "9.005")


def test_rto_last_token_with_left_and_right_padding():
    junk = float("nan")
    logp_dpo = t([[-0.5, -1.0, -2.0, junk], [junk, -0.5, -1.0, -2.0]])
    logp_sft = t([[-2.0, -1.0, -1.0, junk], [junk, -2.0, -1.0, -1.0]])
    logp_old = t([[-0.8, -1.2, -1.5, junk], [junk, -0.8, -1.2, -1.5]])
    mask = t([[1, 1, 1, 0], [0, 1, 1, 1]])
    rewards = rto_token_rewards(logp_dpo, logp_sft, logp_old, mask, t([2.5, 2.5]))
    assert_printed(rewards, "0.038", "0.002", "2.455", "0.0", "0.0", "0.038", "0.002", "2.455")


def test_rto_empty_row_is_all_zero():
    zeros = torch.zeros(1, 3, dtype=DTYPE)
    rewards = rto_token_rewards(zeros, zeros, zeros, zeros, 5.0)
    assert_printed(rewards, "0.0", "0.0", "0.0")


# ---------------------------------------------------------------------------------------------------------------------
# r -> Q*


def test_implicit_token_rewards():
    chosen = chosen_side()
    rewards = implicit_token_rewards(chosen.logps, chosen.ref_logps, chosen.mask, BETA)
    assert_printed(rewards, "0.0691006", "-0.0289407")
    assert_printed(rewards.sum(), "0.0401600")
    assert_printed(chosen.logps.sum(), "-1.547437")
    assert_printed(chosen.ref_logps.sum(), "-1.949037")
    assert_printed(rewards.sum() / BETA + chosen.ref_logps.sum(), "-1.547437")
    padded = implicit_token_rewards(t([[1.0, float("nan")]]), t([[0.5, float("inf")]]), t([[1.0, 0.0]]), BETA)
    assert_printed(padded, "0.05", "0.0")


# ---------------------------------------------------------------------------------------------------------------------
# Argument validation and all-masked batches


def test_unknown_choices_name_the_valid_values():
    chosen, rejected = chosen_side(), rejected_side()
    with pytest.raises(ValueError, match="'tdpo1', 'tdpo2'"):
        run_tdpo(chosen, rejected, variant="tdpo3")
    with pytest.raises(ValueError, match="'logratio', 'logprob'"):
        run_treg(chosen, rejected, reg_form="ratio")
    with pytest.raises(ValueError, match="'sum', 'mean'"):
        run_treg(chosen, rejected, reg_reduction="max")


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="same shape"):
        masked_sum(torch.zeros(2, 3), torch.ones(2, 4))


def all_masked_losses(junk, zero_mask):
    """Every loss on a batch where all positions are masked and hold junk; returns the losses."""
    vocab_junk = junk.unsqueeze(-1).expand(*junk.shape, 3)
    losses = [
        weighted_dpo_loss(junk, junk, junk, junk, zero_mask, zero_mask, BETA),
        tdpo_loss(junk, junk, junk, junk, zero_mask, zero_mask, BETA, variant="tdpo1")[0],
        tdpo_loss(junk, junk, junk, junk, zero_mask, zero_mask, BETA)[0],
        sparsepo_loss(junk, junk, junk, junk, zero_mask, zero_mask, junk, junk, l1_reward=0.1, l1_kl=0.1)[0],
        treg_loss(junk, junk, junk, junk, zero_mask, zero_mask, BETA, ALPHA)[0],
        treg_loss(junk, junk, junk, junk, zero_mask, zero_mask, BETA, ALPHA, "logprob", "mean", junk, junk)[0],
        aligndistil_loss_from_logits(vocab_junk, vocab_junk, vocab_junk, zero_mask)[0],
        aligndistil_loss_from_logits(vocab_junk, vocab_junk, vocab_junk, zero_mask, len_norm=False)[0],
    ]
    losses += [
        cdpo_loss(junk, junk, junk, junk, zero_mask, zero_mask, BETA, aggregation)
        for aggregation in ("sequence", "per_token", "per_token_completion")
    ]
    return losses


def test_all_masked_inputs_give_finite_losses_and_gradients():
    junk = t([[float("nan"), float("inf")], [float("-inf"), 1.0]]).requires_grad_(True)
    zero_mask = torch.zeros(2, 2, dtype=torch.bool)
    losses = all_masked_losses(junk, zero_mask)
    total = sum(loss.mean() for loss in losses)
    total.backward()
    assert all(torch.isfinite(loss).all() for loss in losses)
    assert torch.isfinite(junk.grad).all()
    # The sigmoid losses are exactly log 2 with nothing to compare; the distillation loss is 0.
    assert_printed(losses[0], *[f"{math.log(2):.9f}"] * 2)
    assert_printed(losses[6], "0.0", "0.0")
    assert_printed(mapo_zn_rescale(junk, zero_mask), "0.0", "0.0", "0.0", "0.0")
    assert_printed(implicit_token_rewards(junk, junk, zero_mask, BETA), "0.0", "0.0", "0.0", "0.0")
    assert_printed(rto_token_rewards(junk, junk, junk, zero_mask, 1.0), "0.0", "0.0", "0.0", "0.0")
