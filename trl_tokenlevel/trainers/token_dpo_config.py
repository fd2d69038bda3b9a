"""Configuration for `TokenDPOTrainer`: every `trl.DPOConfig` field plus the token-level options."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import DPOConfig

# Token-scalar losses: each needs only gathered per-token log-probs plus a per-token weight or reward.
TOKEN_SCALAR_LOSS_TYPES = ("weighted", "tgdpo", "treg", "cdpo")
TOKEN_LOSS_TYPES = TOKEN_SCALAR_LOSS_TYPES
CDPO_AGGREGATIONS = ("sequence", "per_token", "per_token_completion")
TREG_REG_FORMS = ("logratio", "logprob")
TREG_REG_REDUCTIONS = ("sum", "mean")


@dataclass
class TokenDPOConfig(DPOConfig):
    r"""
    Configuration class for [`TokenDPOTrainer`]: every [`~trl.DPOConfig`] parameter keeps its meaning, and the
    parameters below add token-level credit assignment. With `token_loss_type=None` (the default) training is exactly
    stock DPO.

    Parameters:
        > Parameters that select the token-level loss

        token_loss_type (`str` or `None`, *optional*, defaults to `None`):
            Token-level loss. `None` is stock DPO. `"weighted"`: per-token weights (dataset columns
            `chosen_token_weights` / `rejected_token_weights`) multiply the per-token log-ratios before they are
            summed. `"tgdpo"`: TGDPO ([paper](https://huggingface.co/papers/2506.14574)), weights `1 ± α·β·r̂` from
            token rewards (columns `chosen_token_rewards` / `rejected_token_rewards`, or a live `guidance_model`).
            `"treg"`: T-REG ([paper](https://huggingface.co/papers/2412.02685)), DPO plus a token-reward regulariser
            (reward columns). `"cdpo"`: critical-token DPO ([paper](https://huggingface.co/papers/2411.19943)),
            contrastive-estimation weights (weight columns).

        > Parameters of the individual methods

        tgdpo_alpha (`float`, *optional*, defaults to `0.5`):
            TGDPO α: chosen token weight `1 + α·β·r̂`, rejected `1 − α·β·r̂`. `0` is plain DPO.
        tgdpo_min_weight (`float` or `None`, *optional*, defaults to `None`):
            Lower clamp for TGDPO weights (they turn negative when `|r̂| > 1/(α·β)`). Off by default, as in the
            official code.
        treg_alpha (`float`, *optional*, defaults to `0.5`):
            T-REG regulariser weight α.
        treg_reg_form (`str`, *optional*, defaults to `"logratio"`):
            T-REG regulariser on `β·Δ_t` (`"logratio"`, zero at initialisation) or on `β·log π_θ` (`"logprob"`; same
            gradients, different value).
        treg_reg_reduction (`str`, *optional*, defaults to `"sum"`):
            Token reduction of the T-REG regulariser: `"sum"` or `"mean"`.
        cdpo_aggregation (`str`, *optional*, defaults to `"sequence"`):
            cDPO aggregation. `"sequence"` (paper): one sigmoid per pair over weighted token sums. `"per_token"`
            (official code): one sigmoid per aligned position, mean over all positions. `"per_token_completion"`:
            mean over positions where either side is a completion token.
        guidance_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            TGDPO online mode from the command line: path or Hub id of the frozen token-reward model (a DPO-trained
            model sharing the policy's tokenizer). Python users can pass `guidance_model=` to the trainer instead.

    > [!NOTE]
    > Token-level losses are defined on the sigmoid DPO objective over summed log-ratios: they require
    > `loss_type="sigmoid"`, `ld_alpha=None`, `f_divergence_type="reverse_kl"` and `use_weighting=False`.
    """

    token_loss_type: str | None = field(
        default=None,
        metadata={
            "help": "Token-level loss: None (stock DPO), 'weighted', 'tgdpo', 'treg' or 'cdpo'.",
            "choices": [None, *TOKEN_LOSS_TYPES],
        },
    )
    tgdpo_alpha: float = field(default=0.5, metadata={"help": "TGDPO alpha: weights 1 ± alpha*beta*r̂."})
    tgdpo_min_weight: float | None = field(
        default=None, metadata={"help": "Optional lower clamp of TGDPO token weights (off by default)."}
    )
    treg_alpha: float = field(default=0.5, metadata={"help": "T-REG regulariser weight alpha."})
    treg_reg_form: str = field(
        default="logratio",
        metadata={"help": "T-REG regulariser form.", "choices": list(TREG_REG_FORMS)},
    )
    treg_reg_reduction: str = field(
        default="sum",
        metadata={"help": "Token reduction of the T-REG regulariser.", "choices": list(TREG_REG_REDUCTIONS)},
    )
    cdpo_aggregation: str = field(
        default="sequence",
        metadata={"help": "cDPO aggregation: 'sequence' (paper) or 'per_token' (official code).", "choices": list(CDPO_AGGREGATIONS)},
    )
    guidance_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "TGDPO online mode: frozen token-reward model (path or Hub id) sharing the tokenizer."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.token_loss_type is None:
            return
        if self.token_loss_type not in TOKEN_LOSS_TYPES:
            raise ValueError(
                f"token_loss_type={self.token_loss_type!r} is not a token-level loss. Valid values: None (stock DPO), "
                + ", ".join(repr(name) for name in TOKEN_LOSS_TYPES)
                + "."
            )
        # The token losses replace the sigmoid DPO objective on summed log-ratios; settings that change how the
        # sequence log-ratio is formed or reduced have no defined token-level meaning, so refuse them instead of
        # silently ignoring them.
        if self.loss_type != ["sigmoid"]:
            raise ValueError(
                f"token_loss_type={self.token_loss_type!r} is a token-level form of the sigmoid DPO loss, but "
                f"loss_type={self.loss_type}. Set loss_type='sigmoid' (the default) or token_loss_type=None."
            )
        if self.ld_alpha is not None:
            raise ValueError(
                f"ld_alpha={self.ld_alpha} (LD-DPO length weighting) is not defined for token-level losses. "
                "Set ld_alpha=None, or use token weights to down-weight the tail tokens yourself."
            )
        if self.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"f_divergence_type={self.f_divergence_type!r} is not defined for token-level losses. "
                "Set f_divergence_type='reverse_kl' (the default)."
            )
        if self.use_weighting:
            raise ValueError(
                "use_weighting=True (WPO sequence weights) is not defined for token-level losses. Set "
                "use_weighting=False."
            )
        for name in ("tgdpo_alpha", "treg_alpha"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}.")
        if self.treg_reg_form not in TREG_REG_FORMS:
            raise ValueError(f"treg_reg_form={self.treg_reg_form!r}; valid values: {', '.join(TREG_REG_FORMS)}.")
        if self.treg_reg_reduction not in TREG_REG_REDUCTIONS:
            raise ValueError(
                f"treg_reg_reduction={self.treg_reg_reduction!r}; valid values: {', '.join(TREG_REG_REDUCTIONS)}."
            )
        if self.cdpo_aggregation not in CDPO_AGGREGATIONS:
            raise ValueError(
                f"cdpo_aggregation={self.cdpo_aggregation!r}; valid values: {', '.join(CDPO_AGGREGATIONS)}."
            )
        if self.guidance_model_name_or_path is not None and self.token_loss_type != "tgdpo":
            raise ValueError(
                "guidance_model_name_or_path is the TGDPO token-reward model; it is only used with "
                f"token_loss_type='tgdpo', not {self.token_loss_type!r}."
            )
