"""Every knob of the three configs is range-checked when the config is built: field, value, valid range, why, fix."""

from __future__ import annotations

import math

import pytest

from trl_tokenlevel import TokenDPOConfig, TokenGRPOConfig, TokenSFTConfig

from .support import assert_refused, output_dir_with_checkpoint

NAN, INF = math.nan, math.inf
COMMON = dict(report_to="none", bf16=False, save_strategy="no")

# (overrides, field named in the message). The fix is "Set <field> ..." (or "Set <a> <= <b>" for orderings).
DPO_CASES = [
    ({"token_loss_type": "tdpo2", "tdpo_alpha": -1.0}, "tdpo_alpha"),
    ({"tgdpo_alpha": -0.5}, "tgdpo_alpha"),
    ({"token_loss_type": "treg", "treg_alpha": -1.0}, "treg_alpha"),
    ({"sparsepo_l1_reward": -1.0}, "sparsepo_l1_reward"),
    ({"sparsepo_l1_kl": NAN}, "sparsepo_l1_kl"),
    ({"sparsepo_mask_dropout": 1.0}, "sparsepo_mask_dropout"),
    ({"sparsepo_mask_weight_decay": -0.01}, "sparsepo_mask_weight_decay"),
    ({"mapo_degenerate_fill": 2.0}, "mapo_degenerate_fill"),
    ({"aligndistil_beta2": 0.0}, "aligndistil_beta2"),
    ({"aligndistil_temperature": NAN}, "aligndistil_temperature"),
    ({"tgdpo_min_weight": INF}, "tgdpo_min_weight"),
    ({"token_loss_type": "cdpo", "beta": 0.0}, "beta"),
    ({"cdpo_aggregation": "mean"}, "cdpo_aggregation"),
    ({"token_kernel": "cuda"}, "token_kernel"),
    ({"mapo_hooks": "mlp"}, "mapo_hooks"),
]
GRPO_CASES = [
    ({"band_low": 3.0, "band_high": 2.0}, "band_low"),
    ({"band_low": -0.1}, "band_low"),
    ({"gtpo_entropy_threshold": -1.0}, "gtpo_entropy_threshold"),
    ({"hapo_entropy_pivot": 1.5}, "hapo_entropy_pivot"),
    ({"token_advantage": "hapo", "hapo_entropy_pivot": -0.1}, "hapo_entropy_pivot"),
    ({"ucas_kappa": -0.05}, "ucas_kappa"),
    ({"ucas_beta_pos": NAN}, "ucas_beta_pos"),
    ({"token_selection": "entropy_quantile", "entropy_top_ratio": 0.0}, "entropy_top_ratio"),
    ({"entropy_top_ratio": 1.5}, "entropy_top_ratio"),
    ({"band_quantile_low": 0.9, "band_quantile_high": 0.1}, "band_quantile_low"),
    ({"d3s_token_keep_ratio_end": 0.0}, "d3s_token_keep_ratio_end"),
    ({"d3s_schedule_steps": 0}, "d3s_schedule_steps"),
    ({"tw_alpha": 0.5}, "tw_alpha"),
    ({"tw_vocab_chunk": 0}, "tw_vocab_chunk"),
    ({"rmt_gamma": 1.0}, "rmt_gamma"),
    ({"rmt_budget_init": 4, "rmt_budget_min": 8}, "rmt_budget_min"),
    ({"rmt_k": 0.0}, "rmt_k"),
    ({"chord_mu_valley": 0.6, "chord_mu_peak": 0.5}, "chord_mu_valley"),
    ({"chord": True, "chord_expert_data_ratio": 1.0}, "chord_expert_data_ratio"),
    ({"token_reward_clip": -1.0}, "token_reward_clip"),
    ({"hapo_temperature_tau": 1.0}, "hapo_temperature_tau"),
    ({"rmt_length_reward_width": 0.0}, "rmt_length_reward_width"),
    ({"chord_mu_warmup_steps": -1}, "chord_mu_warmup_steps"),
    ({"token_advantage": "tempo", "tempo_lambda": -1.0}, "tempo_lambda"),
]
SFT_CASES = [
    ({"token_loss_type": "otr", "otr_coef": -1.0}, "otr_coef"),
    ({"otr_nll_coef": -1.0}, "otr_nll_coef"),
    ({"token_loss_type": "otr", "otr_coef": 0.0, "otr_nll_coef": 0.0}, "otr_coef"),
    ({"token_loss_type": "otr", "otr_temperature": 0.0}, "otr_temperature"),
    ({"otr_num_samples": 0}, "otr_num_samples"),
    ({"otr_num_samples": 2.5}, "otr_num_samples"),
    ({"otr_beta": 1.0}, "otr_beta"),
    ({"otr_logprob_temperature": NAN}, "otr_logprob_temperature"),
    ({"token_loss_type": "chord_phi", "chord_cutoff_prob": 0.0}, "chord_cutoff_prob"),
    ({"sstoken_ratio": 1.5}, "sstoken_ratio"),
    ({"sstoken_gamma": -0.1}, "sstoken_gamma"),
    ({"sstoken_history_decay": 1.1}, "sstoken_history_decay"),
    ({"sstoken_attention_layer": 1.5}, "sstoken_attention_layer"),
    ({"sstoken_norm_scope": "row"}, "sstoken_norm_scope"),
]


def _fix_for(field: str) -> str:
    # Range errors say "Set <field> to a value ...", orderings "Set <a> <= <b>", choices list the "Valid values".
    return rf"Set {field}|Valid values|{field}=0\.0 and"


@pytest.mark.parametrize("overrides,field", DPO_CASES, ids=[f for _, f in DPO_CASES])
def test_dpo_config_knob(overrides, field, tmp_path):
    out = output_dir_with_checkpoint(tmp_path)
    message = assert_refused(lambda: TokenDPOConfig(output_dir=out, **COMMON, **overrides), ValueError, out,
                             [field], _fix_for(field))  # fmt: skip
    assert repr(overrides[field]) in message or str(overrides[field]) in message  # the value it got


@pytest.mark.parametrize("overrides,field", GRPO_CASES, ids=[f for _, f in GRPO_CASES])
def test_grpo_config_knob(overrides, field, tmp_path):
    out = output_dir_with_checkpoint(tmp_path)
    message = assert_refused(lambda: TokenGRPOConfig(output_dir=out, **COMMON, **overrides), ValueError, out,
                             [field], _fix_for(field))  # fmt: skip
    assert str(overrides[field]) in message


@pytest.mark.parametrize("overrides,field", SFT_CASES, ids=[f"{f}-{v}" for (o, f) in SFT_CASES for v in [o[f]]])
def test_sft_config_knob(overrides, field, tmp_path):
    out = output_dir_with_checkpoint(tmp_path)
    message = assert_refused(lambda: TokenSFTConfig(output_dir=out, **COMMON, **overrides), ValueError, out,
                             [field], _fix_for(field))  # fmt: skip
    assert str(overrides[field]) in message


@pytest.mark.parametrize("config_cls", [TokenDPOConfig, TokenGRPOConfig, TokenSFTConfig])
def test_defaults_pass_every_check(config_cls, tmp_path):
    """By design: every default is inside its range (the checks run whatever the method)."""
    config_cls(output_dir=str(tmp_path), **COMMON)
