"""Property tests (hypothesis) of the preference and SFT token losses.

For random batch sizes, completion lengths (empty rows and all-empty batches included), masks, weights and scales:
the losses and their gradients are finite; the amount of right padding (filled with NaN/inf junk, which the ops must
never read) and the order of the rows do not change any row's result; uniform weights (or zero rewards, zero KL,
all-ones masks) reduce each method to its sequence-level baseline, as the spec says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_tokenlevel.ops.preference import (
    cdpo_loss,
    sparsepo_loss,
    tdpo_loss,
    tgdpo_token_weights,
    treg_loss,
    weighted_dpo_loss,
)
from trl_tokenlevel.ops.sft import chord_sft_loss

# No example database: the suite writes nothing into the checkout.
SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BETA, ALPHA = 0.1, 0.5


@st.composite
def batches(draw):
    """A preference batch: `B` pairs, padded width `T`, per-row chosen/rejected lengths in [0, T]."""
    size = draw(st.integers(1, 4))
    width = draw(st.integers(1, 8))
    lengths = st.lists(st.integers(0, width), min_size=size, max_size=size)
    return {
        "chosen_lengths": draw(lengths),
        "rejected_lengths": draw(lengths),
        "width": width,
        "scale": draw(st.sampled_from([0.01, 1.0, 30.0])),  # log-ratio magnitude: tiny, typical, saturating
        "weight_scale": draw(st.sampled_from([0.0, 1.0, 1e3])),  # all-zero, typical, extreme weights
        "seed": draw(st.integers(0, 2**16)),
    }


def _tensors(spec, pad: int = 0, junk: float = float("nan")) -> dict[str, torch.Tensor]:
    """The batch as tensors, right-padded by `pad` extra columns whose values are `junk` (masks 0 there)."""
    generator = torch.Generator().manual_seed(spec["seed"])
    size, width = len(spec["chosen_lengths"]), spec["width"]

    def values(scale=1.0, positive=False):
        x = torch.randn(size, width, generator=generator, dtype=torch.float64) * scale
        return x.abs() if positive else x

    def mask(lengths):
        return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).double()

    batch = {
        "chosen_logratios": values(spec["scale"]),
        "rejected_logratios": values(spec["scale"]),
        "chosen_weights": values(spec["weight_scale"], positive=True),
        "rejected_weights": values(spec["weight_scale"], positive=True),
        "chosen_rewards": values(),
        "rejected_rewards": values(),
        "chosen_kl": values(spec["scale"], positive=True),
        "rejected_kl": values(spec["scale"], positive=True),
        "chosen_mask": mask(spec["chosen_lengths"]),
        "rejected_mask": mask(spec["rejected_lengths"]),
    }
    for name, tensor in batch.items():
        fill = 0.0 if name.endswith("mask") else junk
        batch[name] = torch.cat([tensor, torch.full((size, pad), fill, dtype=tensor.dtype)], dim=1)
    return batch


def _pairs(b):
    return b["chosen_logratios"], b["rejected_logratios"]


def _masks(b):
    return b["chosen_mask"], b["rejected_mask"]


# Each method as a function of a batch, returning the per-row loss `(B,)`.
METHODS = {
    "weighted": lambda b: weighted_dpo_loss(*_pairs(b), b["chosen_weights"], b["rejected_weights"], *_masks(b), BETA),
    "cdpo_sequence": lambda b: cdpo_loss(*_pairs(b), b["chosen_weights"], b["rejected_weights"], *_masks(b), BETA),
    "cdpo_per_token": lambda b: cdpo_loss(*_pairs(b), b["chosen_weights"], b["rejected_weights"], *_masks(b), BETA,
                                          aggregation="per_token"),
    "cdpo_per_token_completion": lambda b: cdpo_loss(*_pairs(b), b["chosen_weights"], b["rejected_weights"],
                                                     *_masks(b), BETA, aggregation="per_token_completion"),
    "tgdpo": lambda b: weighted_dpo_loss(*_pairs(b), *tgdpo_token_weights(b["chosen_rewards"], b["rejected_rewards"],
                                                                          ALPHA, BETA), *_masks(b), BETA),
    "treg": lambda b: treg_loss(*_pairs(b), b["chosen_rewards"], b["rejected_rewards"], *_masks(b), BETA, ALPHA)[0],
    "tdpo1": lambda b: tdpo_loss(*_pairs(b), b["chosen_kl"], b["rejected_kl"], *_masks(b), BETA, variant="tdpo1")[0],
    "tdpo2": lambda b: tdpo_loss(*_pairs(b), b["chosen_kl"], b["rejected_kl"], *_masks(b), BETA, ALPHA)[0],
    "sparsepo": lambda b: sparsepo_loss(*_pairs(b), b["chosen_kl"], b["rejected_kl"], *_masks(b),
                                        b["chosen_weights"], b["rejected_weights"], beta=BETA, l1_reward=0.1,
                                        l1_kl=0.1)[0],
}  # fmt: skip
# Methods whose per-row value depends on the padded width by definition (the official cDPO averages over all positions).
WIDTH_DEPENDENT = {"cdpo_per_token"}


@SETTINGS
@given(spec=batches(), method=st.sampled_from(sorted(METHODS)))
def test_losses_and_gradients_are_finite(spec, method):
    batch = _tensors(spec)
    for name in ("chosen_logratios", "rejected_logratios", "chosen_kl", "rejected_kl"):
        batch[name].requires_grad_(True)
    loss = METHODS[method](batch)
    assert loss.shape == (len(spec["chosen_lengths"]),)
    assert torch.isfinite(loss).all(), loss
    loss.mean().backward()
    for name in ("chosen_logratios", "rejected_logratios", "chosen_kl", "rejected_kl"):
        grad = batch[name].grad
        assert grad is None or torch.isfinite(grad).all(), name


@SETTINGS
@given(spec=batches(), method=st.sampled_from(sorted(set(METHODS) - WIDTH_DEPENDENT)),
       pad=st.integers(1, 5), junk=st.sampled_from([float("nan"), float("inf"), -1e30]))  # fmt: skip
def test_padding_amount_does_not_change_rows(spec, method, pad, junk):
    unpadded = METHODS[method](_tensors(spec))
    padded = METHODS[method](_tensors(spec, pad=pad, junk=junk))
    torch.testing.assert_close(padded, unpadded, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(spec=batches(), method=st.sampled_from(sorted(METHODS)), order_seed=st.integers(0, 1000))
def test_batch_order_does_not_change_rows(spec, method, order_seed):
    batch = _tensors(spec)
    order = torch.randperm(len(spec["chosen_lengths"]), generator=torch.Generator().manual_seed(order_seed))
    permuted = METHODS[method]({name: tensor[order] for name, tensor in batch.items()})
    torch.testing.assert_close(permuted, METHODS[method](batch)[order], rtol=1e-12, atol=1e-12)


def _dpo(batch):
    """The sequence-level DPO baseline: −log σ(β·[Σ Δ(y_w) − Σ Δ(y_l)])."""
    margin = (batch["chosen_logratios"] * batch["chosen_mask"]).sum(-1) - (
        batch["rejected_logratios"] * batch["rejected_mask"]
    ).sum(-1)
    return -F.logsigmoid(BETA * margin)


@SETTINGS
@given(spec=batches())
def test_uniform_token_signals_reduce_to_dpo(spec):
    """Spec: uniform weights give DPO (weighted, cDPO `sequence`); TGDPO with α = 0, T-REG with r̂ ≡ 0 and TDPO with
    zero KL are DPO; SparsePO with all-ones masks and no L1 is TDPO1."""
    batch = _tensors(spec)
    ones = {"chosen_weights": torch.ones_like(batch["chosen_mask"]),
            "rejected_weights": torch.ones_like(batch["rejected_mask"])}  # fmt: skip
    zeros = {name: torch.zeros_like(batch["chosen_mask"]) for name in ("chosen_rewards", "rejected_rewards",
                                                                      "chosen_kl", "rejected_kl")}  # fmt: skip
    dpo = _dpo(batch)
    uniform = {**batch, **ones}
    torch.testing.assert_close(METHODS["weighted"](uniform), dpo)
    torch.testing.assert_close(METHODS["cdpo_sequence"](uniform), dpo)
    no_guidance = weighted_dpo_loss(*_pairs(batch), *tgdpo_token_weights(batch["chosen_rewards"],
                                    batch["rejected_rewards"], 0.0, BETA), *_masks(batch), BETA)  # fmt: skip
    torch.testing.assert_close(no_guidance, dpo)
    torch.testing.assert_close(METHODS["treg"]({**batch, **zeros}), dpo)
    torch.testing.assert_close(METHODS["tdpo1"]({**batch, **zeros}), dpo)
    torch.testing.assert_close(METHODS["tdpo2"]({**batch, **zeros}), dpo)
    all_ones_masks = sparsepo_loss(*_pairs(batch), batch["chosen_kl"], batch["rejected_kl"], *_masks(batch),
                                   ones["chosen_weights"], ones["rejected_weights"], beta=BETA)[0]  # fmt: skip
    torch.testing.assert_close(all_ones_masks, METHODS["tdpo1"](batch))


@st.composite
def sft_batches(draw):
    size, width = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    return {
        "lengths": draw(st.lists(st.integers(0, width), min_size=size, max_size=size)),
        "width": width,
        "seed": draw(st.integers(0, 2**16)),
        "weighting": draw(st.sampled_from(["phi", "none", "is"])),
        "cutoff": draw(st.sampled_from([1.0, 0.5, 1e-3])),
        "token_level": draw(st.booleans()),
    }


def _sft_tensors(spec, pad=0, junk=-3.0):
    generator = torch.Generator().manual_seed(spec["seed"])
    size, width = len(spec["lengths"]), spec["width"]
    # Log-probabilities: from near-certain (≈0) to very unlikely (−50).
    log_probs = -torch.rand(size, width, generator=generator, dtype=torch.float64) * 50
    mask = (torch.arange(width)[None] < torch.tensor(spec["lengths"])[:, None]).double()
    return (torch.cat([log_probs, torch.full((size, pad), junk, dtype=torch.float64)], 1),
            torch.cat([mask, torch.zeros(size, pad, dtype=torch.float64)], 1))  # fmt: skip


@SETTINGS
@given(spec=sft_batches(), pad=st.integers(0, 4), order_seed=st.integers(0, 1000))
def test_chord_sft_loss_properties(spec, pad, order_seed):
    """CHORD's expert-SFT loss: finite (with gradients), independent of padding (finite junk: the op multiplies by the
    mask, so it expects finite padding, which TRL's fused head provides) and of row order; `weighting="none"` is the
    masked NLL mean."""
    kwargs = dict(weighting=spec["weighting"], cutoff_prob=spec["cutoff"], token_level=spec["token_level"])
    log_probs, mask = _sft_tensors(spec)
    log_probs.requires_grad_(True)
    loss = chord_sft_loss(log_probs, mask, **kwargs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_probs.grad).all()
    torch.testing.assert_close(chord_sft_loss(*_sft_tensors(spec, pad=pad), **kwargs), loss.detach())
    order = torch.randperm(len(spec["lengths"]), generator=torch.Generator().manual_seed(order_seed))
    torch.testing.assert_close(chord_sft_loss(log_probs.detach()[order], mask[order], **kwargs), loss.detach())
    if spec["weighting"] == "none" and spec["cutoff"] == 1.0 and spec["token_level"]:
        nll = -(log_probs.detach() * mask).sum() / mask.sum().clamp(min=1)
        torch.testing.assert_close(loss.detach(), nll)
