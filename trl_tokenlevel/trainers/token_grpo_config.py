"""Configuration for `TokenGRPOTrainer`: every `trl.GRPOConfig` field plus the token-level options."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..checks import check_choice, check_number, check_order

TOKEN_SELECTIONS = ("entropy_quantile", "entropy_band")
TOKEN_ADVANTAGES = ("ucas", "hapo", "gtpo", "d3s", "tw_grpo", "tempo")
# Methods whose rule looks at whole prompt groups (a group's completions must all be present when they run).
GROUP_TOKEN_ADVANTAGES = ("ucas", "hapo", "gtpo", "d3s", "tw_grpo", "tempo")
TOKEN_SHAPING_STAGES = ("auto", "loss", "rollout")
TOKEN_FN_OUTPUTS = ("advantages", "weights")
TOKEN_REWARD_SOURCES = ("rto",)
ENTROPY_SELECTIONS = ("quantile", "topk")
ENTROPY_NORMALIZATIONS = ("all", "selected")
ENTROPY_SCOPES = ("global", "local")
BAND_MODES = ("const", "quantile")
UCAS_CONFIDENCE_AGGREGATIONS = ("sum", "mean")
GTPO_ENTROPY_FILTERS = ("official",)
GTPO_CONFLICT_COUNTS = ("union", "official")
D3S_EQUAL_REWARDS = ("keep_first", "skip")
RMT_EXPONENT_FORMS = ("as_rendered", "scaled")
CHORD_WEIGHTINGS = ("phi", "none", "is")
# TRL loss types whose policy term is the PPO clipped surrogate (HAPO's per-token clip ranges plug into it).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
RMT_NTP_SOURCES = ("corpus", "unselected")
# TRL loss types without a token count in their normaliser (a constant, or a plain sum): dividing by the selected
# tokens (`entropy_normalize="selected"`) has no meaning for them.
UNCOUNTED_LOSS_TYPES = ("dr_grpo", "luspo")


@dataclass
class TokenGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`TokenGRPOTrainer`]: every [`~trl.GRPOConfig`] parameter keeps its meaning, and the
    parameters below add token-level credit assignment. With every token option at its default (`None`/off) training
    is exactly stock GRPO.

    Parameters:
        > Parameters that select the token-level method

        token_selection (`str` or `None`, *optional*, defaults to `None`):
            Which completion tokens carry the policy-gradient update. `"entropy_quantile"`: the top
            `entropy_top_ratio` highest-entropy ("forking") tokens (Beyond the 80/20 Rule,
            [paper](https://huggingface.co/papers/2506.01939)). `"entropy_band"`: the same forking tokens plus SPINE's
            entropy-band regulariser on them ([paper](https://huggingface.co/papers/2511.17938)). The selection masks
            the policy-gradient term only, exactly like TRL's `top_entropy_quantile`: a KL term (`beta > 0`) stays on
            every valid token, and the completion (attention) mask is never touched.
        token_advantage (`str` or `None`, *optional*, defaults to `None`):
            Per-token advantage method: `"ucas"` ([paper](https://huggingface.co/papers/2510.10649)), `"hapo"`
            ([paper](https://huggingface.co/papers/2509.16591)), `"gtpo"` (Simoni et al.,
            [paper](https://huggingface.co/papers/2508.03772); not the entropy-weighted GTPO of arXiv 2508.04349),
            `"d3s"` ([paper](https://huggingface.co/papers/2509.22115)), `"tw_grpo"`
            ([paper](https://huggingface.co/papers/2505.24718)) or `"tempo"` ([paper](https://huggingface.co/papers/2509.18314)).
            Python users can pass a callable `token_advantage_fn=` to the trainer instead.
        token_fn_output (`str`, *optional*, defaults to `"advantages"`):
            What a user `token_advantage_fn` returns: `"advantages"` (used as the `(B, T)` advantages) or `"weights"`
            (multiplied into the stock GRPO advantages).
        token_shaping_stage (`str`, *optional*, defaults to `"auto"`):
            Where per-token shaping runs. `"loss"`: in the update step, from the training forward's log-probs and
            entropy (no extra forward); needs `steps_per_generation=1` so that every micro-step holds whole prompt
            groups. `"rollout"`: once per generation batch, from one no-grad forward of TRL's fused head (TRL's own
            old-log-prob forward when it runs one). `"auto"`: `"loss"` when `steps_per_generation == 1`, else
            `"rollout"`.

        > Token selection (80/20 forking tokens, SPINE)

        entropy_top_ratio (`float`, *optional*, defaults to `0.2`):
            ρ, the fraction of highest-entropy tokens that carry the update.
        entropy_selection (`str`, *optional*, defaults to `"quantile"`):
            `"quantile"` (paper; TRL's `top_entropy_quantile` rule): threshold `quantile(H, 1 − ρ)`, ties kept.
            `"topk"` (official code): exactly `max(1, int(N·ρ + 0.9999))` tokens, per rank (needs
            `entropy_scope="local"`).
        entropy_normalize (`str`, *optional*, defaults to `"all"`):
            Denominator of the policy-gradient term: TRL's count of `"all"` valid tokens (paper; TRL's
            `top_entropy_quantile`) or of the `"selected"` ones (official code; not with `dr_grpo`/`luspo`, which
            divide by no token count). The KL term keeps the all-valid-token denominator either way.
        entropy_scope (`str`, *optional*, defaults to `"global"`):
            `"global"`: one threshold over the valid tokens of every rank (all-gathered). `"local"` (official code):
            this rank's tokens only.
        band_coef (`float`, *optional*, defaults to `0.1`), band_low (`float`, *optional*, defaults to `0.2`),
        band_high (`float`, *optional*, defaults to `2.0`):
            SPINE band `λ·mean_F[relu(H_low − H) + relu(H − H_high)]` on the forking tokens F ([recon] values, nats).
        band_mode (`str`, *optional*, defaults to `"const"`):
            `"const"` band, or `"quantile"`: H_low/H_high are the `band_quantile_low`/`band_quantile_high` quantiles
            of H over F.

        > Per-token advantage methods

        ucas_beta_pos (`float`, defaults to `0.25`), ucas_beta_neg (`float`, defaults to `0.35`),
        ucas_kappa (`float`, defaults to `0.05`), ucas_confidence_agg (`str`, defaults to `"sum"`):
            UCAS confidence modulation and logit-certainty penalty (official values).
        hapo_entropy_pivot (`float`, defaults to `0.8`), hapo_adv_beta (`float`, defaults to `1.0`),
        hapo_clip_alpha (`float`, defaults to `1.0`), hapo_temperature_tau (`float`, defaults to `0.05`):
            HAPO normalised-entropy pivot, advantage redistribution β, clip widening α and temperature τ.
        hapo_adaptive_clip (`bool`, defaults to `True`), hapo_adaptive_temperature (`bool`, defaults to `True`):
            HAPO's asymmetric per-token clip ranges in the loss, and its entropy-adaptive sampling temperature
            during rollouts (a `LogitsProcessor`; transformers generation only).
        hapo_repo_sign_compat (`bool`, defaults to `False`), hapo_fallback_include_padding (`bool`, defaults to `False`):
            Reproduce the official code's sign of ĥ and its TLGA fallback test on padded tensors.
        hapo_dual_clip (`float` or `None`, defaults to `10.0`):
            HAPO's PPO dual clip c (official `clip_ratio_c`): a token with A < 0 contributes at most `c·|A|` and stops
            pushing once its ratio exceeds c. `None` turns it off (TRL's plain clipped surrogate). Needs a clipped
            `loss_type`, token-level importance sampling, `c > 1 + ε_high·(1 + hapo_clip_alpha)` and `delta=None`
            (the trainer applies it through TRL's `delta` cap, the same function under these conditions).
        gtpo_conflict_weight (`float`, defaults to `2.0`), gtpo_entropy_threshold (`float`, defaults to `0.7`),
        gtpo_entropy_scale (`float`, defaults to `0.1`), gtpo_divide_by_n_conflict (`bool`, defaults to `False`),
        gtpo_n_conflict_count (`str`, defaults to `"union"`):
            GTPO conflict-token weight, entropy filter/shaping and the official code's per-completion division.
            Use `loss_type="grpo"` for the paper's per-completion mean.
        d3s_sample_keep_ratio_start / d3s_sample_keep_ratio_end (`float`, defaults to `0.5` / `1.0`),
        d3s_token_keep_ratio_start / d3s_token_keep_ratio_end (`float`, defaults to `0.2` / `1.0`),
        d3s_schedule_steps (`int` or `None`, defaults to `None` = `max_steps`):
            D³S down-sampling ratios, relaxed linearly from start to end over the schedule ([recon]).
        d3s_recompute_adv_after_downsample (`bool`, defaults to `True`), d3s_equal_rewards (`str`, defaults to
        `"keep_first"`), d3s_mask_dropped_tokens (`bool`, defaults to `True`):
            Recompute group advantages on the kept rollouts; what to do with all-equal groups; normalise the loss
            over the kept tokens only (the dropped ones leave the loss mask).
        tw_alpha (`float`, defaults to `1.7`), tw_vocab_chunk (`int`, defaults to `8192`):
            TW-GRPO maximal position weight α and the vocabulary tile of the chunked divergence.
        tempo_lambda (`float`, defaults to `1.0`):
            TEMPO weight of the branch-point TD term ([unverified]).

        > Token rewards, RMT and CHORD

        token_reward_source (`str` or `None`, defaults to `None`):
            `"rto"`: dense token rewards `clip(scale·[log π_dpo − log π_ref], ±clip)` from a DPO model
            (RTO, [paper](https://huggingface.co/papers/2404.18922)); their return-to-go, times `token_reward_coef`,
            is added to the per-token advantages.
        token_reward_model_name_or_path (`str` or `None`), token_reward_ref_model_name_or_path (`str` or `None`):
            The DPO model and its reference (default: the policy's initial weights). Python users can pass
            `token_reward_model=` / `token_reward_ref_model=` to the trainer.
        token_reward_scale (`float`, defaults to `0.05`), token_reward_clip (`float`, defaults to `0.05`),
        token_reward_coef (`float`, defaults to `1.0`):
            RTO β₁ and clip, and the weight of the return-to-go in the advantage ([recon]).
        rmt_budget_init (`int` or `None`), rmt_budget_min (`int`, defaults to `1`), rmt_gamma (`float`, defaults to
        `0.5`), rmt_k (`float`, defaults to `1.0`), rmt_exponent_form (`str`, defaults to `"as_rendered"`),
        rmt_length_reward_weight (`float`, defaults to `1.0`), rmt_length_reward_width (`float` or `None`):
            RMT dynamic token budget `max(B_min, B_0·γ^x)` and its triangular length reward, added as one more
            reward function when `rmt_budget_init` is set (no published defaults: [recon] knobs).
        rmt_ntp_coef (`float`, defaults to `0.0`), rmt_ntp_source (`str`, defaults to `"corpus"`):
            RMT dual objective [recon]: `λ·mean(−log π)` of next-token prediction. `"corpus"`: on the corpus tokens of
            the batch's documents other than the RL targets (rows built by `trl_tokenlevel.data.rmt.build_rmt_dataset`,
            columns `rmt_document_ids`, `rmt_target_position`; one more forward with gradient). `"unselected"`: on the
            valid completion tokens that the token selection left out (a transposition to rollouts; needs
            `token_selection`).
        chord (`bool`, defaults to `False`):
            CHORD ([paper](https://huggingface.co/papers/2508.11408)): mix an expert SFT loss into GRPO,
            `(1 − μ)·L_GRPO + μ·L_SFT`, with φ(p) = p(1 − p) token weights. Needs an expert dataset
            (`expert_dataset=` or `chord_expert_dataset_name`).
        chord_expert_dataset_name (`str` or `None`), chord_expert_dataset_split (`str`, defaults to `"train"`):
            Expert dataset (`prompt` + `completion` columns, plain text or conversational) for the command line.
        chord_expert_data_ratio (`float`, defaults to `0.2`):
            Fraction of expert rows in each micro-step (`k = max(1, round(B·r/(1 − r)))` expert rows beside B rollouts).
        chord_mu_warmup_steps (`int`, defaults to `200`), chord_mu_decay_steps (`int`, defaults to `400`),
        chord_mu_peak (`float`, defaults to `0.5`), chord_mu_valley (`float`, defaults to `0.02`):
            μ schedule (`mix_chord.yaml`).
        chord_weighting (`str`, defaults to `"phi"`), chord_cutoff_prob (`float`, defaults to `1.0`),
        chord_token_level_loss (`bool`, defaults to `True`):
            CHORD-φ (`"phi"`), CHORD-μ (`"none"`, plain NLL) or `"is"` (DFT); probability cutoff; token-mean (True) or
            mean of per-sequence token means.

        > Safety

        stop_on_nonfinite (`bool` or `None`, *optional*, defaults to `None`):
            After every optimizer step, check the trainable weights and raise `FloatingPointError` (naming the step,
            the first bad parameter and the last checkpoint on disk) if any is NaN/inf, before the step is logged or
            saved: no checkpoint of broken weights is written and checkpoint rotation never removes the last good one.
            `None` turns it on for token-level methods and off for stock training (exactly TRL's behaviour).

    > [!NOTE]
    > Token options are opt-in and independent: a selection, an advantage method, a token-reward source, RMT and
    > CHORD can be combined. TRL's own `top_entropy_quantile` must stay at 1.0 when `token_selection` is set.
    """

    # --- method selection ---------------------------------------------------------------------------------------
    token_selection: str | None = field(
        default=None,
        metadata={
            "help": "Token selection: None, 'entropy_quantile' (80/20) or 'entropy_band' (SPINE).",
            "choices": [None, *TOKEN_SELECTIONS],
        },
    )
    token_advantage: str | None = field(
        default=None,
        metadata={
            "help": "Per-token advantage method: None, 'ucas', 'hapo', 'gtpo', 'd3s', 'tw_grpo' or 'tempo'.",
            "choices": [None, *TOKEN_ADVANTAGES],
        },
    )
    token_fn_output: str = field(
        default="advantages",
        metadata={
            "help": "What a token_advantage_fn returns: 'advantages' or 'weights'.",
            "choices": list(TOKEN_FN_OUTPUTS),
        },
    )
    token_shaping_stage: str = field(
        default="auto",
        metadata={
            "help": "Where per-token shaping runs: 'auto', 'loss' (training forward) or 'rollout'.",
            "choices": list(TOKEN_SHAPING_STAGES),
        },
    )
    # --- selection -----------------------------------------------------------------------------------------------
    entropy_top_ratio: float = field(default=0.2, metadata={"help": "rho: fraction of highest-entropy tokens kept."})
    entropy_selection: str = field(
        default="quantile",
        metadata={
            "help": "'quantile' (paper, ties kept) or 'topk' (official code).",
            "choices": list(ENTROPY_SELECTIONS),
        },
    )
    entropy_normalize: str = field(
        default="all",
        metadata={
            "help": "Loss denominator: 'all' valid tokens (paper) or 'selected' (official code).",
            "choices": list(ENTROPY_NORMALIZATIONS),
        },
    )
    entropy_scope: str = field(
        default="global",
        metadata={
            "help": "'global' threshold over all ranks, or 'local' (this rank).",
            "choices": list(ENTROPY_SCOPES),
        },
    )
    band_coef: float = field(default=0.1, metadata={"help": "SPINE band coefficient lambda_band."})
    band_low: float = field(default=0.2, metadata={"help": "SPINE band lower entropy H_low (nats)."})
    band_high: float = field(default=2.0, metadata={"help": "SPINE band upper entropy H_high (nats)."})
    band_mode: str = field(
        default="const", metadata={"help": "SPINE band: 'const' or 'quantile'.", "choices": list(BAND_MODES)}
    )
    band_quantile_low: float = field(default=0.1, metadata={"help": "SPINE band_mode='quantile': lower quantile."})
    band_quantile_high: float = field(default=0.9, metadata={"help": "SPINE band_mode='quantile': upper quantile."})
    # --- UCAS ----------------------------------------------------------------------------------------------------
    ucas_beta_pos: float = field(default=0.25, metadata={"help": "UCAS beta+ (positive advantages)."})
    ucas_beta_neg: float = field(default=0.35, metadata={"help": "UCAS beta- (non-positive advantages)."})
    ucas_kappa: float = field(default=0.05, metadata={"help": "UCAS kappa, weight of the logit-certainty penalty."})
    ucas_confidence_agg: str = field(
        default="sum",
        metadata={
            "help": "UCAS response confidence: 'sum' or 'mean'.",
            "choices": list(UCAS_CONFIDENCE_AGGREGATIONS),
        },
    )
    ucas_norm_adv_by_std: bool = field(default=True, metadata={"help": "UCAS: divide group z-scores by the std."})
    # --- HAPO ----------------------------------------------------------------------------------------------------
    hapo_entropy_pivot: float = field(default=0.8, metadata={"help": "HAPO pivot quantile of log-entropy."})
    hapo_adv_beta: float = field(default=1.0, metadata={"help": "HAPO advantage redistribution beta."})
    hapo_clip_alpha: float = field(default=1.0, metadata={"help": "HAPO clip widening alpha."})
    hapo_adaptive_clip: bool = field(default=True, metadata={"help": "HAPO per-token asymmetric clip ranges."})
    hapo_adaptive_temperature: bool = field(
        default=True, metadata={"help": "HAPO entropy-adaptive sampling temperature during rollouts."}
    )
    hapo_temperature_tau: float = field(default=0.05, metadata={"help": "HAPO temperature tau."})
    hapo_repo_sign_compat: bool = field(default=False, metadata={"help": "Reproduce the official HAPO sign bug."})
    hapo_fallback_include_padding: bool = field(
        default=False, metadata={"help": "Reproduce the official TLGA fallback test on padded tensors."}
    )
    hapo_dual_clip: float | None = field(
        default=10.0, metadata={"help": "HAPO PPO dual-clip c for negative advantages (official 10; None: off)."}
    )
    # --- GTPO ----------------------------------------------------------------------------------------------------
    gtpo_conflict_weight: float = field(default=2.0, metadata={"help": "GTPO weight W of conflict tokens."})
    gtpo_entropy_threshold: float = field(default=0.7, metadata={"help": "GTPO mean-entropy filter threshold."})
    gtpo_entropy_scale: float = field(default=0.1, metadata={"help": "GTPO entropy shaping gamma."})
    gtpo_entropy_filter: str = field(
        default="official", metadata={"help": "GTPO entropy filter.", "choices": list(GTPO_ENTROPY_FILTERS)}
    )
    gtpo_divide_by_n_conflict: bool = field(
        default=False, metadata={"help": "GTPO: divide by the conflict-token count (official code)."}
    )
    gtpo_n_conflict_count: str = field(
        default="union", metadata={"help": "GTPO conflict count.", "choices": list(GTPO_CONFLICT_COUNTS)}
    )
    # --- D3S -----------------------------------------------------------------------------------------------------
    d3s_sample_keep_ratio_start: float = field(default=0.5, metadata={"help": "D3S rollout keep ratio at step 0."})
    d3s_sample_keep_ratio_end: float = field(default=1.0, metadata={"help": "D3S rollout keep ratio at the end."})
    d3s_token_keep_ratio_start: float = field(default=0.2, metadata={"help": "D3S token keep ratio at step 0."})
    d3s_token_keep_ratio_end: float = field(default=1.0, metadata={"help": "D3S token keep ratio at the end."})
    d3s_schedule_steps: int | None = field(
        default=None, metadata={"help": "D3S schedule length in optimizer steps (None: max_steps)."}
    )
    d3s_recompute_adv_after_downsample: bool = field(
        default=True, metadata={"help": "D3S: recompute group advantages on the kept rollouts."}
    )
    d3s_equal_rewards: str = field(
        default="keep_first", metadata={"help": "D3S all-equal groups.", "choices": list(D3S_EQUAL_REWARDS)}
    )
    d3s_mask_dropped_tokens: bool = field(
        default=True, metadata={"help": "D3S: drop unkept tokens from the loss mask (token-mean over kept tokens)."}
    )
    # --- TW-GRPO / TEMPO -----------------------------------------------------------------------------------------
    tw_alpha: float = field(default=1.7, metadata={"help": "TW-GRPO alpha (maximal position weight)."})
    tw_vocab_chunk: int = field(default=8192, metadata={"help": "TW-GRPO vocabulary tile of the chunked divergence."})
    tempo_lambda: float = field(default=1.0, metadata={"help": "TEMPO weight of the branch-point TD term."})
    # --- RTO token rewards ---------------------------------------------------------------------------------------
    token_reward_source: str | None = field(
        default=None, metadata={"help": "Dense token rewards: None or 'rto'.", "choices": [None, *TOKEN_REWARD_SOURCES]}
    )
    token_reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "RTO: DPO model giving the token rewards (path or Hub id)."}
    )
    token_reward_ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "RTO: reference of the DPO model (default: the policy's initial weights)."}
    )
    token_reward_scale: float = field(default=0.05, metadata={"help": "RTO beta1 (scale of the DPO log-ratio)."})
    token_reward_clip: float = field(default=0.05, metadata={"help": "RTO clip of the token reward (0: none)."})
    token_reward_coef: float = field(default=1.0, metadata={"help": "Weight of the token-reward return-to-go."})
    # --- RMT -----------------------------------------------------------------------------------------------------
    rmt_budget_init: int | None = field(default=None, metadata={"help": "RMT initial token budget B_0 (None: off)."})
    rmt_budget_min: int = field(default=1, metadata={"help": "RMT minimal token budget B_min."})
    rmt_gamma: float = field(default=0.5, metadata={"help": "RMT budget decay gamma in (0, 1)."})
    rmt_k: float = field(default=1.0, metadata={"help": "RMT budget exponent k."})
    rmt_exponent_form: str = field(
        default="as_rendered", metadata={"help": "RMT exponent form.", "choices": list(RMT_EXPONENT_FORMS)}
    )
    rmt_length_reward_weight: float = field(default=1.0, metadata={"help": "RMT length reward weight."})
    rmt_length_reward_width: float | None = field(
        default=None, metadata={"help": "RMT length reward half-width (None: the budget)."}
    )
    rmt_ntp_coef: float = field(default=0.0, metadata={"help": "RMT next-token-prediction coefficient."})
    rmt_ntp_source: str = field(
        default="corpus",
        metadata={"help": "RMT NTP tokens: 'corpus' (documents minus targets) or 'unselected' (rollout tokens)."},
    )
    # --- CHORD ---------------------------------------------------------------------------------------------------
    chord: bool = field(default=False, metadata={"help": "CHORD: mix an expert SFT loss into GRPO."})
    chord_expert_dataset_name: str | None = field(
        default=None, metadata={"help": "CHORD expert dataset (prompt + completion columns)."}
    )
    chord_expert_dataset_split: str = field(default="train", metadata={"help": "CHORD expert dataset split."})
    chord_expert_data_ratio: float = field(default=0.2, metadata={"help": "CHORD fraction of expert rows."})
    chord_mu_warmup_steps: int = field(default=200, metadata={"help": "CHORD mu warmup steps."})
    chord_mu_decay_steps: int = field(default=400, metadata={"help": "CHORD mu cosine decay steps."})
    chord_mu_peak: float = field(default=0.5, metadata={"help": "CHORD mu peak."})
    chord_mu_valley: float = field(default=0.02, metadata={"help": "CHORD mu floor."})
    chord_weighting: str = field(
        default="phi",
        metadata={"help": "CHORD token weight: 'phi', 'none' or 'is'.", "choices": list(CHORD_WEIGHTINGS)},
    )
    chord_cutoff_prob: float = field(default=1.0, metadata={"help": "CHORD probability cutoff (1: off)."})
    chord_token_level_loss: bool = field(default=True, metadata={"help": "CHORD token-mean (True) or sequence mean."})

    stop_on_nonfinite: bool | None = field(
        default=None,
        metadata={"help": "Stop with an error as soon as an optimizer step leaves NaN/inf trainable weights, before a "
                  "checkpoint of them is written (None: on for token-level methods, off for stock training)."},
    )  # fmt: skip

    @property
    def token_features_enabled(self) -> bool:
        """True when any token-level option is set (False: the trainer is stock GRPO)."""
        return (
            self.token_selection is not None
            or self.token_advantage is not None
            or self.token_reward_source is not None
            or self.rmt_budget_init is not None
            or self.rmt_ntp_coef != 0.0
            or self.chord
        )

    def __post_init__(self):
        super().__post_init__()
        for name, value, choices in (
            ("token_selection", self.token_selection, (None, *TOKEN_SELECTIONS)),
            ("token_advantage", self.token_advantage, (None, *TOKEN_ADVANTAGES)),
            ("token_fn_output", self.token_fn_output, TOKEN_FN_OUTPUTS),
            ("token_shaping_stage", self.token_shaping_stage, TOKEN_SHAPING_STAGES),
            ("token_reward_source", self.token_reward_source, (None, *TOKEN_REWARD_SOURCES)),
            ("entropy_selection", self.entropy_selection, ENTROPY_SELECTIONS),
            ("entropy_normalize", self.entropy_normalize, ENTROPY_NORMALIZATIONS),
            ("entropy_scope", self.entropy_scope, ENTROPY_SCOPES),
            ("band_mode", self.band_mode, BAND_MODES),
            ("ucas_confidence_agg", self.ucas_confidence_agg, UCAS_CONFIDENCE_AGGREGATIONS),
            ("gtpo_n_conflict_count", self.gtpo_n_conflict_count, GTPO_CONFLICT_COUNTS),
            ("d3s_equal_rewards", self.d3s_equal_rewards, D3S_EQUAL_REWARDS),
            ("rmt_exponent_form", self.rmt_exponent_form, RMT_EXPONENT_FORMS),
            ("chord_weighting", self.chord_weighting, CHORD_WEIGHTINGS),
        ):
            check_choice(name, value, choices)
        if self.gtpo_entropy_filter not in GTPO_ENTROPY_FILTERS:
            raise ValueError(
                f"gtpo_entropy_filter={self.gtpo_entropy_filter!r}: only the official rule is available in the "
                "trainer. The README rule needs each completion's entropy under the initial policy, which the trainer "
                "does not compute; call `trl_tokenlevel.ops.advantages.gtpo_token_advantages` with "
                "`initial_mean_entropy` from a `token_advantage_fn` instead."
            )
        self._check_ranges()
        # Method knobs that do nothing without their method: refuse them rather than silently ignore them.
        if self.rmt_ntp_source not in RMT_NTP_SOURCES:
            raise ValueError(f"rmt_ntp_source={self.rmt_ntp_source!r}; valid values: {', '.join(RMT_NTP_SOURCES)}.")
        if self.rmt_ntp_coef != 0.0 and self.rmt_ntp_source == "unselected" and self.token_selection is None:
            raise ValueError(
                "rmt_ntp_coef > 0 with rmt_ntp_source='unselected' trains next-token prediction on the completion "
                "tokens that the token selection left out; set token_selection (e.g. 'entropy_quantile'), "
                "rmt_ntp_source='corpus' or rmt_ntp_coef=0."
            )
        if self.token_reward_source is None and (
            self.token_reward_model_name_or_path is not None or self.token_reward_ref_model_name_or_path is not None
        ):
            raise ValueError("token_reward_model_name_or_path is only used with token_reward_source='rto'.")
        if self.chord_expert_dataset_name is not None and not self.chord:
            raise ValueError("chord_expert_dataset_name is CHORD's expert data: set chord=True to use it.")
        if not self.token_features_enabled:
            return

        if self.token_selection is not None:
            if self.top_entropy_quantile < 1.0:
                raise ValueError(
                    f"token_selection={self.token_selection!r} and TRL's top_entropy_quantile="
                    f"{self.top_entropy_quantile} both select high-entropy tokens. Keep top_entropy_quantile=1.0 "
                    "(token_selection='entropy_quantile' with the defaults is the same rule, global across ranks)."
                )
            if self.entropy_selection == "topk" and self.entropy_scope != "local":
                raise ValueError(
                    "entropy_selection='topk' reproduces the official per-rank rule and cannot be global. Set "
                    "entropy_scope='local' with it, or use entropy_selection='quantile' for a global threshold."
                )
            if self.entropy_normalize == "selected" and self.loss_type in UNCOUNTED_LOSS_TYPES:
                raise ValueError(
                    f"entropy_normalize='selected' divides by the selected tokens, but loss_type={self.loss_type!r} "
                    "divides by no token count (dr_grpo: the constant B·max_completion_length; luspo: a plain sum). "
                    "Use loss_type='dapo' (or 'grpo'/'bnpo'/'cispo'/'vespo'/'sapo') with it."
                )
        if self.rmt_budget_init is not None:
            check_order("rmt_budget_min", self.rmt_budget_min, "rmt_budget_init", self.rmt_budget_init,
                        "the budget decays from B_0 down to B_min")  # fmt: skip
        if self.token_advantage == "hapo":
            if self.hapo_adaptive_clip and self.loss_type not in CLIPPED_LOSS_TYPES:
                raise ValueError(
                    f"hapo_adaptive_clip=True sets per-token clip ranges of the PPO surrogate, but loss_type="
                    f"{self.loss_type!r} is not a clipped loss. Use one of {CLIPPED_LOSS_TYPES} or set "
                    "hapo_adaptive_clip=False."
                )
            if self.hapo_adaptive_clip and self.importance_sampling_level != "token":
                raise ValueError("hapo_adaptive_clip=True needs importance_sampling_level='token' (per-token ratios).")
            if self.hapo_dual_clip is not None:
                self._check_hapo_dual_clip()
            if self.hapo_adaptive_temperature and (self.use_vllm or self.use_transformers_continuous_batching):
                raise ValueError(
                    "hapo_adaptive_temperature=True needs transformers `generate` (a LogitsProcessor); vLLM and "
                    "continuous batching have no Python processor hook. Set hapo_adaptive_temperature=False."
                )
        if self.token_shaping_stage == "loss" and self.steps_per_generation != 1:
            raise ValueError(
                f"token_shaping_stage='loss' shapes each micro-step from the training forward, which needs every "
                f"micro-step to hold whole prompt groups, i.e. steps_per_generation=1 (got {self.steps_per_generation}; "
                "it defaults to gradient_accumulation_steps). Set steps_per_generation=1, or "
                "token_shaping_stage='rollout' (or 'auto')."
            )

    def _check_hapo_dual_clip(self) -> None:
        fix = "or set hapo_dual_clip=None"
        if self.loss_type not in CLIPPED_LOSS_TYPES or self.importance_sampling_level != "token":
            raise ValueError(
                f"hapo_dual_clip={self.hapo_dual_clip} caps the per-token PPO surrogate: it needs a clipped loss_type "
                f"{CLIPPED_LOSS_TYPES} and importance_sampling_level='token', got loss_type={self.loss_type!r} and "
                f"importance_sampling_level={self.importance_sampling_level!r}; change them {fix}."
            )
        if self.delta is not None:
            raise ValueError(
                f"hapo_dual_clip={self.hapo_dual_clip} and delta={self.delta} both cap the unclipped ratio (the trainer "
                f"applies the dual clip through TRL's `delta`): set delta=None {fix}."
            )
        epsilon_high = self.epsilon_high if self.epsilon_high is not None else self.epsilon
        widest = 1 + epsilon_high * (1 + (self.hapo_clip_alpha if self.hapo_adaptive_clip else 0.0))
        if not self.hapo_dual_clip > widest:
            raise ValueError(
                f"hapo_dual_clip={self.hapo_dual_clip} must exceed the widest upper clip bound 1 + ε_high·(1 + α) = "
                f"{widest:g} (epsilon_high={epsilon_high}, hapo_clip_alpha={self.hapo_clip_alpha}): the dual clip "
                f"caps ratios beyond the clip range (official c = 10); raise it {fix}."
            )

    def _check_ranges(self) -> None:
        """Range of every numeric token-level knob (field, value, valid range and why in each message).

        Checked whatever the method: a bad knob is a mistake even while its method is off (all defaults pass).
        """
        fractions = {
            "entropy_top_ratio": "it is the fraction of valid tokens that carry the update (0 would train on none)",
            "d3s_sample_keep_ratio_start": "it is the fraction of each group's rollouts kept (0 would keep none)",
            "d3s_sample_keep_ratio_end": "it is the fraction of each group's rollouts kept (0 would keep none)",
            "d3s_token_keep_ratio_start": "it is the fraction of tokens kept (0 would keep none)",
            "d3s_token_keep_ratio_end": "it is the fraction of tokens kept (0 would keep none)",
            "chord_cutoff_prob": "it is a probability cutoff (1 is off; 0 would clamp every log-probability to -inf)",
        }
        for name, why in fractions.items():
            check_number(name, getattr(self, name), why, low=0.0, high=1.0, low_open=True)
        quantiles = {
            "band_quantile_low": "it is a quantile of the forking tokens' entropies",
            "band_quantile_high": "it is a quantile of the forking tokens' entropies",
            "hapo_entropy_pivot": "it is the quantile q of the log-entropies that HAPO pivots on",
            "chord_mu_peak": "μ mixes (1 − μ)·GRPO + μ·SFT",
            "chord_mu_valley": "μ mixes (1 − μ)·GRPO + μ·SFT",
        }
        for name, why in quantiles.items():
            check_number(name, getattr(self, name), why, low=0.0, high=1.0)
        non_negative = {
            "band_coef": "it weights the SPINE band penalty (a negative weight pushes entropies out of the band)",
            "band_low": "it is an entropy in nats (entropies are >= 0)",
            "band_high": "it is an entropy in nats (entropies are >= 0)",
            "ucas_beta_pos": "it sets the strength of UCAS's confidence modulation (a negative value reverses it)",
            "ucas_beta_neg": "it sets the strength of UCAS's confidence modulation (a negative value reverses it)",
            "ucas_kappa": "it weights UCAS's logit-certainty penalty (a negative weight rewards over-confidence)",
            "hapo_adv_beta": "it sets how strongly HAPO redistributes the advantage over tokens",
            "hapo_clip_alpha": "it widens HAPO's clip ranges (a negative value narrows them below PPO's)",
            "gtpo_conflict_weight": "it multiplies the advantage of conflict tokens (a negative one flips their sign)",
            "gtpo_entropy_threshold": "it is a mean entropy in nats (entropies are >= 0)",
            "gtpo_entropy_scale": "it scales GTPO's entropy shaping",
            "tempo_lambda": "it weights TEMPO's branch-point TD term",
            "token_reward_scale": "it is RTO's β₁ on the DPO log-ratio (a negative value reverses the token rewards)",
            "token_reward_clip": "it is the clip of |token reward| (0: no clip)",
            "token_reward_coef": "it weights the token-reward return-to-go (a negative one reverses the rewards)",
            "rmt_length_reward_weight": "it weights RMT's length reward",
            "rmt_ntp_coef": "it weights the NTP loss on unselected tokens (a negative weight is unlikelihood "
            "training, unbounded below)",
        }
        for name, why in non_negative.items():
            check_number(name, getattr(self, name), why, low=0.0)
        check_order("band_low", self.band_low, "band_high", self.band_high,
                    "the SPINE band [H_low, H_high] would be empty")  # fmt: skip
        check_order("band_quantile_low", self.band_quantile_low, "band_quantile_high", self.band_quantile_high,
                    "the SPINE band's quantile range would be empty")  # fmt: skip
        check_order("chord_mu_valley", self.chord_mu_valley, "chord_mu_peak", self.chord_mu_peak,
                    "μ decays from its peak down to its floor")  # fmt: skip
        check_number("hapo_temperature_tau", self.hapo_temperature_tau, "the sampling temperature T·(1 + τ·ĥ) with "
                     "ĥ in [-1, 1] must stay positive", low=0.0, high=1.0, high_open=True)  # fmt: skip
        check_number("hapo_dual_clip", self.hapo_dual_clip, "a ratio cap c <= 1 would cut inside PPO's clip range",
                     low=1.0, low_open=True, optional=True)  # fmt: skip
        check_number("tw_alpha", self.tw_alpha, "it is the largest TW-GRPO position weight (weights run from 1 to "
                     "α; 1 is uniform GRPO, below 1 the most divergent tokens would weigh least)", low=1.0)  # fmt: skip
        check_number("tw_vocab_chunk", self.tw_vocab_chunk, "it is a tile width in tokens", low=1, integer=True)
        check_number("d3s_schedule_steps", self.d3s_schedule_steps, "it is a number of optimizer steps", low=1,
                     integer=True, optional=True)  # fmt: skip
        check_number("rmt_budget_init", self.rmt_budget_init, "it is a token budget", low=1, integer=True,
                     optional=True)  # fmt: skip
        check_number("rmt_budget_min", self.rmt_budget_min, "it is a token budget", low=1, integer=True)
        check_number("rmt_gamma", self.rmt_gamma, "the budget decays geometrically as B_0·γ^x",
                     low=0.0, high=1.0, low_open=True, high_open=True)  # fmt: skip
        check_number("rmt_k", self.rmt_k, "it is the exponent of the budget schedule", low=0.0, low_open=True)
        check_number("rmt_length_reward_width", self.rmt_length_reward_width, "it is the half-width of the "
                     "triangular length reward, in tokens", low=0.0, low_open=True, optional=True)  # fmt: skip
        check_number("chord_expert_data_ratio", self.chord_expert_data_ratio, "it is the share of expert rows "
                     "beside the rollouts (1 would leave no rollouts)", low=0.0, high=1.0, low_open=True,
                     high_open=True)  # fmt: skip
        for name in ("chord_mu_warmup_steps", "chord_mu_decay_steps"):
            check_number(name, getattr(self, name), "it is a number of optimizer steps", low=0, integer=True)

    @property
    def resolved_token_shaping_stage(self) -> str:
        """`token_shaping_stage` with `"auto"` resolved."""
        if self.token_shaping_stage != "auto":
            return self.token_shaping_stage
        return "loss" if self.steps_per_generation == 1 else "rollout"
