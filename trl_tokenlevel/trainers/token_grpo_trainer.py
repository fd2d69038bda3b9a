"""`TokenGRPOTrainer`: TRL's `GRPOTrainer` with per-token advantages, token selection and token rewards.

With no token option set, every override defers to `GRPOTrainer`, so training is stock GRPO. With token options:

1. Rollout (`_generate_and_score_completions`): `super()` generates and scores as usual; we add the rollout's group
   ids and summed rewards as extra `(B,)` tensors (they travel through TRL's shuffle/split like its own), optional
   dense token rewards (RTO) and, with HAPO, sample with the entropy-adaptive temperature processor.
2. Shaping (`_shape_token_batch`): builds a `TokenAdvantageInputs` batch (ids, mask, per-token log-probs and entropy
   from TRL's fused LM head, rewards, group ids, stock advantages), all-gathered across ranks so groups are whole,
   calls `compute_token_advantages` (a user `token_advantage_fn`, or a method of
   `trl_tokenlevel.ops.advantages.TOKEN_ADVANTAGE_METHODS`), writes `(B, T)` advantages (TRL's loss unsqueezes only
   1-D ones), the token selection as its own `(B, T)` tensor `tl_selected`, D³S's dropped tokens into `tool_mask`
   (never `completion_mask`, which is also the attention mask) with `num_items_in_batch` recounted, and HAPO's
   per-token clip ranges. It runs either in the update step from the
   training forward ("loss" stage: no extra forward) or once per generation batch from one no-grad fused forward
   ("rollout" stage, used when a micro-step does not hold whole groups).
3. Loss (`_compute_loss`): TRL's loss on the shaped batch, reusing our single training forward, plus SPINE's band
   term, RMT's NTP term and CHORD's expert SFT mix. The token selection goes through TRL's own `top_entropy_quantile`
   branch (`get_high_entropy_mask` returns it): it masks the policy-gradient term only, and the KL stays on every
   valid token, as in the spec and in TRL's 80/20 rule.

The math lives in `trl_tokenlevel.ops`; this file moves tensors, gathers across ranks and logs metrics.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import LogitsProcessorList, PreTrainedModel
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import apply_chat_template, is_conversational
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, get_config_model_id

from ..checks import check_same_vocabulary
from ..generation.processors import AdaptiveTemperatureLogitsProcessor
from ..ops.advantages import (
    TOKEN_ADVANTAGE_METHODS,
    TokenAdvantageInputs,
    d3s_keep_ratio,
    hapo_clip_bounds,
    hapo_entropy_stats,
    hapo_normalized_entropy,
    rmt_ntp_loss,
    tw_grpo_weights_from_divergence,
)
from ..ops.chunked import chunked_tw_grpo_divergence, chunked_ucas_statistics, lm_head_params
from ..ops.decoding import hapo_adaptive_temperature, next_token_entropy
from ..ops.preference import rto_token_rewards
from ..ops.selection import all_gather_variable_length, high_entropy_token_mask, spine_entropy_band_penalty
from ..ops.sft import chord_mu, chord_sft_loss
from ..rewards.grpo_rewards import RMTLengthReward
from ..signals.preference import token_implicit_rewards
from .guards import NonFiniteWeightsGuard, check_policy, nonfinite_guard_enabled
from .hooks import capture_last_hidden_state, causal_lm_of
from .token_grpo_config import TokenGRPOConfig

# Methods that read the backbone's last hidden state (captured by a hook during the forward that runs anyway).
_HIDDEN_STATE_METHODS = ("ucas", "tw_grpo")


@dataclass
class TokenGRPOBatch(TokenAdvantageInputs):
    """The rollout batch handed to `compute_token_advantages`: every `TokenAdvantageInputs` field (all-gathered across
    ranks, so every prompt group is whole) plus ``token_rewards`` (B, T), the dense token rewards of the
    `token_reward_source` (RTO), 0 on padding.

    Method statistics the trainer builds from hidden states (no `(B, T, V)` tensor): ``self_certainty`` and
    ``sampled_token_logits`` (UCAS), ``tw_grpo_divergence`` (TW-GRPO, in vocabulary tiles).
    """

    token_rewards: torch.Tensor | None = None


def _return_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`G_t = Σ_{t' ≥ t} r_{t'}` over the valid tokens of each row (γ = 1), 0 on padding."""
    rewards = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    return torch.where(mask.bool(), rewards.flip(1).cumsum(1).flip(1), torch.zeros_like(rewards))


