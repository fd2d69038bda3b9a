"""Token-level preference losses and token signals (spec: `shared/specs/preference.md`).

Conventions shared by every function here:

- Per-token tensors are `(B, T)` and already aligned to the token they score (after the causal shift): position `t`
  holds the quantity for token `y_t`, computed from the logits that predict it.
- Masks are `(B, T)`, bool or 0/1 float. Padding and prompt positions may hold junk (even inf/NaN): they are removed
  with `torch.where` before any arithmetic, so they contribute exactly 0 to values *and* gradients.
- Losses return one value per pair, shape `(B,)`; the trainer takes the batch mean. Auxiliary dicts hold detached
  per-pair tensors for logging.
- Sigmoids and log-softmaxes run in float32 at least (float64 inputs stay float64), so results of a bf16 forward
  come back in float32.

Notation: `Δ_t = log π_θ(y_t|s_t) − log π_ref(y_t|s_t)` (per-token log-ratio), `KL_t = KL(π_ref(·|s_t) ‖ π_θ(·|s_t))`,
`m_t` the completion mask, `w` / `l` chosen / rejected, `sg` stop-gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# AlignDistil: floor of the extrapolation weight, so that the loss coefficient β/ω_t stays finite.
_ALIGNDISTIL_OMEGA_FLOOR = 1e-3

TDPO_VARIANTS = ("tdpo1", "tdpo2")
TREG_REG_FORMS = ("logratio", "logprob")
TREG_REG_REDUCTIONS = ("sum", "mean")
CDPO_AGGREGATIONS = ("sequence", "per_token", "per_token_completion")
ALIGNDISTIL_MODES = ("aligndistil", "theorem1", "theorem1_contrast", "theorem1_adaptive")


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name}={value!r}; valid values are {', '.join(repr(c) for c in choices)}.")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"Per-token tensors must have the same shape, got {shapes}.")


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _upcast(x: Tensor) -> Tensor:
    """float32 at least: sums of bf16 log-ratios and bf16 sigmoids lose the precision the margins need."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _zero_pad(values: Tensor, mask: Tensor) -> Tensor:
    """`values` where `mask`, else exactly 0. Unlike `values * mask`, junk inf/NaN at padding cannot leak into the value
    or (since `where` routes a zero gradient to the unselected branch) into the gradient."""
    return torch.where(_as_bool(mask), values, 0.0)


def _last_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the last mask-1 position of each row (works for left and right padding) and whether the row has one."""
    mask = _as_bool(mask)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=-1)
    return last.clamp(min=0), last >= 0


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of `values` over the last axis where `mask` is set: `(B, T) -> (B,)`.

    NaN-safe: masked positions may hold inf/NaN and contribute exactly 0 to the sum and its gradient.
    """
    _check_same_shape(values=values, mask=mask)
    return _zero_pad(values, mask).sum(dim=-1)


def _weighted_logratio_sum(logratios: Tensor, weights: Tensor | None, mask: Tensor) -> Tensor:
    """Σ_t m_t a_t Δ_t, with both factors zeroed at padding *before* the product (junk · 0 would be NaN otherwise)."""
    logratios = _zero_pad(_upcast(logratios), mask)
    if weights is None:
        return logratios.sum(dim=-1)
    _check_same_shape(logratios=logratios, weights=weights)
    return (logratios * _zero_pad(_upcast(weights), mask)).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Token-weighted DPO (shared by TGDPO and cDPO)


def weighted_dpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_weights: Tensor | None,
    rejected_weights: Tensor | None,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float,
) -> Tensor:
    r"""Token-weighted DPO sigmoid loss, per pair.

    DPO (https://huggingface.co/papers/2305.18290) with a weight on every token's log-ratio:

        L = −log σ( β·[ Σ_t m^w_t a^w_t Δ_t(y_w) − Σ_t m^l_t a^l_t Δ_t(y_l) ] )

    Uniform weights (or `None`, meaning all ones) give exactly the plain DPO loss. The weights are used as given: they
    are *not* detached here, so the caller passes constants (TGDPO, cDPO) or deliberately differentiable weights.

    Args:
        chosen_logratios, rejected_logratios: `(B, T)` per-token Δ.
        chosen_weights, rejected_weights: `(B, T)` token weights a^w, a^l, or `None` for all ones.
        chosen_mask, rejected_mask: `(B, T)` completion masks.
        beta: DPO β.

    Returns:
        `(B,)` per-pair loss. An empty completion contributes 0 to its side's sum.
    """
    _check_same_shape(chosen_logratios=chosen_logratios, chosen_mask=chosen_mask)
    _check_same_shape(rejected_logratios=rejected_logratios, rejected_mask=rejected_mask)
    margin = _weighted_logratio_sum(chosen_logratios, chosen_weights, chosen_mask) - _weighted_logratio_sum(
        rejected_logratios, rejected_weights, rejected_mask
    )
    return -F.logsigmoid(beta * margin)


