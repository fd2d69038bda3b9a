"""Configuration for `TokenDPOTrainer`: every `trl.DPOConfig` field plus the token-level options."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from ..checks import check_choice, check_number
from ..signals.masks import SPARSEPO_MASK_INITS

# Token-scalar losses: each needs only gathered per-token log-probs plus a per-token weight or reward.
TOKEN_SCALAR_LOSS_TYPES = ("weighted", "tgdpo", "treg", "cdpo")
# Full-distribution losses: they need the policy's and the reference's (or teachers') whole next-token distributions,
# computed from hidden states in tiles by `ops.chunked` (never `[batch, seq, vocab]` logits).
FULL_DISTRIBUTION_LOSS_TYPES = ("tdpo1", "tdpo2", "sparsepo", "mapo", "aligndistil")
TOKEN_LOSS_TYPES = TOKEN_SCALAR_LOSS_TYPES + FULL_DISTRIBUTION_LOSS_TYPES
TOKEN_KERNELS = ("auto", "trl", "liger", "torch", "triton")
MAPO_HOOK_SETS = ("all", "resid")
ALIGNDISTIL_MODES = ("aligndistil", "theorem1", "theorem1_contrast", "theorem1_adaptive")
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
            contrastive-estimation weights (weight columns). Full-distribution losses (need a live reference):
            `"tdpo1"` / `"tdpo2"`: TDPO ([paper](https://huggingface.co/papers/2404.11999)), DPO margin corrected by
            sequential KL(π_ref‖π_θ). `"sparsepo"` / `"mapo"`: SparsePO ([paper](https://huggingface.co/papers/2410.05102)),
            TDPO1 with learned (SparsePO) or reference-activation (MaPO) token masks. `"aligndistil"`: AlignDistil
            ([paper](https://huggingface.co/papers/2503.02832)), token-level distillation towards an extrapolated
            DPO / reverse-DPO teacher on chosen responses.
        token_kernel (`str`, *optional*, defaults to `"auto"`):
            How the full-distribution losses (TDPO, SparsePO, MaPO, AlignDistil) get their per-token quantities.
            `"torch"`: the fused pass (`ops.fused`): policy and reference/teachers run their backbones only and one
            tiled pass over both LM heads yields the log-probs, the KL and the logged statistics (each head read once
            per tile forward and once backward). `"triton"`: the same fused pass in Triton kernels
            (`ops.fused_triton`; CUDA, LM heads without bias, logit scale or softcap; speed not yet measured).
            `"trl"`: TRL's fused log-prob head, then TRL's `ChunkedDivergenceFunction` for the KL (Triton on CUDA).
            `"auto"`: "torch" on CPU, "trl" on CUDA/XPU (never "triton" until the GPU suite has timed it). `"liger"`
            raises (Liger has no per-token divergence).

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
            mean over positions where either side is a completion token, counted per micro-batch (with gradient
            accumulation, micro-batch means are averaged; see the cDPO section of the docs).
        tdpo_alpha (`float`, *optional*, defaults to `0.5`):
            TDPO2 weight α of the sequential-KL difference (TDPO1 ignores it).
        sparsepo_independent_masks (`bool`, *optional*, defaults to `False`):
            SparsePO: separate mask networks for the reward and the KL terms (default: one common mask).
        sparsepo_l1_reward (`float`, *optional*, defaults to `0.0`), sparsepo_l1_kl (`float`, *optional*, defaults to `0.0`):
            SparsePO L1 penalties λ_u, λ_d on the masks (halved for a common mask, as in the official code).
        sparsepo_mask_dropout (`float`, *optional*, defaults to `0.01`):
            Dropout inside the SparsePO mask network.
        sparsepo_mask_init (`str`, *optional*, defaults to `"official"`):
            SparsePO mask initialisation: `"official"` (the official `simple_all` module's PyTorch `Linear` defaults,
            U(±1/√H) layer weights and biases, U(±1/√L) mixer, LayerNorm ε of the model) or `"mean_mixer"` (N(0, 1/H)
            weights, zero biases, mixer 1/L: the initial mask is the mean of the per-layer ReLU scores).
        sparsepo_mask_weight_decay (`float`, *optional*, defaults to `0.01`):
            Weight decay of the mask parameters (own optimizer group, same learning rate).
        mapo_hooks (`str`, *optional*, defaults to `"all"`):
            MaPO activations: `"all"` (MLP activation, attention projections, residual stream) or `"resid"`
            (decoder-layer outputs and final norm). The official `logits` hook is left out: no logits are built.
        mapo_degenerate_fill (`float`, *optional*, defaults to `1.0`):
            MaPO mask value for a sequence whose activations are constant or that has one completion token.
        aligndistil_beta2 (`float`, *optional*, defaults to `10.0`):
            AlignDistil β₂ (scale of the total variation in ω_t = β₂·TVD_t + 1e-3; 15 on-policy in the paper).
        aligndistil_temperature (`float`, *optional*, defaults to `1.0`):
            AlignDistil τ applied to student and teacher logits.
        aligndistil_mode (`str`, *optional*, defaults to `"aligndistil"`):
            `"aligndistil"` (adaptive contrastive teacher), or the ablations `"theorem1"` (uses the reference model),
            `"theorem1_contrast"` (constant ω) and `"theorem1_adaptive"` (adaptive ω, linear interpolation
            `ω_t·z^d + (1 − ω_t)·z^r` between the two teachers' logits, coefficient β/ω_t).
        aligndistil_len_norm (`bool`, *optional*, defaults to `True`):
            Divide each sequence's loss by its number of completion tokens.
        aligndistil_official_positions (`bool`, *optional*, defaults to `False`):
            Reproduce the official code's position masks: off-policy, positions predicting tokens 2..T+1 (off by
            one); on-policy, the causal shift without the position predicting the first response token.
        aligndistil_on_policy (`bool`, *optional*, defaults to `False`):
            On-policy AlignDistil: each step, one policy sample per prompt (temperature 1, no top-k/top-p), scored by
            the teachers, replaces the chosen response (the official on-policy recipe uses β₂ = 15).
        aligndistil_max_new_tokens (`int`, *optional*, defaults to `128`):
            Longest on-policy sample (the official recipe generates up to 1024).
        aligndistil_dpo_model_name_or_path (`str` or `None`), aligndistil_reverse_model_name_or_path (`str` or `None`):
            AlignDistil teachers (a DPO model and a reverse-DPO model, same tokenizer). Python users can pass
            `aligndistil_teachers=(dpo_model, reverse_model)` to the trainer instead.
        guidance_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            TGDPO online mode from the command line: path or Hub id of the frozen token-reward model (a DPO-trained
            model sharing the policy's tokenizer). Python users can pass `guidance_model=` to the trainer instead.

        > Safety

        stop_on_nonfinite (`bool` or `None`, *optional*, defaults to `None`):
            After every optimizer step, check the trainable weights and raise `FloatingPointError` (naming the step,
            the first bad parameter and the last checkpoint on disk) if any is NaN/inf, before the step is logged or
            saved: no checkpoint of broken weights is written and checkpoint rotation never removes the last good one.
            `None` turns it on for token-level methods and off for stock training (exactly TRL's behaviour).

    > [!NOTE]
    > Token-level losses are defined on the sigmoid DPO objective over summed log-ratios: they require
    > `loss_type="sigmoid"`, `ld_alpha=None`, `f_divergence_type="reverse_kl"` and `use_weighting=False`.
    """

    token_loss_type: str | None = field(
        default=None,
        metadata={
            "help": "Token-level loss: None (stock DPO), 'weighted', 'tgdpo', 'treg', 'cdpo', 'tdpo1', 'tdpo2', "
            "'sparsepo', 'mapo' or 'aligndistil'.",
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
        metadata={
            "help": "cDPO aggregation: 'sequence' (paper), 'per_token' (official code) or 'per_token_completion'.",
            "choices": list(CDPO_AGGREGATIONS),
        },
    )
    guidance_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "TGDPO online mode: frozen token-reward model (path or Hub id) sharing the tokenizer."},
    )
    token_kernel: str = field(
        default="auto",
        metadata={
            "help": "Full-distribution losses: 'torch' = fused one-pass tiling over both LM heads, 'triton' = the "
            "same fused pass as Triton kernels (CUDA; heads without bias/logit scale/softcap), 'trl' = TRL's "
            "log-prob head + TRL's chunked divergence, 'auto' = torch on CPU, trl on CUDA/XPU.",
            "choices": list(TOKEN_KERNELS),
        },
    )
    tdpo_alpha: float = field(default=0.5, metadata={"help": "TDPO2 alpha on the sequential-KL difference."})
    sparsepo_independent_masks: bool = field(
        default=False, metadata={"help": "SparsePO: separate reward and KL mask networks."}
    )
    sparsepo_l1_reward: float = field(default=0.0, metadata={"help": "SparsePO L1 penalty on the reward mask."})
    sparsepo_l1_kl: float = field(default=0.0, metadata={"help": "SparsePO L1 penalty on the KL mask."})
    sparsepo_mask_dropout: float = field(default=0.01, metadata={"help": "Dropout inside the SparsePO mask network."})
    sparsepo_mask_init: str = field(
        default="official",
        metadata={"help": "SparsePO mask initialisation.", "choices": list(SPARSEPO_MASK_INITS)},
    )
    sparsepo_mask_weight_decay: float = field(
        default=0.01, metadata={"help": "Weight decay of the SparsePO mask parameters."}
    )
    mapo_hooks: str = field(default="all", metadata={"help": "MaPO activation hooks.", "choices": list(MAPO_HOOK_SETS)})
    mapo_degenerate_fill: float = field(
        default=1.0, metadata={"help": "MaPO mask for constant-activation or one-token completions."}
    )
    aligndistil_beta2: float = field(default=10.0, metadata={"help": "AlignDistil beta2 (TVD scale of omega)."})
    aligndistil_temperature: float = field(default=1.0, metadata={"help": "AlignDistil temperature tau."})
    aligndistil_mode: str = field(
        default="aligndistil", metadata={"help": "AlignDistil teacher.", "choices": list(ALIGNDISTIL_MODES)}
    )
    aligndistil_len_norm: bool = field(default=True, metadata={"help": "AlignDistil per-sequence length norm."})
    aligndistil_official_positions: bool = field(
        default=False, metadata={"help": "Reproduce the official AlignDistil position masks."}
    )
    aligndistil_on_policy: bool = field(
        default=False, metadata={"help": "AlignDistil on a fresh policy sample per prompt (temperature 1)."}
    )
    aligndistil_max_new_tokens: int = field(
        default=128, metadata={"help": "Longest on-policy AlignDistil sample, in tokens."}
    )
    aligndistil_dpo_model_name_or_path: str | None = field(
        default=None, metadata={"help": "AlignDistil DPO teacher (path or Hub id)."}
    )
    aligndistil_reverse_model_name_or_path: str | None = field(
        default=None, metadata={"help": "AlignDistil reverse-DPO teacher (path or Hub id)."}
    )

    stop_on_nonfinite: bool | None = field(
        default=None,
        metadata={"help": "Stop with an error as soon as an optimizer step leaves NaN/inf trainable weights, before a "
                  "checkpoint of them is written (None: on for token-level methods, off for stock training)."},
    )  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        # Our own fields are checked whatever the method: a bad knob is a mistake even while its method is off.
        for name, value, choices in (
            ("token_kernel", self.token_kernel, TOKEN_KERNELS),
            ("mapo_hooks", self.mapo_hooks, MAPO_HOOK_SETS),
            ("sparsepo_mask_init", self.sparsepo_mask_init, SPARSEPO_MASK_INITS),
            ("aligndistil_mode", self.aligndistil_mode, ALIGNDISTIL_MODES),
            ("cdpo_aggregation", self.cdpo_aggregation, CDPO_AGGREGATIONS),
            ("treg_reg_form", self.treg_reg_form, TREG_REG_FORMS),
            ("treg_reg_reduction", self.treg_reg_reduction, TREG_REG_REDUCTIONS),
        ):
            check_choice(name, value, choices)
        self._check_ranges()
        if self.token_loss_type is None:
            return
        if self.token_loss_type not in TOKEN_LOSS_TYPES:
            raise ValueError(
                f"token_loss_type={self.token_loss_type!r} is not a token-level loss. Valid values: None (stock DPO), "
                + ", ".join(repr(name) for name in TOKEN_LOSS_TYPES)
                + "."
            )
        check_number("beta", self.beta, "every token-level loss scales its per-token log-ratios by beta (0 makes "
                     "the loss constant, a negative value reverses the preference)", low=0.0, low_open=True)  # fmt: skip
        # The token losses replace the sigmoid DPO objective on summed log-ratios; settings that change how the
        # sequence log-ratio is formed or reduced have no defined token-level meaning, so refuse them instead of
        # silently ignoring them.
        if self.loss_type != ["sigmoid"]:
            raise ValueError(
                f"token_loss_type={self.token_loss_type!r} is a token-level form of the sigmoid DPO loss, but "
                f"loss_type={self.loss_type}. Set loss_type='sigmoid' (the default) or token_loss_type=None."
            )
        if self.loss_weights not in (None, [1.0]):
            raise ValueError(
                f"loss_weights={self.loss_weights} weights TRL's list of loss types, which token-level losses replace. "
                "Scale the learning rate instead, or set token_loss_type=None."
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
        if self.token_loss_type in FULL_DISTRIBUTION_LOSS_TYPES:
            if self.precompute_ref_log_probs:
                raise ValueError(
                    f"token_loss_type={self.token_loss_type!r} needs the reference model's whole next-token "
                    "distribution at every completion token, which cannot be cached as log-prob sums. Set "
                    "precompute_ref_log_probs=False (use a LoRA adapter to keep the reference free in memory)."
                )
            if self.use_liger_kernel:
                raise ValueError(
                    f"use_liger_kernel=True (deprecated in TRL) is not supported with token_loss_type="
                    f"{self.token_loss_type!r}; select the chunked KL backend with token_kernel instead."
                )
        if self.guidance_model_name_or_path is not None and self.token_loss_type != "tgdpo":
            raise ValueError(
                "guidance_model_name_or_path is the TGDPO token-reward model; it is only used with "
                f"token_loss_type='tgdpo', not {self.token_loss_type!r}."
            )

    def _check_ranges(self) -> None:
        """Range of every numeric token-level knob (field, value, valid range and why in each message)."""
        non_negative = {
            "tgdpo_alpha": "it scales the token rewards into weights 1 ± α·β·r̂ (0 is plain DPO; a negative α swaps "
            "which tokens are up- and down-weighted)",
            "treg_alpha": "it weights the T-REG regulariser (0 is plain DPO; a negative weight rewards violating "
            "the token rewards)",
            "tdpo_alpha": "it weights the sequential-KL difference of TDPO2 (a negative weight rewards divergence "
            "from the reference)",
            "sparsepo_l1_reward": "it is an L1 penalty on the reward mask (a negative penalty rewards dense masks "
            "without bound)",
            "sparsepo_l1_kl": "it is an L1 penalty on the KL mask (a negative penalty rewards dense masks without "
            "bound)",
            "sparsepo_mask_weight_decay": "it is a weight decay",
        }
        for name, why in non_negative.items():
            check_number(name, getattr(self, name), why, low=0.0)
        check_number("tgdpo_min_weight", self.tgdpo_min_weight, "it clamps the TGDPO token weights from below",
                     optional=True)  # fmt: skip
        check_number("sparsepo_mask_dropout", self.sparsepo_mask_dropout, "it is a dropout probability (1 drops "
                     "every activation)", low=0.0, high=1.0, high_open=True)  # fmt: skip
        check_number("mapo_degenerate_fill", self.mapo_degenerate_fill, "MaPO masks are min-max rescaled "
                     "activations in [0, 1]", low=0.0, high=1.0)  # fmt: skip
        check_number("aligndistil_beta2", self.aligndistil_beta2, "it scales the total variation in "
                     "ω_t = β₂·TVD_t + 1e-3 and divides the token coefficient β/ω_t", low=0.0, low_open=True)  # fmt: skip
        check_number("aligndistil_temperature", self.aligndistil_temperature, "the logits are divided by it",
                     low=0.0, low_open=True)  # fmt: skip