class _RecordingAdaptiveTemperature(AdaptiveTemperatureLogitsProcessor):
    """HAPO's adaptive-temperature processor that also records the mean sampling temperature (a logged metric)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature_sum, self.temperature_count = 0.0, 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        entropy = next_token_entropy(scores / self.temperature)
        row_temperature = hapo_adaptive_temperature(entropy, self.stats, self.temperature, self.tau)
        self.temperature_sum += float(row_temperature.sum())
        self.temperature_count += row_temperature.numel()
        return scores / row_temperature.unsqueeze(-1).to(scores.dtype)


class _ExpertBatches:
    """CHORD expert rows, tokenized once, served as `(input_ids, attention_mask, completion_mask)` micro-batches.

    Rows have `prompt` and `completion` (plain text: the EOS token is appended to the completion, as TRL's SFT does;
    conversational: rendered with the chat template). Prompts are left-padded and completions right-padded, the
    layout of GRPO's rollouts, so the fused head scores exactly the completion tokens.
    """

    def __init__(self, dataset: Dataset, tokenizer, rows_per_batch: int, max_completion_length: int | None, seed: int):
        missing = {"prompt", "completion"} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"The CHORD expert dataset needs `prompt` and `completion` columns; it lacks {sorted(missing)} "
                f"(columns: {dataset.column_names})."
            )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows = []
        for index, row in enumerate(dataset):
            example = {"prompt": row["prompt"], "completion": row["completion"]}
            if is_conversational(example):
                example = apply_chat_template(example, tokenizer)
            prompt_ids = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
            if not is_conversational({"prompt": row["prompt"]}) and tokenizer.eos_token_id is not None:
                if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
                    completion_ids = completion_ids + [tokenizer.eos_token_id]
            if max_completion_length is not None:
                completion_ids = completion_ids[:max_completion_length]
            if not completion_ids:
                raise ValueError(f"CHORD expert row {index} has an empty completion.")
            self.rows.append((prompt_ids, completion_ids))
        if not self.rows:
            raise ValueError("The CHORD expert dataset is empty.")
        self.rows_per_batch = rows_per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def next_rows(self, count: int) -> list[tuple[list[int], list[int]]]:
        """The next `count` (prompt ids, completion ids) rows: shuffled epochs, no repeat within an epoch."""
        picked = []
        while len(picked) < count:
            if not self._order:
                self._order = torch.randperm(len(self.rows), generator=self.generator).tolist()
            picked.append(self.rows[self._order.pop()])
        return picked

    def next(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.collate(self.next_rows(self.rows_per_batch), device)

    def collate(self, picked, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompt_width = max(len(p) for p, _ in picked)
        completion_width = max(len(c) for _, c in picked)
        batch = len(picked)
        input_ids = torch.full((batch, prompt_width + completion_width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        completion_mask = torch.zeros((batch, completion_width), dtype=torch.long)
        for i, (prompt, completion) in enumerate(picked):
            start = prompt_width - len(prompt)
            input_ids[i, start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
            input_ids[i, prompt_width : prompt_width + len(completion)] = torch.tensor(completion, dtype=torch.long)
            attention_mask[i, start : prompt_width + len(completion)] = 1
            completion_mask[i, : len(completion)] = 1
        return input_ids.to(device), attention_mask.to(device), completion_mask.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


class TokenGRPOTrainer(GRPOTrainer):
    """Drop-in replacement for [`~trl.GRPOTrainer`] with token-level credit assignment.

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class, reward_processing_classes,
        callbacks, optimizers, quantization_config, peft_config, tools, rollout_func, environment_factory:
            As in [`~trl.GRPOTrainer`]. `args` may be a plain `GRPOConfig` (stock GRPO) or a [`TokenGRPOConfig`].
        token_advantage_fn (`Callable[[TokenAdvantageInputs], torch.Tensor]`, *optional*):
            Your per-token advantage rule. It receives the rollout batch (`TokenGRPOBatch`: `completion_ids`,
            `completion_mask`, `per_token_logps`, `per_token_entropy`, `rewards`, `advantages` (stock GRPO),
            `group_ids`, `old_per_token_logps` when TRL has them; all-gathered across ranks) and returns `(B, T)`
            advantages, or weights multiplied into the stock advantages with `args.token_fn_output="weights"`.
            Overriding `compute_token_advantages` in a subclass is the same hook.
        token_reward_model, token_reward_ref_model ([`~transformers.PreTrainedModel`] or `str`, *optional*):
            `token_reward_source="rto"`: the DPO model and its reference (default: the policy's initial weights).
        expert_dataset ([`~datasets.Dataset`], *optional*):
            `chord=True`: expert demonstrations (`prompt`, `completion`).

    Example:
    ```python
    from trl_tokenlevel import TokenGRPOConfig, TokenGRPOTrainer
    from trl_tokenlevel.rewards.grpo_rewards import addition_reward

    args = TokenGRPOConfig(output_dir="out", token_selection="entropy_quantile")  # 80/20 forking tokens
    trainer = TokenGRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=addition_reward, args=args,
                               train_dataset=dataset)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "grpo", "trl-tokenlevel"]
    _name = "TokenGRPO"
    # `_paper` stays GRPO's (DeepSeekMath): every method here reshapes the GRPO objective token by token.

    # Defaults of the state the overrides read, at class level so that each overridden TRL method also works on an
    # object that has only TRL's attributes (TRL's tests call them on stand-ins; a subclass may skip our __init__):
    # token features are then off and every override defers to `GRPOTrainer`.
    _token_enabled = False
    token_advantage_fn = None
    token_reward_model = None
    token_reward_ref_model = None
    _hapo_processor = None
    _expert_batches = None
    # Per-call state (see `_get_per_token_logps_and_entropies`, `get_high_entropy_mask`).
    _cached_forward = None
    _pending_selection = None
    _rollout_capture_request = None
    _rollout_capture = None
    _last_rewards_per_func = None

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        token_advantage_fn: Callable[[TokenAdvantageInputs], torch.Tensor] | None = None,
        token_reward_model: PreTrainedModel | str | None = None,
        token_reward_ref_model: PreTrainedModel | str | None = None,
        expert_dataset: Dataset | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = TokenGRPOConfig(f"{model_name.split('/')[-1]}-TokenGRPO")
        token_args = args if isinstance(args, TokenGRPOConfig) else None
        self.token_advantage_fn = token_advantage_fn
        if token_advantage_fn is not None:
            if token_args is None:
                raise ValueError("`token_advantage_fn` needs a `TokenGRPOConfig` (it holds the shaping options).")
            if token_args.token_advantage is not None:
                raise ValueError(
                    f"Pass either `token_advantage_fn` or args.token_advantage={token_args.token_advantage!r}, not "
                    "both (call the registry method from your function to compose them)."
                )
        uses_rto = token_args is not None and token_args.token_reward_source == "rto"
        if (token_reward_model is not None or token_reward_ref_model is not None) and not uses_rto:
            raise ValueError("`token_reward_model` is the RTO token-reward source: set token_reward_source='rto'.")
        uses_chord = token_args is not None and token_args.chord
        if expert_dataset is not None and not uses_chord:
            raise ValueError("`expert_dataset` is CHORD's expert data: set chord=True to use it.")
        self._token_enabled = token_advantage_fn is not None or (
            token_args is not None and token_args.token_features_enabled
        )
        if self._token_enabled:
            check_policy(model, processing_class)

        # RMT's length reward is one more reward function, appended before TRL sets up the reward bookkeeping.
        if token_args is not None and token_args.rmt_budget_init is not None:
            if reward_funcs is None:
                reward_funcs = []
            reward_funcs = list(reward_funcs) if isinstance(reward_funcs, list) else [reward_funcs]
            reward_funcs.append(
                RMTLengthReward(
                    token_args.rmt_budget_init,
                    token_args.rmt_budget_min,
                    token_args.rmt_gamma,
                    token_args.rmt_k,
                    token_args.rmt_exponent_form,
                    token_args.rmt_length_reward_weight,
                    token_args.rmt_length_reward_width,
                )  # fmt: skip
            )
            if args.reward_weights is not None:
                args = copy.copy(args)  # the caller's config keeps its own list of weights
                args.reward_weights = [*args.reward_weights, 1.0]
            if reward_processing_classes is not None:
                if not isinstance(reward_processing_classes, list):
                    reward_processing_classes = [reward_processing_classes]
                reward_processing_classes = [*reward_processing_classes, None]

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        if nonfinite_guard_enabled(args, self._token_enabled):
            self.add_callback(NonFiniteWeightsGuard())
        if not self._token_enabled:
            return

        self._stage = args.resolved_token_shaping_stage
        self._needs_hidden = args.token_advantage in _HIDDEN_STATE_METHODS
        # What the rollout stage shapes once per generation batch: the advantages (group methods, token rewards). The
        # token selection always runs in the update step, from the training forward (see `_compute_loss`).
        self._shapes_rollout = self._stage == "rollout" and (
            token_advantage_fn is not None or args.token_advantage is not None or uses_rto
        )
        rows_per_shaping = args.per_device_train_batch_size
        if self._stage == "rollout":
            rows_per_shaping *= args.steps_per_generation
        if args.token_advantage == "tw_grpo" and rows_per_shaping % self.num_generations != 0:
            raise ValueError(
                "token_advantage='tw_grpo' compares the next-token distributions of a group's completions, which must "
                f"all be on one rank: the {rows_per_shaping} rows each rank shapes at once (per_device_train_batch_size"
                f"{' x steps_per_generation' if self._stage == 'rollout' else ''}) must be a multiple of "
                f"num_generations ({self.num_generations})."
            )
        if args.token_advantage == "hapo" and args.hapo_adaptive_temperature:
            self._hapo_processor = _RecordingAdaptiveTemperature(
                temperature=self.temperature,
                tau=args.hapo_temperature_tau,
                entropy_pivot=args.hapo_entropy_pivot,
                repo_sign_compat=args.hapo_repo_sign_compat,
            )
        if uses_rto:
            self._setup_token_reward_models(token_reward_model, token_reward_ref_model)
        if uses_chord:
            self._setup_chord(expert_dataset)
        self._rmt_corpus_ntp = args.rmt_ntp_coef != 0.0 and args.rmt_ntp_source == "corpus"
        if self._rmt_corpus_ntp:
            columns = set(getattr(train_dataset, "column_names", None) or [])
            missing = {"rmt_document_ids", "rmt_target_position"} - columns
            if missing:
                raise ValueError(
                    f"rmt_ntp_coef={args.rmt_ntp_coef} with rmt_ntp_source='corpus' trains next-token prediction on the "
                    f"corpus documents, but train_dataset lacks the columns {sorted(missing)}. Build the prompts with "
                    "trl_tokenlevel.data.rmt.build_rmt_dataset, or set rmt_ntp_source='unselected'."
                )

    # ------------------------------------------------------------------------------------------------------------
    # Initialisation helpers
    # ------------------------------------------------------------------------------------------------------------

    def _load_frozen(self, model: PreTrainedModel | str, name: str) -> PreTrainedModel:
        if isinstance(model, str):
            model = create_model_from_path(model, **dict(self.args.model_init_kwargs or {}))
        check_same_vocabulary(self.accelerator.unwrap_model(self.model), "model", model, name,
                              "token rewards score the policy's tokens")  # fmt: skip
        if self.args.disable_dropout:
            disable_dropout_in_model(model)
        model.requires_grad_(False)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def _setup_token_reward_models(self, dpo_model, ref_model) -> None:
        dpo_model = dpo_model if dpo_model is not None else self.args.token_reward_model_name_or_path
        if dpo_model is None:
            raise ValueError(
                "token_reward_source='rto' needs a DPO model: pass `token_reward_model=` or set "
                "token_reward_model_name_or_path."
            )
        if ref_model is None:
            ref_model = self.args.token_reward_ref_model_name_or_path
        if ref_model is None:
            # RTO's reference is the model the DPO model was trained from; by default the policy's initial weights.
            ref_model = get_config_model_id(self.accelerator.unwrap_model(self.model).config)
            if not ref_model:
                raise ValueError(
                    "token_reward_source='rto' needs the DPO model's reference: pass `token_reward_ref_model=` (the "
                    "policy was given in memory, so its initial weights cannot be reloaded from a path)."
                )
        self.token_reward_model = self._load_frozen(dpo_model, "token_reward_model")
        self.token_reward_ref_model = self._load_frozen(ref_model, "token_reward_ref_model")

    def _setup_chord(self, expert_dataset: Dataset | None) -> None:
        if expert_dataset is None:
            if self.args.chord_expert_dataset_name is None:
                raise ValueError(
                    "chord=True needs expert demonstrations: pass `expert_dataset=` (columns `prompt`, `completion`) "
                    "or set chord_expert_dataset_name."
                )
            from datasets import load_dataset

            expert_dataset = load_dataset(
                self.args.chord_expert_dataset_name, split=self.args.chord_expert_dataset_split
            )
        # Expert rows per optimisation step, over every rank and micro-step: `expert / (expert + rollouts) = ratio`.
        # Every rank draws the same rows (same seed) and trains its share, so the layout never changes the data.
        ratio = self.args.chord_expert_data_ratio
        rollout_rows = (self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                        * self.accelerator.num_processes)  # fmt: skip
        rows = max(1, round(rollout_rows * ratio / (1 - ratio)))
        self._expert_batches = _ExpertBatches(
            expert_dataset, self._tokenizer, rows, self.max_completion_length, seed=self.args.seed
        )
        self._chord_window: list = []

    # ------------------------------------------------------------------------------------------------------------
    # Public hook
    # ------------------------------------------------------------------------------------------------------------

    def compute_token_advantages(self, batch: TokenAdvantageInputs) -> torch.Tensor:
        """Per-token advantages `(B, T)` of a rollout batch; override in a subclass or pass `token_advantage_fn`.

        `batch` holds whole prompt groups (all-gathered across ranks). The default: the user `token_advantage_fn`
        (its output used as advantages, or as weights on the stock advantages with `token_fn_output="weights"`), else
        the method named by `args.token_advantage` from `TOKEN_ADVANTAGE_METHODS` with its config knobs, else the
        stock advantages broadcast over the tokens. Padding positions are zeroed afterwards.
        """
        args = self.args
        if self.token_advantage_fn is not None:
            output = self.token_advantage_fn(batch)
            if args.token_fn_output == "weights":
                output = batch.advantages[:, None].to(output.dtype) * output
            return output
        name = args.token_advantage
        if name is None:
            return batch.advantages[:, None].expand(batch.completion_ids.shape).clone()
        return TOKEN_ADVANTAGE_METHODS[name](batch, **self._method_knobs(name))

    def _method_knobs(self, name: str) -> dict[str, Any]:
        args = self.args
        if name == "ucas":
            return dict(beta_pos=args.ucas_beta_pos, beta_neg=args.ucas_beta_neg, kappa=args.ucas_kappa,
                        confidence_agg=args.ucas_confidence_agg, norm_adv_by_std=args.ucas_norm_adv_by_std)  # fmt: skip
        if name == "hapo":
            return dict(entropy_pivot=args.hapo_entropy_pivot, adv_beta=args.hapo_adv_beta,
                        clip_alpha=args.hapo_clip_alpha, epsilon_low=float(self.epsilon_low),
                        epsilon_high=float(self.epsilon_high), hapo_repo_sign_compat=args.hapo_repo_sign_compat,
                        hapo_fallback_include_padding=args.hapo_fallback_include_padding)  # fmt: skip
        if name == "gtpo":
            return dict(conflict_weight=args.gtpo_conflict_weight, entropy_threshold=args.gtpo_entropy_threshold,
                        entropy_scale=args.gtpo_entropy_scale, entropy_filter=args.gtpo_entropy_filter,
                        divide_by_n_conflict=args.gtpo_divide_by_n_conflict,
                        n_conflict_count=args.gtpo_n_conflict_count)  # fmt: skip
        if name == "d3s":
            sample_ratio, token_ratio = self._d3s_ratios()
            return dict(sample_keep_ratio=sample_ratio, token_keep_ratio=token_ratio,
                        recompute_adv_after_downsample=args.d3s_recompute_adv_after_downsample,
                        equal_rewards=args.d3s_equal_rewards)  # fmt: skip
        if name == "tempo":
            return dict(tempo_lambda=args.tempo_lambda)
        if name == "tw_grpo":
            return dict(tw_alpha=args.tw_alpha)
        return {}

    def _d3s_ratios(self) -> tuple[float, float]:
        args = self.args
        total = args.d3s_schedule_steps if args.d3s_schedule_steps is not None else self.state.max_steps
        step = self.state.global_step
        return (
            d3s_keep_ratio(step, total, ratio_start=args.d3s_sample_keep_ratio_start,
                           ratio_end=args.d3s_sample_keep_ratio_end),
            d3s_keep_ratio(step, total, ratio_start=args.d3s_token_keep_ratio_start,
                           ratio_end=args.d3s_token_keep_ratio_end),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # Forward passes: one training forward shared with TRL's loss; rollout-stage capture
    # ------------------------------------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, **kwargs):  # fmt: skip
        # The training forward of `_compute_loss` was already run by us (to shape the batch from its entropy): hand
        # TRL's loss the same tensors instead of a second forward.
        if isinstance(self._cached_forward, tuple) and compute_entropy:
            cached, self._cached_forward = self._cached_forward, None
            return cached
        # Rollout stage: TRL's own old-log-prob forward also yields the entropy (and the hidden states) we need.
        request = self._rollout_capture_request
        if isinstance(request, dict) and model is self.model and not compute_entropy:
            self._rollout_capture_request = None
            with self._maybe_capture_hidden(model, request["hidden"]) as store:
                logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep,
                    batch_size=None if request["hidden"] else batch_size, compute_entropy=True, **kwargs,
                )  # fmt: skip
            self._rollout_capture = (logps, entropies, store.get("hidden"))
            return logps, None, aux
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, compute_entropy=compute_entropy,
            **kwargs,
        )  # fmt: skip

    @contextlib.contextmanager
    def _maybe_capture_hidden(self, model, enabled: bool):
        if not enabled:
            yield {}
            return
        with capture_last_hidden_state(causal_lm_of(model, self.accelerator)) as store:
            yield store

    def _training_forward(self, model, inputs, capture_hidden: bool):
        """The forward of TRL's `_compute_loss` (same arguments), optionally capturing the last hidden state."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with self._maybe_capture_hidden(model, capture_hidden) as store:
            logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                completion_ids.size(1),
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                num_images=inputs.get("num_images"),
                pixel_attention_mask=inputs.get("pixel_attention_mask"),
                spatial_shapes=inputs.get("spatial_shapes"),
                num_tiles=inputs.get("num_tiles"),
                image_sizes=inputs.get("image_sizes"),
                token_type_ids=inputs.get("token_type_ids"),
                mm_token_type_ids=inputs.get("mm_token_type_ids"),
                image_position_ids=inputs.get("image_position_ids"),
            )
        return logps, entropies, aux_loss, store.get("hidden")

    def _rollout_forward(self, out: dict, capture_hidden: bool):
        """One no-grad fused forward over the generation batch (rollout stage, when TRL ran none itself)."""
        if "pixel_values" in out:
            raise ValueError("Token-level shaping at the rollout stage supports text-only models.")
        completion_ids = out["completion_ids"]
        input_ids = torch.cat([out["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._maybe_capture_hidden(self.model, capture_hidden) as store,
        ):
            logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, completion_ids.size(1),
                batch_size=None if capture_hidden else batch_size, compute_entropy=True,
            )  # fmt: skip
        return logps, entropies, store.get("hidden")

    def _trl_computes_old_logps(self) -> bool:
        # The condition of `GRPOTrainer._generate_and_score_completions` for its old-log-prob forward.
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    # ------------------------------------------------------------------------------------------------------------
    # Rollout: generation (HAPO temperature), rewards, group ids, token rewards
    # ------------------------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self._hapo_processor is None or not self.model.training:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)  # fmt: skip
        # `generate` gets no `logits_processor` from TRL: bind one for this call. The processor *is* the temperature
        # step (T·(1 + τ·ĥ)), so the configured temperature warper is set to 1 meanwhile (it would divide again).
        unwrapped = self.accelerator.unwrap_model(self.model_wrapped)
        unwrapped.generate = functools.partial(
            type(unwrapped).generate.__get__(unwrapped), logits_processor=LogitsProcessorList([self._hapo_processor])
        )
        saved = self.generation_config.temperature, self.generation_kwargs.get("temperature")
        self.generation_config.temperature = 1.0
        self.generation_kwargs["temperature"] = 1.0
        try:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)  # fmt: skip
        finally:
            del unwrapped.generate
            self.generation_config.temperature, self.generation_kwargs["temperature"] = saved

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._token_enabled:
            self._last_rewards_per_func = rewards_per_func  # gathered over ranks, (global B, num_funcs)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if not self._token_enabled:
            return super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        if self._shapes_rollout and self._trl_computes_old_logps():
            self._rollout_capture_request = {"hidden": self._needs_hidden}
        self._rollout_capture = None
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._rollout_capture_request = None
            capture, self._rollout_capture = self._rollout_capture, None
        device = out["completion_ids"].device
        batch = out["completion_ids"].shape[0]
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        # TRL lays the gathered generation batch out as contiguous groups of `num_generations` rows; this rank holds
        # global rows [rank·B, (rank + 1)·B). The ids travel with the rows through TRL's shuffle and split.
        global_rows = self.accelerator.process_index * batch + torch.arange(batch, device=device)
        out["tl_group_ids"] = global_rows // num_generations
        rewards = (self._last_rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        out["tl_rewards"] = rewards[global_rows]
        self._last_rewards_per_func = None
        if self.token_reward_model is not None:
            out["tl_token_rewards"] = self._rto_token_rewards(out)
        if self._rmt_corpus_ntp and all("rmt_document_ids" in row for row in inputs):
            out.update(self._rmt_corpus_rows(inputs, device))
        if self._shapes_rollout:
            if capture is None:
                capture = self._rollout_forward(out, self._needs_hidden)
            logps, entropies, hidden = capture
            self._shape_token_batch(out, logps, entropies, hidden, out.get("old_per_token_logps"), select=False)
        if self._hapo_processor is not None and self._hapo_processor.temperature_count:
            processor = self._hapo_processor
            self._metrics[mode]["token/hapo/sampling_temperature"].append(
                processor.temperature_sum / processor.temperature_count
            )
            processor.temperature_sum, processor.temperature_count = 0.0, 0
        return out

    @torch.no_grad()
    def _rto_token_rewards(self, out: dict) -> torch.Tensor:
        """RTO dense token rewards `clip(β₁·[log π_dpo − log π_ref], ±c)` of the rollout tokens, `(B, T)`."""
        completion_mask = out["completion_mask"]
        valid = completion_mask if "tool_mask" not in out else completion_mask * out["tool_mask"]
        input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], completion_mask], dim=1)
        full_completion_mask = torch.cat([torch.zeros_like(out["prompt_mask"]), completion_mask], dim=1)
        dpo = self.accelerator.unwrap_model(self.token_reward_model)
        ref = self.accelerator.unwrap_model(self.token_reward_ref_model)
        log_ratio = token_implicit_rewards(dpo, ref, input_ids, attention_mask, full_completion_mask, beta=1.0)
        log_ratio = log_ratio[:, -completion_mask.shape[1] :]
        zeros = torch.zeros_like(log_ratio)
        # GRPO's outcome reward is already in the advantage and its KL is `beta`: only the DPO shaping term is used.
        return rto_token_rewards(
            log_ratio, zeros, zeros, valid, 0.0, dpo_reward_scale=self.args.token_reward_scale,
            dpo_reward_clip=self.args.token_reward_clip, kl_coef=0.0, rm_clamp=None,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # Shaping: per-token advantages, selection mask, HAPO clip ranges, diagnostics
    # ------------------------------------------------------------------------------------------------------------

    def _gather_rows(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """Concatenate a per-row tensor over ranks (rank order), padding dim 1 with zeros to the widest rank."""
        if tensor is None or self.accelerator.num_processes == 1:
            return tensor
        if tensor.dim() >= 2:
            tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=0)
        return self.accelerator.gather(tensor.contiguous())

    def _local_rows(self, tensor: torch.Tensor, batch: int, width: int) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        start = self.accelerator.process_index * batch
        return tensor[start : start + batch, :width]

    def _shape_token_batch(self, batch: dict, per_token_logps, entropies, hidden, old_per_token_logps,
                           select: bool = True) -> None:  # fmt: skip
        """Write `(B, T)` advantages, D³S's loss mask (`tool_mask`, `num_items_in_batch`), HAPO clip ranges and, with
        `select`, the token selection (`tl_selected`; at the rollout stage it is made later, per update step)."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        completion_ids = batch["completion_ids"]
        tool_mask = batch.get("tool_mask")
        valid = batch["completion_mask"] if tool_mask is None else batch["completion_mask"] * tool_mask
        valid_bool = valid.bool()
        num_rows, width = completion_ids.shape
        logps = per_token_logps.detach()
        entropy = entropies.detach().float()
        stock = batch["advantages"]
        stock_tokens = torch.where(valid_bool, stock[:, None].expand(num_rows, width).to(entropy.dtype),
                                   torch.zeros_like(entropy))  # fmt: skip

        token_advantages = stock_tokens
        kept_by_method = None
        needs_method = self.token_advantage_fn is not None or args.token_advantage is not None
        token_rewards = batch.get("tl_token_rewards")
        if needs_method:
            extra = {}
            if args.token_advantage == "ucas":
                extra["self_certainty"], extra["sampled_token_logits"] = self._ucas_statistics(
                    hidden, completion_ids, logps, valid_bool
                )
            if args.token_advantage == "tw_grpo":
                extra["tw_grpo_divergence"] = self._tw_grpo_divergence(hidden, valid_bool, batch["tl_group_ids"])
            gathered = {
                name: self._gather_rows(value)
                for name, value in dict(
                    completion_ids=completion_ids, completion_mask=valid.long(), per_token_logps=logps.float(),
                    per_token_entropy=entropy, rewards=batch["tl_rewards"].float(), advantages=stock.float(),
                    group_ids=batch["tl_group_ids"],
                    old_per_token_logps=None if old_per_token_logps is None else old_per_token_logps.float(),
                    token_rewards=None if token_rewards is None else token_rewards.float(),
                    **extra,
                ).items()
            }  # fmt: skip
            rollout_batch = TokenGRPOBatch(**gathered)
            shaped = self.compute_token_advantages(rollout_batch)
            if isinstance(shaped, torch.Tensor):
                shaped = shaped.detach()  # advantages are constants of the loss
            expected = tuple(rollout_batch.completion_ids.shape)
            if not isinstance(shaped, torch.Tensor) or tuple(shaped.shape) != expected:
                raise ValueError(
                    f"compute_token_advantages must return a (B, T) = {expected} tensor, got "
                    f"{getattr(shaped, 'shape', type(shaped))}."
                )
            if not torch.isfinite(shaped).all():
                raise ValueError("compute_token_advantages returned non-finite advantages.")
            token_advantages = self._local_rows(shaped.to(entropy.dtype), num_rows, width)
            token_advantages = torch.where(valid_bool, token_advantages, torch.zeros_like(token_advantages))
            if args.token_advantage == "d3s":
                kept_by_method = (token_advantages != 0) & valid_bool
                self._log_d3s(batch, kept_by_method, valid_bool, mode)
            if args.token_advantage == "hapo":
                self._hapo_after_shaping(batch, rollout_batch, num_rows, width, mode)
            if args.token_advantage == "tw_grpo":
                weights = tw_grpo_weights_from_divergence(
                    rollout_batch.tw_grpo_divergence, rollout_batch.completion_mask, tw_alpha=args.tw_alpha
                )
                weights = self._local_rows(weights.to(entropy.dtype), num_rows, width)
                self._log_masked_stats("token/tw_weight", weights, valid_bool, mode, ("mean", "max"))
        if token_rewards is not None:
            token_advantages = token_advantages + args.token_reward_coef * _return_to_go(token_rewards, valid_bool)
            self._log_masked_stats("token/token_reward", token_rewards, valid_bool, mode, ("mean",))

        batch["tl_valid"] = valid_bool  # the valid tokens before D³S's masking: the selection chooses among them
        # D³S drops rollouts and tokens from the loss itself (spec §6: dropped rollouts leave the batch, the loss is a
        # token-mean over the kept tokens), KL included: a loss mask in `tool_mask`, never `completion_mask` (also the
        # attention mask), with TRL's normaliser recounted over the kept tokens.
        loss_mask = valid_bool
        if kept_by_method is not None and args.d3s_mask_dropped_tokens:
            loss_mask = valid_bool & kept_by_method
            base = torch.ones_like(batch["completion_mask"]) if tool_mask is None else tool_mask
            batch["tool_mask"] = base * loss_mask.to(base.dtype)
            batch["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        batch["advantages"] = token_advantages
        self._log_masked_stats("token/adv_before", stock_tokens, valid_bool, mode, ("mean", "std", "min", "max"))
        if select or args.token_selection is None:
            self._select_tokens(batch, entropy, mode)

    def _select_tokens(self, batch: dict, entropy: torch.Tensor, mode: str) -> None:
        """Token selection (80/20, SPINE) from the entropies of the current policy, and the `token/adv_after` metrics
        over the tokens the policy gradient acts on.

        A per-token mask on the policy-gradient term only, carried as `tl_selected` and applied in `_compute_loss`
        through TRL's own `top_entropy_quantile` path (`per_token_loss *= entropy_mask` before aggregation, KL added
        after it on every valid token). The loss mask and TRL's `num_items_in_batch` keep every valid token: the
        paper's normaliser (`entropy_normalize="all"`). Runs in the update step (the training forward's entropies)
        at either shaping stage, so with several micro-steps or iterations per generation batch each optimisation step
        selects from its own policy and micro-batch, as the paper (and TRL's `top_entropy_quantile`) do.
        """
        args = self.args
        mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
        loss_mask = mask.bool()
        valid = batch.get("tl_valid", loss_mask)
        advantages = batch["advantages"]
        if advantages.dim() == 1:  # nothing was shaped per token: the stock advantages, broadcast
            advantages = torch.where(loss_mask, advantages[:, None].to(entropy.dtype), torch.zeros_like(entropy))
            batch["advantages"] = advantages
            self._log_masked_stats("token/adv_before", advantages, loss_mask, mode, ("mean", "std", "min", "max"))
        selected = None
        if args.token_selection is not None:
            gather_fn = all_gather_variable_length if args.entropy_scope == "global" else None
            selected = high_entropy_token_mask(entropy, valid, rho=args.entropy_top_ratio,
                                               entropy_selection=args.entropy_selection,
                                               gather_fn=gather_fn)  # fmt: skip
            batch["tl_selected"] = selected
            batch["tl_valid"] = valid
            self._log_selection(entropy, valid, selected, mode)
            if args.entropy_normalize == "selected":
                # Global count of the selected loss tokens, over the same rows as `num_items_in_batch` (see
                # `_selected_normalization_scale`).
                batch["tl_num_selected"] = self.accelerator.gather((selected & loss_mask).sum()).sum()
        policy_mask = loss_mask if selected is None else loss_mask & selected
        self._log_masked_stats("token/adv_after", advantages, policy_mask, mode, ("mean", "std", "min", "max"))

    @torch.no_grad()
    def _ucas_statistics(self, hidden, completion_ids, logps, valid):
        """UCAS per-token self-certainty `lse(z/T) − mean(z/T)` and raw sampled-token logit `z_y`, from the hidden
        states of the fused forward: `lse(z/T) = z_y/T − log p_T(y)` reuses the fused head's log-prob
        (`ops.chunked.chunked_ucas_statistics`)."""
        head = lm_head_params(causal_lm_of(self.model, self.accelerator))
        rows = hidden[:, -completion_ids.shape[1] - 1 : -1]
        certainty, sampled = chunked_ucas_statistics(
            rows.reshape(-1, rows.shape[-1]), head["weight"], head["bias"], completion_ids.reshape(-1),
            logps.reshape(-1), temperature=self.temperature, logit_scale=head["logit_scale"], softcap=head["softcap"],
        )  # fmt: skip
        certainty, sampled = certainty.float().view_as(logps), sampled.float().view_as(logps)
        zero = torch.zeros_like(certainty)
        return torch.where(valid, certainty, zero), torch.where(valid, sampled, zero)

    @torch.no_grad()
    def _tw_grpo_divergence(self, hidden, valid, group_ids):
        counts = torch.unique(group_ids, return_counts=True)[1]
        if bool((counts != counts[0]).any()) or (self.model.training and int(counts[0]) != self.num_generations):
            raise ValueError(
                "token_advantage='tw_grpo' needs each prompt group's completions on one rank and in one micro-step: "
                "use token_shaping_stage='rollout' or steps_per_generation=1, with a per-device batch that is a "
                "multiple of num_generations."
            )
        head = lm_head_params(causal_lm_of(self.model, self.accelerator))
        rows = hidden[:, -valid.shape[1] - 1 : -1]
        return chunked_tw_grpo_divergence(
            rows, head["weight"], head["bias"], valid, group_ids, temperature=self.temperature,
            logit_scale=head["logit_scale"], softcap=head["softcap"], vocab_chunk=self.args.tw_vocab_chunk,
        ).float()  # fmt: skip

    def _hapo_after_shaping(self, batch, rollout_batch, num_rows, width, mode) -> None:
        """HAPO's per-token clip ranges (from ĥ of the gathered batch) and the sampler's statistics for next time."""
        args = self.args
        valid = rollout_batch.completion_mask.bool()
        if not valid.any():
            return
        stats = hapo_entropy_stats(rollout_batch.per_token_entropy, valid, args.hapo_entropy_pivot,
                                   args.hapo_repo_sign_compat)  # fmt: skip
        if self._hapo_processor is not None and mode == "train":
            self._hapo_processor.stats = stats  # the previous training step's statistics drive the next rollouts
        if not args.hapo_adaptive_clip:
            return
        h_hat = hapo_normalized_entropy(rollout_batch.per_token_entropy, stats)
        h_hat = torch.where(valid, h_hat, torch.zeros_like(h_hat))
        eps_low, eps_high = hapo_clip_bounds(h_hat, epsilon_low=float(self.epsilon_low),
                                             epsilon_high=float(self.epsilon_high), clip_alpha=args.hapo_clip_alpha)  # fmt: skip
        batch["tl_eps_low"] = self._local_rows(eps_low, num_rows, width)
        batch["tl_eps_high"] = self._local_rows(eps_high, num_rows, width)
        local_valid = self._local_rows(valid, num_rows, width)
        self._log_masked_stats("token/hapo/eps_low", batch["tl_eps_low"], local_valid, mode, ("mean",))
        self._log_masked_stats("token/hapo/eps_high", batch["tl_eps_high"], local_valid, mode, ("mean",))

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if not self._token_enabled:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        # A copy: the buffered generation batch is reused across `num_iterations`, and must stay unshaped.
        inputs = dict(inputs)
        capture_hidden = self._stage == "loss" and self._needs_hidden
        per_token_logps, entropies, aux_loss, hidden = self._training_forward(model, inputs, capture_hidden)
        if self._stage == "loss":
            self._shape_token_batch(inputs, per_token_logps, entropies, hidden, inputs.get("old_per_token_logps"))
        elif self.args.token_selection is not None:
            self._select_tokens(inputs, entropies.detach().float(), mode)
        eps_low, eps_high = inputs.pop("tl_eps_low", None), inputs.pop("tl_eps_high", None)
        saved = self.epsilon_low, self.epsilon_high, self.top_entropy_quantile, self.args.delta
        if eps_low is not None:
            # HAPO: TRL's clamp and clip metrics read these attributes; tensors make them per token.
            self.epsilon_low, self.epsilon_high = eps_low, eps_high
        if self.args.token_advantage == "hapo" and self.args.hapo_dual_clip is not None:
            # HAPO's dual clip c: TRL's `delta` caps the unclipped ratio at c, which is exactly the dual clip for
            # c > 1 + ε_high' (config-checked; proof and reference in `ops.advantages.hapo_dual_clip_loss`).
            self.args.delta = self.args.hapo_dual_clip
        selected = inputs.get("tl_selected")
        if selected is not None:
            # Token selection rides TRL's `top_entropy_quantile` path: any value < 1 makes TRL ask
            # `get_high_entropy_mask`, which returns our selection; TRL then masks the policy-gradient term only and
            # adds the KL on every valid token, as the spec (and TRL's own 80/20 rule) require.
            self._pending_selection = selected
            self.top_entropy_quantile = 0.0
            if self.args.entropy_normalize == "selected":
                inputs["advantages"] = inputs["advantages"] * self._selected_normalization_scale(inputs, selected)
        self._cached_forward = (per_token_logps, entropies, aux_loss)
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._cached_forward = None
            self._pending_selection = None
            self.epsilon_low, self.epsilon_high, self.top_entropy_quantile, self.args.delta = saved

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        valid = inputs.get("tl_valid")  # the valid tokens the selection chose from
        if self.args.token_selection == "entropy_band":
            # The mean is over the forking tokens of every rank (DDP averages gradients, hence the division), so two
            # processes train like one with the same global batch (tests/trainers/test_token_grpo_layout.py).
            world = self.accelerator.num_processes
            global_forking = self.accelerator.gather(selected.sum().reshape(1).float()).sum()
            penalty = spine_entropy_band_penalty(
                entropies, selected, band_coef=self.args.band_coef, band_low=self.args.band_low,
                band_high=self.args.band_high, band_mode=self.args.band_mode,
                band_quantiles=(self.args.band_quantile_low, self.args.band_quantile_high),
                normalizer=global_forking.clamp(min=1) / world,
                gather_fn=all_gather_variable_length if world > 1 else None,
            )  # fmt: skip
            loss = loss + penalty / accumulation
            self._metrics[mode]["token/band_penalty"].append(self.accelerator.gather(penalty.detach()).mean().item())
        if self.args.rmt_ntp_coef != 0.0:
            if self.args.rmt_ntp_source == "corpus":
                ntp = self._rmt_corpus_ntp_loss(model, inputs)
            else:
                ntp = rmt_ntp_loss(per_token_logps, valid, selected, ntp_coef=self.args.rmt_ntp_coef)
            if ntp is not None:
                loss = loss + ntp / accumulation
                self._metrics[mode]["token/rmt_ntp_loss"].append(self.accelerator.gather(ntp.detach()).mean().item())
        if self._expert_batches is not None and mode == "train":
            loss = self._chord_mix(model, loss, mode)
        return loss

    def _rmt_corpus_rows(self, rows: list[dict], device) -> dict[str, torch.Tensor]:
        """Each rollout row's corpus document (right-padded ids and mask) and RL target position, as `(B, ·)` tensors
        that travel with the rows through TRL's shuffle and split."""
        documents = [list(row["rmt_document_ids"]) for row in rows]
        width = max(len(ids) for ids in documents)
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, document in enumerate(documents):
            ids[i, : len(document)] = torch.tensor(document, dtype=torch.long, device=device)
            mask[i, : len(document)] = 1
        target = torch.tensor([int(row["rmt_target_position"]) for row in rows], dtype=torch.long, device=device)
        return {"tl_rmt_doc_ids": ids, "tl_rmt_doc_mask": mask, "tl_rmt_target": target}

    def _rmt_corpus_ntp_loss(self, model, inputs) -> torch.Tensor | None:
        """RMT's NTP term on the corpus: `λ·mean(−log π(x_t|x_<t))` over the tokens of this micro-batch's distinct
        documents other than their RL targets (`ops.advantages.rmt_ntp_loss`), scored by TRL's fused head in one more
        forward with gradient (the unwrapped module, as CHORD's expert rows). None when the rows carry no document."""
        ids = inputs.get("tl_rmt_doc_ids")
        if ids is None:
            return None
        mask, target = inputs["tl_rmt_doc_mask"], inputs["tl_rmt_target"]
        # The completions of one prompt share its document and target: score each distinct one once.
        keys, inverse = torch.unique(torch.cat([ids, target[:, None]], dim=1), dim=0, return_inverse=True)
        rows = torch.arange(ids.shape[0], device=ids.device)
        first = torch.full((keys.shape[0],), ids.shape[0], device=ids.device).scatter_reduce(0, inverse, rows, "amin")
        ids, mask, target = ids[first], mask[first], target[first]
        logps, _, _ = super()._get_per_token_logps_and_entropies(
            self.accelerator.unwrap_model(model), ids, mask, ids.shape[1] - 1
        )
        predicted = torch.arange(1, ids.shape[1], device=ids.device)[None, :]  # logps[:, j] scores token j + 1
        return rmt_ntp_loss(logps, mask[:, 1:], predicted == target[:, None], ntp_coef=self.args.rmt_ntp_coef)

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        # During our `_compute_loss`, TRL's entropy-mask branch receives the token selection made at shaping time.
        # (A tensor check, not `is not None`: TRL's tests call this on a `Mock(spec=...)` whose attributes are Mocks.)
        if isinstance(self._pending_selection, torch.Tensor):
            selected, self._pending_selection = self._pending_selection, None
            return selected.bool() & mask.bool()
        return super().get_high_entropy_mask(entropies, mask, threshold)

    def _selected_normalization_scale(self, inputs, selected) -> torch.Tensor | float:
        """`entropy_normalize="selected"`: the factor `c > 0` that turns TRL's normaliser of the policy term (valid
        loss tokens) into the count of selected ones, folded into the advantages.

        Exact for every TRL loss: each policy term is positively homogeneous in the advantage with sign-only
        branches (clip region, SAPO temperature, VESPO k/λ, off-policy mask), so `ℓ(c·A) = c·ℓ(A)` for `c > 0`, while
        the KL term and TRL's metrics keep the all-valid-token normaliser. `dapo`/`cispo`/`vespo`:
        `num_items_in_batch / tl_num_selected` (global counts over the same rows); `bnpo`: this micro-batch's counts;
        `grpo`/`sapo`: per completion; `luspo` sums without a token count (factor 1); `dr_grpo` is refused by the
        config.
        """
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        chosen = selected.bool() & mask
        loss_type = self.loss_type
        if loss_type in ("dapo", "cispo", "vespo"):
            return inputs["num_items_in_batch"].float() / inputs["tl_num_selected"].float().clamp(min=1.0)
        if loss_type == "bnpo":
            return mask.sum().float().clamp(min=1.0) / chosen.sum().float().clamp(min=1.0)
        if loss_type in ("grpo", "sapo"):
            return (mask.sum(-1).float().clamp(min=1.0) / chosen.sum(-1).float().clamp(min=1.0)).unsqueeze(-1)
        return 1.0

    def _chord_window_shares(self) -> list:
        """This rank's expert rows for each micro-step of the next optimisation step, with the step's global count.

        The step's rows are dealt round-robin over (micro-step, rank) slots; the normaliser is their total number of
        completion tokens (`chord_token_level_loss=True`) or of rows, known on every rank without communication since
        every rank draws the same rows. A slot may be empty when there are fewer rows than slots (SFT term 0).
        """
        rows = self._expert_batches.next_rows(self._expert_batches.rows_per_batch)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        slots = self.current_gradient_accumulation_steps * world
        shares = [rows[slot::slots] for slot in range(slots)]
        normalizer = sum(len(c) for _, c in rows) if self.args.chord_token_level_loss else len(rows)
        steps = self.current_gradient_accumulation_steps
        return [(shares[micro * world + rank], float(normalizer)) for micro in range(steps)]

    def _chord_mix(self, model, loss, mode):
        """CHORD: `(1 − μ)·L_GRPO + μ·L_SFT` with φ-weighted expert NLL, μ from the warmup + cosine schedule.

        `L_SFT` averages over the expert tokens (or rows) of the whole optimisation step, as the official per-side
        renormalisation does: each micro-step adds its sum divided by the step's global count, times the number of
        processes (DDP averages gradients over ranks), so gradient accumulation and several processes give the
        one-batch loss. TRL's `L_GRPO` is already normalised over its own global batch.
        """
        args = self.args
        mu = chord_mu(self.state.global_step, args.chord_mu_warmup_steps, args.chord_mu_decay_steps,
                      args.chord_mu_peak, args.chord_mu_valley)  # fmt: skip
        if not self._chord_window:
            self._chord_window = self._chord_window_shares()
        rows, normalizer = self._chord_window.pop(0)
        if rows:
            input_ids, attention_mask, expert_mask = self._expert_batches.collate(rows, self.accelerator.device)
            # The unwrapped module: a second call of the DDP wrapper before backward would re-arm its reducer; the
            # gradients of both forwards still reach the same parameters and are all-reduced once.
            expert_logps, _, _ = super()._get_per_token_logps_and_entropies(
                self.accelerator.unwrap_model(model), input_ids, attention_mask, expert_mask.shape[1]
            )
            sft = chord_sft_loss(expert_logps, expert_mask, weighting=args.chord_weighting,
                                 cutoff_prob=args.chord_cutoff_prob, token_level=args.chord_token_level_loss,
                                 normalizer=normalizer)  # fmt: skip
        else:
            sft = loss.new_zeros(())
        # Logged per micro-step as this share of the step's L_SFT (the micro-steps of a step add up to L_SFT).
        self._metrics[mode]["chord/mu"].append(mu)
        self._metrics[mode]["chord/sft_loss"].append(
            self.accelerator.reduce(sft.detach(), reduction="sum").item() * self.current_gradient_accumulation_steps
        )
        return (1.0 - mu) * loss + mu * sft * self.accelerator.num_processes

    # ------------------------------------------------------------------------------------------------------------
    # Diagnostics
    # ------------------------------------------------------------------------------------------------------------

    def _log_masked_stats(self, prefix, values, mask, mode, stats) -> None:
        """Global (all-rank) statistics of `values` over `mask`, appended to `self._metrics[mode]`."""
        mask = mask.bool()
        picked = values.detach().float()[mask]
        device = values.device
        count = torch.tensor(float(picked.numel()), device=device)
        totals = torch.stack([picked.sum(), (picked * picked).sum(), count])
        totals = self.accelerator.reduce(totals, reduction="sum")
        count = totals[2].clamp(min=1.0)
        mean = totals[0] / count
        if "mean" in stats:
            self._metrics[mode][f"{prefix}/mean"].append(mean.item())
        if "std" in stats:
            self._metrics[mode][f"{prefix}/std"].append((totals[1] / count - mean**2).clamp(min=0).sqrt().item())
        if "min" in stats or "max" in stats:
            extremes = torch.stack([
                picked.min() if picked.numel() else torch.tensor(float("inf"), device=device),
                -picked.max() if picked.numel() else torch.tensor(float("inf"), device=device),
            ])  # fmt: skip
            extremes = self.accelerator.gather(extremes[None]).min(dim=0).values
            if "min" in stats:
                self._metrics[mode][f"{prefix}/min"].append(extremes[0].item() if totals[2] > 0 else 0.0)
            if "max" in stats:
                self._metrics[mode][f"{prefix}/max"].append(-extremes[1].item() if totals[2] > 0 else 0.0)

    def _log_selection(self, entropy, valid, selected, mode) -> None:
        sel = selected & valid
        rest = valid & ~selected
        totals = torch.stack([
            sel.sum().float(), valid.sum().float(), (entropy * sel).sum(), (entropy * rest).sum(), rest.sum().float(),
        ])  # fmt: skip
        totals = self.accelerator.reduce(totals, reduction="sum")
        self._metrics[mode]["token/selected_frac"].append((totals[0] / totals[1].clamp(min=1)).item())
        self._metrics[mode]["token/entropy_selected"].append((totals[2] / totals[0].clamp(min=1)).item())
        self._metrics[mode]["token/entropy_unselected"].append((totals[3] / totals[4].clamp(min=1)).item())

    def _log_d3s(self, batch, kept_tokens, valid, mode) -> None:
        sample_ratio, token_ratio = self._d3s_ratios()
        kept_rows = kept_tokens.any(dim=1)
        totals = torch.stack([kept_rows.sum().float(), torch.tensor(float(kept_rows.numel()), device=valid.device),
                              kept_tokens.sum().float(), valid.sum().float()])  # fmt: skip
        totals = self.accelerator.reduce(totals, reduction="sum")
        self._metrics[mode]["token/d3s/kept_rollouts_frac"].append((totals[0] / totals[1].clamp(min=1)).item())
        self._metrics[mode]["token/d3s/kept_tokens_frac"].append((totals[2] / totals[3].clamp(min=1)).item())
        self._metrics[mode]["token/d3s/sample_keep_ratio"].append(sample_ratio)
        self._metrics[mode]["token/d3s/token_keep_ratio"].append(token_ratio)