# ---------------------------------------------------------------------------------------------------------------------
# r -> Q*: implicit token rewards


def implicit_token_rewards(policy_logps: Tensor, ref_logps: Tensor, mask: Tensor, beta: float) -> Tensor:
    r"""Per-token implicit DPO reward, "From r to Q*" (https://huggingface.co/papers/2404.12358).

        r̂_t = β·[log π_θ(y_t|s_t) − log π_ref(y_t|s_t)]      on completion tokens, 0 elsewhere

    `Σ_t r̂_t` is the DPO implicit sequence reward, and `log π_θ(y) = Σ_t r̂_t/β + log π_ref(y)`. The rewards depend on
    β and on the exact reference the DPO model was trained against. TGDPO's token reward is this with β = 1 and the
    token-reward model as the policy. Gradients are not cut: wrap the call in `torch.no_grad()` for a frozen reward.

    Returns:
        `(B, T)` rewards, exactly 0 at masked positions.
    """
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, mask=mask)
    return _zero_pad(beta * (_upcast(policy_logps) - _upcast(ref_logps)), mask)


# ---------------------------------------------------------------------------------------------------------------------
# TDPO


def _kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p (log p − log q) over the last axis; slots where p = 0 contribute 0 rather than 0·(−inf)."""
    terms = p_logp.exp() * (p_logp - q_logp)
    return torch.where(p_logp > float("-inf"), terms, 0.0).sum(dim=-1)


def per_token_kl_from_logits(policy_logits: Tensor, ref_logits: Tensor) -> Tensor:
    r"""Naive full-vocabulary KL(π_ref ‖ π_θ) at every position: `(B, T, V) -> (B, T)`. Reference for tests/benchmarks.

        KL_t = Σ_v π_ref(v|s_t)·[log π_ref(v|s_t) − log π_θ(v|s_t)]

    Computed in float32 at least with `log_softmax` (never `log(softmax)`). Vocabulary slots where π_ref = 0 (e.g. −inf
    logits in a padded vocabulary) contribute 0 instead of `0·(−inf) = NaN`. The result is not masked: the loss masks
    it. Training code uses a chunked kernel instead of materialising these logits.
    """
    _check_same_shape(policy_logits=policy_logits, ref_logits=ref_logits)
    return _kl(F.log_softmax(_upcast(ref_logits), dim=-1), F.log_softmax(_upcast(policy_logits), dim=-1))


def tdpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_kl: Tensor,
    rejected_kl: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float,
    alpha: float = 0.5,
    variant: str = "tdpo2",
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""TDPO, Token-level Direct Preference Optimization (Zeng et al., https://huggingface.co/papers/2404.11999).

    DPO margin corrected by the difference of sequential forward KLs (ref ‖ θ):

        u   = Σ_t m^w_t Δ_t(y_w) − Σ_t m^l_t Δ_t(y_l)
        D_w = Σ_t m^w_t KL_t(y_w),   D_l = Σ_t m^l_t KL_t(y_l)
        TDPO1: L = −log σ( β·[u − (D_l − D_w)] )
        TDPO2: L = −log σ( β·[u − α·(D_l − sg(D_w))] )

    Defaults: β = 0.1 (caller), α = 0.5, `variant="tdpo2"` (the official function's default; α is unused by TDPO1).
    Token terms are summed without length normalisation. In TDPO2 only D_w is detached and only inside the loss, so the
    chosen-side gradient is the DPO gradient times σ(−βz_TDPO2)/σ(−βu). Padding contributes exactly 0; an empty
    completion has Δ = D = 0 on that side.

    Args:
        chosen_kl, rejected_kl: `(B, T)` per-token KL(π_ref ‖ π_θ) with gradient to the policy (see
            `per_token_kl_from_logits` for the definition).

    Returns:
        `(B,)` per-pair loss and a dict of detached per-pair metrics: `seq_kl_chosen` (D_w), `seq_kl_rejected` (D_l) and
        the logged rewards `chosen_rewards` = β(ΣΔ_w + D_w), `rejected_rewards` = β(ΣΔ_l + D_l).
    """
    _check_choice("variant", variant, TDPO_VARIANTS)
    _check_same_shape(chosen_logratios=chosen_logratios, chosen_kl=chosen_kl, chosen_mask=chosen_mask)
    _check_same_shape(rejected_logratios=rejected_logratios, rejected_kl=rejected_kl, rejected_mask=rejected_mask)
    chosen_sum = masked_sum(_upcast(chosen_logratios), chosen_mask)
    rejected_sum = masked_sum(_upcast(rejected_logratios), rejected_mask)
    seq_kl_chosen = masked_sum(_upcast(chosen_kl), chosen_mask)
    seq_kl_rejected = masked_sum(_upcast(rejected_kl), rejected_mask)

    margin = chosen_sum - rejected_sum
    if variant == "tdpo1":
        logits = margin - (seq_kl_rejected - seq_kl_chosen)
    else:
        # Stop-gradient on D_w: the policy is pushed mainly to reduce the KL on rejected responses.
        logits = margin - alpha * (seq_kl_rejected - seq_kl_chosen.detach())
    loss = -F.logsigmoid(beta * logits)

    metrics = {
        "seq_kl_chosen": seq_kl_chosen.detach(),
        "seq_kl_rejected": seq_kl_rejected.detach(),
        "chosen_rewards": (beta * (chosen_sum + seq_kl_chosen)).detach(),
        "rejected_rewards": (beta * (rejected_sum + seq_kl_rejected)).detach(),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------------
# SparsePO / MaPO


def sparsepo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_kl: Tensor,
    rejected_kl: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    reward_mask_chosen: Tensor,
    reward_mask_rejected: Tensor,
    kl_mask_chosen: Tensor | None = None,
    kl_mask_rejected: Tensor | None = None,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    halve_l1_for_common_mask: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""SparsePO / MaPO: TDPO1 with per-token masks on the reward and KL terms (Christopoulou et al.,
    https://huggingface.co/papers/2410.05102).

        u' = Σ_t m^u_{w,t} Δ_t(y_w) − Σ_t m^u_{l,t} Δ_t(y_l)
        d' = Σ_t m^d_{l,t} KL_t(y_l) − Σ_t m^d_{w,t} KL_t(y_w)
        L  = −log σ(β·(u' − d')) + λ_u·(‖m^u_w ⊙ m^w‖₁ + ‖m^u_l ⊙ m^l‖₁) + λ_d·(‖m^d_w ⊙ m^w‖₁ + ‖m^d_l ⊙ m^l‖₁)

    Token masks m^u, m^d are ≥ 0 and not capped at 1. `kl_mask_*=None` selects the *common* mask (m^d = m^u); then, as
    in the official code, λ_u and λ_d are halved so the shared mask's L1 is not counted twice
    (`halve_l1_for_common_mask=True`). No stop-gradient anywhere: a learnable SparsePO mask gets gradient through u' and
    d'; a MaPO mask must be passed detached. All-ones masks give TDPO1 exactly. Defaults: β = 0.1, λ_u = λ_d = 0.

    The L1 term is per pair (norms over that pair's completion tokens), so the trainer's batch mean averages it too.

    Returns:
        `(B,)` per-pair loss and detached per-pair metrics: `preference_loss` (the −log σ part), `l1_penalty`,
        `seq_kl_chosen` / `seq_kl_rejected` (unmasked D_w, D_l), and `mask_sparsity_chosen` / `mask_sparsity_rejected`
        (fraction of completion tokens whose reward mask is exactly 0; a collapsed mask gives 1.0 and a loss of log 2).
    """
    common = kl_mask_chosen is None and kl_mask_rejected is None
    if (kl_mask_chosen is None) != (kl_mask_rejected is None):
        raise ValueError("Pass both kl_mask_chosen and kl_mask_rejected (independent masks) or neither (common mask).")
    if common:
        kl_mask_chosen, kl_mask_rejected = reward_mask_chosen, reward_mask_rejected
    _check_same_shape(
        chosen_logratios=chosen_logratios,
        chosen_kl=chosen_kl,
        chosen_mask=chosen_mask,
        reward_mask_chosen=reward_mask_chosen,
        kl_mask_chosen=kl_mask_chosen,
    )
    _check_same_shape(
        rejected_logratios=rejected_logratios,
        rejected_kl=rejected_kl,
        rejected_mask=rejected_mask,
        reward_mask_rejected=reward_mask_rejected,
        kl_mask_rejected=kl_mask_rejected,
    )

    reward_margin = _weighted_logratio_sum(chosen_logratios, reward_mask_chosen, chosen_mask) - _weighted_logratio_sum(
        rejected_logratios, reward_mask_rejected, rejected_mask
    )
    kl_margin = _weighted_logratio_sum(rejected_kl, kl_mask_rejected, rejected_mask) - _weighted_logratio_sum(
        chosen_kl, kl_mask_chosen, chosen_mask
    )
    preference_loss = -F.logsigmoid(beta * (reward_margin - kl_margin))

    if common and halve_l1_for_common_mask:
        l1_reward, l1_kl = l1_reward / 2, l1_kl / 2

    def l1(mask_chosen: Tensor, mask_rejected: Tensor) -> Tensor:
        chosen_l1 = masked_sum(_upcast(mask_chosen).abs(), chosen_mask)
        return chosen_l1 + masked_sum(_upcast(mask_rejected).abs(), rejected_mask)

    l1_penalty = l1_reward * l1(reward_mask_chosen, reward_mask_rejected) + l1_kl * l1(kl_mask_chosen, kl_mask_rejected)

    def sparsity(token_mask: Tensor, completion_mask: Tensor) -> Tensor:
        zeros = masked_sum((token_mask == 0).to(preference_loss.dtype), completion_mask)
        return zeros / _as_bool(completion_mask).sum(dim=-1).clamp(min=1)

    metrics = {
        "preference_loss": preference_loss.detach(),
        "l1_penalty": l1_penalty.detach(),
        "seq_kl_chosen": masked_sum(_upcast(chosen_kl), chosen_mask).detach(),
        "seq_kl_rejected": masked_sum(_upcast(rejected_kl), rejected_mask).detach(),
        "mask_sparsity_chosen": sparsity(reward_mask_chosen.detach(), chosen_mask),
        "mask_sparsity_rejected": sparsity(reward_mask_rejected.detach(), rejected_mask),
    }
    return preference_loss + l1_penalty, metrics


def mapo_zn_rescale(activation_mean: Tensor, mask: Tensor, degenerate_fill: float = 1.0) -> Tensor:
    r"""MaPO `zn_rescale` activation mapping (https://huggingface.co/papers/2410.05102): one hooked reference activation
    to a token mask in [0, 1].

        a_t = mean_h A_{t,h}                                   (skipped if `activation_mean` is already (B, T))
        z_t = (a_t − mean(a)) / (std(a) + 1e-12)               (mean, unbiased std over the completion tokens)
        m_t = (z_t − min z) / (max z − min z)  on completion tokens, 0 elsewhere

    The z-normalisation is an increasing affine map of each sequence, which the min–max rescale cancels exactly, so it
    is skipped: m_t = (a_t − min a) / (max a − min a) (differences with the official ε = 1e-12 are below float
    precision). Statistics run in float32 at least (the official code uses fp16). A sequence with fewer than 2
    completion tokens or constant activations (max = min) is NaN in the official code; here its completion tokens get
    `degenerate_fill` (default 1.0: keep every token). The caller averages the masks of several hooks. The result is
    detached, as MaPO's mask is a fixed function of the reference model.

    Args:
        activation_mean: `(B, T)` per-token hidden mean, or `(B, T, H)` activations (averaged over H here).
        mask: `(B, T)` completion mask.

    Returns:
        `(B, T)` mask, exactly 0 outside the completion.
    """
    values = _upcast(activation_mean.detach())
    if values.dim() == 3:
        values = values.mean(dim=-1)
    _check_same_shape(activation_mean=values, mask=mask)
    mask = _as_bool(mask)
    low = torch.where(mask, values, float("inf")).amin(dim=-1, keepdim=True)
    high = torch.where(mask, values, float("-inf")).amax(dim=-1, keepdim=True)
    spread = high - low
    # Covers constant rows, single-token rows (spread 0) and empty rows (spread NaN): no finite rescale exists.
    degenerate = ~(spread > 0)
    rescaled = (values - low) / torch.where(degenerate, 1.0, spread)
    rescaled = torch.where(degenerate, degenerate_fill, rescaled)
    return _zero_pad(rescaled, mask)


# ---------------------------------------------------------------------------------------------------------------------
# TGDPO


def tgdpo_token_weights(
    chosen_rewards: Tensor, rejected_rewards: Tensor, alpha: float, beta: float, min_weight: float | None = None
) -> tuple[Tensor, Tensor]:
    r"""TGDPO token weights (Zhu et al., https://huggingface.co/papers/2506.14574), for `weighted_dpo_loss`.

        r̂_t(y) = log π_g(y_t|s_t) − log π_ref(y_t|s_t)        (frozen token-reward model π_g vs the training reference)
        a^w_t = 1 + α·β·r̂_t(y_w),     a^l_t = 1 − α·β·r̂_t(y_l)

    β is the *training* β (as in the official code), not the β the reward model was trained with. α = 0 gives DPO.
    Defaults in the official recipe: β = 0.1, α = 0.5. Weights become ≤ 0 when |r̂| > 1/(αβ); the official code does not
    clamp, and neither does this unless `min_weight` is set (clamp from below). The weights are returned detached.
    Masked positions keep whatever the rewards hold there: the loss masks them.

    Returns:
        `(a^w, a^l)`, each `(B, T)`.
    """
    scale = alpha * beta
    chosen_weights = 1 + scale * _upcast(chosen_rewards.detach())
    rejected_weights = 1 - scale * _upcast(rejected_rewards.detach())
    if min_weight is not None:
        chosen_weights = chosen_weights.clamp(min=min_weight)
        rejected_weights = rejected_weights.clamp(min=min_weight)
    return chosen_weights, rejected_weights


# ---------------------------------------------------------------------------------------------------------------------
# T-REG


def treg_token_rewards(better_logps: Tensor, worse_logps: Tensor, mask: Tensor) -> Tensor:
    r"""T-REG self-generated token rewards by contrastive prompting (https://huggingface.co/papers/2412.02685).

        r̂_t = σ( log π_e(y_t | x⁺, y_<t) − log π_e(y_t | x⁻, y_<t) ) − 1/2   ∈ (−1/2, 1/2)

    `better_logps` / `worse_logps` are the evaluator's per-token log-probs of the *same* response token ids after the
    "make it better" / "make it worse" prompts. Computed in float32 at least, detached, 0 at masked positions.
    """
    _check_same_shape(better_logps=better_logps, worse_logps=worse_logps, mask=mask)
    diff = _upcast(better_logps.detach()) - _upcast(worse_logps.detach())
    return _zero_pad(torch.sigmoid(diff) - 0.5, mask)


def treg_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float,
    alpha: float,
    reg_form: str = "logratio",
    reg_reduction: str = "sum",
    chosen_logps: Tensor | None = None,
    rejected_logps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""T-REG: DPO with token-level reward regularisation (Zhou et al., https://huggingface.co/papers/2412.02685).

    No official code is public; this is the spec's reconstruction (token reduction and form are knobs):

        R(y)     = β Σ_t m_t Δ_t(y)
        L_DPO    = −log σ(R(y_w) − R(y_l))
        w        = sg(σ(R(y_l) − R(y_w)))                     (DPO per-pair gradient weight, detached)
        L_REG(y) = −Σ_t m_t r̂_t(y) β Δ_t(y)                   (reg_form="logratio", default; 0 at initialisation)
                 = −Σ_t m_t r̂_t(y) β log π_θ(y_t|s_t)          (reg_form="logprob": same gradient, different value)
        L        = L_DPO + α·w·(L_REG(y_w) + L_REG(y_l))

    `reg_reduction="mean"` divides each L_REG by its number of completion tokens (at least 1). r̂ ≡ 0 gives DPO exactly.
    The paper's α grid is {0.1, 0.25, 0.5}; the spec's default is α = 0.5.

    Args:
        chosen_rewards, rejected_rewards: `(B, T)` self-generated token rewards r̂ (see `treg_token_rewards`).
        chosen_logps, rejected_logps: `(B, T)` policy per-token log-probs; required for `reg_form="logprob"`.

    Returns:
        `(B,)` per-pair total loss and detached per-pair metrics `dpo`, `reg_chosen`, `reg_rejected`, `pair_weight`.
    """
    _check_choice("reg_form", reg_form, TREG_REG_FORMS)
    _check_choice("reg_reduction", reg_reduction, TREG_REG_REDUCTIONS)
    if reg_form == "logprob" and (chosen_logps is None or rejected_logps is None):
        raise ValueError(
            "reg_form='logprob' needs the policy per-token log-probs: pass chosen_logps and rejected_logps."
        )
    _check_same_shape(chosen_logratios=chosen_logratios, chosen_rewards=chosen_rewards, chosen_mask=chosen_mask)
    _check_same_shape(
        rejected_logratios=rejected_logratios, rejected_rewards=rejected_rewards, rejected_mask=rejected_mask
    )

    chosen_reward = beta * masked_sum(_upcast(chosen_logratios), chosen_mask)
    rejected_reward = beta * masked_sum(_upcast(rejected_logratios), rejected_mask)
    dpo = -F.logsigmoid(chosen_reward - rejected_reward)
    # The regulariser fades once the pair is separated; detached so it does not change the DPO gradient itself.
    pair_weight = torch.sigmoid(rejected_reward - chosen_reward).detach()

    def regulariser(scored: Tensor, rewards: Tensor, mask: Tensor) -> Tensor:
        reg = -beta * _weighted_logratio_sum(scored, rewards, mask)
        if reg_reduction == "mean":
            reg = reg / _as_bool(mask).sum(dim=-1).clamp(min=1)
        return reg

    if reg_form == "logratio":
        chosen_scored, rejected_scored = chosen_logratios, rejected_logratios
    else:
        chosen_scored, rejected_scored = chosen_logps, rejected_logps
    reg_chosen = regulariser(chosen_scored, chosen_rewards, chosen_mask)
    reg_rejected = regulariser(rejected_scored, rejected_rewards, rejected_mask)

    loss = dpo + alpha * pair_weight * (reg_chosen + reg_rejected)
    metrics = {
        "dpo": dpo.detach(),
        "reg_chosen": reg_chosen.detach(),
        "reg_rejected": reg_rejected.detach(),
        "pair_weight": pair_weight,
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------------
# cDPO


def cdpo_contrastive_probs(
    positive_logits: Tensor, negative_logits: Tensor, labels: Tensor, mask: Tensor, gamma: float = 1.0
) -> Tensor:
    r"""cDPO contrastive-estimation probability of each token (Lin et al., https://huggingface.co/papers/2411.19943).

        p_ce,t = softmax( (1+γ)·z⁺_t − γ·z⁻_t )[y_t]          (γ = 1 in the official code: 2·z_pos − z_neg)

    z⁺ / z⁻ are the positive / negative contrastive-estimation models' logits `(B, T, V)` at the position predicting y_t
    (`labels`, `(B, T)`). A low p_ce marks a critical token. Computed with `log_softmax` in float32 at least; detached;
    0 at masked positions (whose labels may be −100).
    """
    _check_same_shape(positive_logits=positive_logits, negative_logits=negative_logits)
    _check_same_shape(labels=labels, mask=mask)
    mask = _as_bool(mask)
    mask_3d = mask.unsqueeze(-1)
    # Sanitise padding before the softmax so junk logits cannot produce NaN anywhere.
    positive = _zero_pad(_upcast(positive_logits.detach()), mask_3d)
    negative = _zero_pad(_upcast(negative_logits.detach()), mask_3d)
    logp = F.log_softmax((1 + gamma) * positive - gamma * negative, dim=-1)
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    token_logp = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return _zero_pad(token_logp.exp(), mask)


def cdpo_contrastive_weights(
    chosen_probs: Tensor,
    rejected_probs: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    only_neg: bool = True,
    chosen_eos_mask: Tensor | None = None,
    rejected_eos_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""cDPO token weights from contrastive probabilities (https://huggingface.co/papers/2411.19943).

        w^l_t = 1 − p_ce,t(y_l)
        w^w_t = 1 (only_neg=True, default)   or   p_ce,t(y_w) (only_neg=False)
        EOS tokens: weight 1 on both sides (the official code appends 1 to both weight lists)

    Args:
        chosen_probs, rejected_probs: `(B, T)` p_ce from `cdpo_contrastive_probs`.
        chosen_eos_mask, rejected_eos_mask: optional `(B, T)` masks of the EOS positions that get weight 1 (pass them to
            follow the official EOS rule; a truncated completion has no EOS to mark).

    Returns:
        `(w^w, w^l)`, each `(B, T)`, detached and 0 at masked positions.
    """
    _check_same_shape(chosen_probs=chosen_probs, chosen_mask=chosen_mask)
    _check_same_shape(rejected_probs=rejected_probs, rejected_mask=rejected_mask)
    chosen_probs, rejected_probs = _upcast(chosen_probs.detach()), _upcast(rejected_probs.detach())
    chosen_weights = torch.ones_like(chosen_probs) if only_neg else chosen_probs
    rejected_weights = 1 - rejected_probs
    if chosen_eos_mask is not None:
        chosen_weights = torch.where(_as_bool(chosen_eos_mask), 1.0, chosen_weights)
    if rejected_eos_mask is not None:
        rejected_weights = torch.where(_as_bool(rejected_eos_mask), 1.0, rejected_weights)
    return _zero_pad(chosen_weights, chosen_mask), _zero_pad(rejected_weights, rejected_mask)


def cdpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_weights: Tensor,
    rejected_weights: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float,
    aggregation: str = "sequence",
) -> Tensor:
    r"""cDPO token-weighted DPO, "Critical Tokens Matter" (Lin et al., https://huggingface.co/papers/2411.19943).

    `aggregation="sequence"` (default, the paper): token-weighted sequence DPO (see `weighted_dpo_loss`)

        L = −log σ( β·[ Σ_t m^w_t w^w_t Δ_t(y_w) − Σ_t m^l_t w^l_t Δ_t(y_l) ] )

    `aggregation="per_token"` (the official code): one sigmoid per aligned position `(b, t)` of the given tensors,
    chosen token t paired with rejected token t at the same absolute position,

        ℓ_{b,t} = −log σ( β·[ m^w w^w Δ(y_w) − m^l w^l Δ(y_l) ]_{b,t} ),     L = mean over ALL B·T positions

    so a position where a side is masked contributes that side's term as 0, and a position masked on both sides (prompt,
    padding) contributes log 2. Returned as per-row means over T, so that the trainer's `.mean()` equals the official
    value. The result therefore depends on the padded length T: pass the tensors exactly as the official trainer would
    see them.

    `aggregation="per_token_completion"` (not official): the same per-position losses averaged only over positions where
    either side is a completion token, over the whole batch. Each row returns its sum scaled by B / (batch count of such
    positions), so the trainer's `.mean()` gives that batch-wide token mean; a batch without completion tokens gives 0.
    The count is that of the tensors given (one micro-batch on one process): under gradient accumulation or data
    parallelism the optimizer step averages micro-batch means, which equals one large batch only when the micro-batches
    hold equal counts.

    Defaults (official): β = 0.1, weights from `cdpo_contrastive_weights` with only_neg=True and the EOS rule. Weights
    are used as given (pass them detached).

    Returns:
        `(B,)` per-pair (or per-row) loss.
    """
    _check_choice("aggregation", aggregation, CDPO_AGGREGATIONS)
    if aggregation == "sequence":
        return weighted_dpo_loss(
            chosen_logratios, rejected_logratios, chosen_weights, rejected_weights, chosen_mask, rejected_mask, beta
        )

    _check_same_shape(
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_weights=chosen_weights,
        rejected_weights=rejected_weights,
        chosen_mask=chosen_mask,
        rejected_mask=rejected_mask,
    )
    chosen_terms = _zero_pad(_upcast(chosen_logratios), chosen_mask) * _zero_pad(_upcast(chosen_weights), chosen_mask)
    rejected_terms = _zero_pad(_upcast(rejected_logratios), rejected_mask) * _zero_pad(
        _upcast(rejected_weights), rejected_mask
    )
    token_losses = -F.logsigmoid(beta * (chosen_terms - rejected_terms))
    if aggregation == "per_token":
        return token_losses.mean(dim=-1)

    either = _as_bool(chosen_mask) | _as_bool(rejected_mask)
    batch_count = either.sum().clamp(min=1).to(token_losses.dtype)
    return masked_sum(token_losses, either) * (token_losses.shape[0] / batch_count)


# ---------------------------------------------------------------------------------------------------------------------
# AlignDistil


def aligndistil_loss_from_logits(
    student_logits: Tensor,
    dpo_logits: Tensor,
    reverse_logits: Tensor,
    mask: Tensor,
    beta: float = 0.1,
    beta2: float = 10.0,
    temperature: float = 1.0,
    mode: str = "aligndistil",
    len_norm: bool = True,
    ref_logits: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""AlignDistil: token-level alignment as adaptive policy distillation (Zhang et al.,
    https://huggingface.co/papers/2503.02832). Naive full-logits reference implementation.

    Per completion position t, with DPO / reverse-DPO teacher logits z^d, z^r (no gradient through the teachers):

        TVD_t = Σ_v |π_d(v|s_t) − π_r(v|s_t)|                 (π_d, π_r = softmax of the raw teacher logits)
        ω_t   = β₂·TVD_t + 1e-3
        z*_t  = z^d_t + ω_t·(z^d_t − z^r_t),     π*_t = softmax(z*_t / τ)
        ℓ_t   = (β/ω_t)·KL(π_θ(·|s_t) ‖ π*_t)                 (reverse KL; student logits also divided by τ)
        L     = Σ_t m_t ℓ_t / max(1, Σ_t m_t)                 (len_norm=True, default; otherwise no division)

    Ablation modes (`mode`), the first two with ℓ_t = β₂·KL(π_θ ‖ π*):
        "theorem1":          z* = (β/β₂)·z^d + (1 − β/β₂)·z^ref    (needs `ref_logits`; `reverse_logits` is unused)
        "theorem1_contrast": z* = z^d + (β/β₂)·(z^d − z^r)         (constant ω)
        "theorem1_adaptive": z* = ω_t·z^d + (1 − ω_t)·z^r,  ℓ_t = (β/ω_t)·KL(π_θ ‖ π*)   (ω_t as above: linear
                             interpolation between the two teachers' logits, extrapolating once ω_t > 1; official
                             `reward_boost_type="theorem1_adaptive"`)

    Defaults (official off-policy scripts): β = 0.1, β₂ = 10 (15 on-policy), τ = 1, len_norm on. Only chosen responses
    are distilled off-policy. Which positions are masked (standard causal shift vs the official off-by-one) is decided
    by the caller through `mask`. Everything runs in float32 at least, since ω can reach 20 and z* is extrapolated ×21.
    An empty sequence gives 0 with len_norm. Junk logits at masked positions are replaced before any softmax.

    Args:
        student_logits, dpo_logits, reverse_logits, ref_logits: `(B, T, V)` logits at the positions predicting y_t, on
            the same vocabulary slice.
        mask: `(B, T)` completion mask.

    Returns:
        `(B,)` per-sequence loss and detached `(B, T)` metrics (0 at masked positions): `token_kl` (KL(π_θ ‖ π*)),
        `token_coef` (β/ω_t or β₂) and `omega` (ω_t; β/β₂ in the constant theorem modes).
    """
    _check_choice("mode", mode, ALIGNDISTIL_MODES)
    if mode == "theorem1" and ref_logits is None:
        raise ValueError("mode='theorem1' interpolates towards a reference model: pass ref_logits.")
    if temperature <= 0 or beta2 <= 0:
        raise ValueError(f"temperature and beta2 must be > 0, got temperature={temperature}, beta2={beta2}.")
    _check_same_shape(student_logits=student_logits, dpo_logits=dpo_logits, reverse_logits=reverse_logits)
    _check_same_shape(student_positions=student_logits[..., 0], mask=mask)
    mask = _as_bool(mask)
    mask_3d = mask.unsqueeze(-1)

    def prepare(logits: Tensor, teacher: bool) -> Tensor:
        logits = _upcast(logits.detach() if teacher else logits)
        return _zero_pad(logits, mask_3d)

    student = prepare(student_logits, teacher=False)
    dpo = prepare(dpo_logits, teacher=True)
    reverse = prepare(reverse_logits, teacher=True)

    if mode in ("aligndistil", "theorem1_adaptive"):
        tvd = (F.softmax(dpo, dim=-1) - F.softmax(reverse, dim=-1)).abs().sum(dim=-1)
        omega = beta2 * tvd + _ALIGNDISTIL_OMEGA_FLOOR
        weight = omega.unsqueeze(-1)
        if mode == "aligndistil":
            teacher_logits = dpo + weight * (dpo - reverse)
        else:
            teacher_logits = weight * dpo + (1 - weight) * reverse
        coef = beta / omega
    else:
        ratio = beta / beta2
        omega = torch.full(mask.shape, ratio, dtype=student.dtype, device=student.device)
        coef = torch.full_like(omega, beta2)
        if mode == "theorem1":
            _check_same_shape(student_logits=student_logits, ref_logits=ref_logits)
            teacher_logits = ratio * dpo + (1 - ratio) * prepare(ref_logits, teacher=True)
        else:
            teacher_logits = dpo + ratio * (dpo - reverse)

    token_kl = _kl(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher_logits / temperature, dim=-1))
    loss = masked_sum(coef * token_kl, mask)
    if len_norm:
        loss = loss / mask.sum(dim=-1).clamp(min=1)

    metrics = {
        "token_kl": _zero_pad(token_kl.detach(), mask),
        "token_coef": _zero_pad(coef, mask),
        "omega": _zero_pad(omega, mask),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------------
# RTO


def rto_token_rewards(
    logp_dpo: Tensor,
    logp_sft: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    rm_score: Tensor | float,
    dpo_reward_scale: float = 0.05,
    dpo_reward_clip: float = 0.05,
    kl_coef: float = 0.01,
    rm_clamp: float | None = 10.0,
) -> Tensor:
    r"""RTO dense token rewards for PPO, "DPO Meets PPO" (Zhong et al., https://huggingface.co/papers/2404.18922).

        r_t = clip( β₁·m_t·[log π_dpo(y_t) − log π_sft(y_t)], −c, c )     (DPO shaping; clipped only if c > 0)
              − β_KL·m_t·[log π_old(y_t) − log π_sft(y_t)]                (KL-in-reward; π_old = rollout policy)
              + 1[t = last completion token]·clamp(r_RM, −C, C)          (sentence RM score; no clamp if C is None)

    Defaults (official Llama-3-8B script): β₁ = `dpo_reward_scale` = 0.05, c = `dpo_reward_clip` = 0.05,
    β_KL = `kl_coef` = 0.01, C = `rm_clamp` = 10. The last token is the last mask-1 index of each row (left or right
    padding). RM normalisation, if wanted, is applied by the caller. A row without completion tokens gets all zeros (its
    RM score has no token to land on). Computed without gradient, as at rollout time.

    Args:
        logp_dpo, logp_sft, logp_old: `(B, T)` per-token log-probs of the DPO model, the SFT reference and the rollout
            policy, all with the same tokenizer.
        rm_score: `(B,)` sentence-level reward (or a scalar).

    Returns:
        `(B, T)` rewards, exactly 0 at masked positions.
    """
    _check_same_shape(logp_dpo=logp_dpo, logp_sft=logp_sft, logp_old=logp_old, mask=mask)
    with torch.no_grad():
        logp_dpo, logp_sft, logp_old = _upcast(logp_dpo), _upcast(logp_sft), _upcast(logp_old)
        dpo_reward = _zero_pad(dpo_reward_scale * (logp_dpo - logp_sft), mask)
        if dpo_reward_clip > 0:
            dpo_reward = dpo_reward.clamp(-dpo_reward_clip, dpo_reward_clip)
        kl_penalty = _zero_pad(kl_coef * (logp_old - logp_sft), mask)
        rewards = dpo_reward - kl_penalty

        score = torch.as_tensor(rm_score, dtype=rewards.dtype, device=rewards.device).expand(rewards.shape[0])
        if rm_clamp is not None:
            score = score.clamp(-rm_clamp, rm_clamp)
        last, has_token = _last_index(mask)
        score = torch.where(has_token, score, torch.zeros_like(score))
        return rewards.scatter_add(-1, last.unsqueeze(-1), score.unsqueeze(-1))
