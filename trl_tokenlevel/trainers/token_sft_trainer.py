"""`TokenSFTTrainer`: TRL's `SFTTrainer` with token-level losses (OTR, CHORD-φ, per-token weights) and ssToken.

With `token_loss_type=None` and `token_selection=None` every method defers to `SFTTrainer`, so training is stock SFT to
the bit. Otherwise `compute_loss` runs TRL's single fused LM-head forward (per-token log-probabilities, never
`[batch, seq, vocab]` logits) with forward hooks that capture what the method needs from the same pass: the backbone's
last hidden states (OTR samples and scores from them in tiles) and one layer's attention probabilities (ssToken). The
losses and selection rules live in `trl_tokenlevel.ops.sft`; this file moves tensors, normalises like TRL and logs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Callable

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import get_config_model_id

from ..data.sft_columns import ROW_ID_COLUMN, TOKEN_WEIGHTS_COLUMN, DataCollatorForTokenSFT, prepare_token_weights
from ..data.token_columns import column_names
from ..ops.chunked import backbone_hidden_states, chunked_token_logprobs, lm_head_params
from ..ops.sft import (
    attention_prompt_mass,
    chord_sft_per_token_loss,
    ema_update_,
    gumbel_max_sample_chunked,
    otr_ensure_gold,
    otr_expected_loss,
    otr_pg_loss,
    otr_rewards,
    retrospective_excess_loss,
    sample_tokens_tiled,
    sampled_log_probs,
    ss_token_scores,
    ss_token_select,
)
from .guards import NonFiniteWeightsGuard, check_policy, nonfinite_guard_enabled
from .token_sft_config import TokenSFTConfig

HISTORY_CHECKPOINT_NAME = "sstoken_history.safetensors"


class _HistoryEMACallback(TrainerCallback):
    """Moves the ssToken history model toward the policy after every optimizer step."""

    def __init__(self, trainer: TokenSFTTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.update_history_model()


def _full_weight(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if isinstance(param, DTensor) else param  # a collective for FSDP2's DTensors


class TokenSFTTrainer(SFTTrainer):
    """Drop-in replacement for [`~trl.SFTTrainer`] with token-level losses and token selection.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_loss_func,
        compute_metrics, callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics,
        quantization_config, peft_config, formatting_func:
            As in [`~trl.SFTTrainer`]. `args` may be a plain `SFTConfig` (stock SFT) or a [`TokenSFTConfig`].

    Methods (see [`TokenSFTConfig`]): `token_loss_type="otr"` (One-Token Rollout), `"chord_phi"` (CHORD-φ weights),
    `"weighted"` (a `token_weights` dataset column), and `token_selection="sstoken"` (ssToken).

    Example:
    ```python
    from trl_tokenlevel import TokenSFTConfig, TokenSFTTrainer

    args = TokenSFTConfig(output_dir="out", token_loss_type="otr")
    trainer = TokenSFTTrainer(model="Qwen/Qwen2.5-0.5B", args=args, train_dataset=dataset)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "sft", "trl-tokenlevel"]
    _name = "TokenSFT"
    # Defaults of the state the overrides read, at class level so that each overridden TRL method also works on an
    # object that has only TRL's attributes (stock SFT: every override defers to `SFTTrainer`).
    token_loss_type = None
    token_selection = None
    _token_mode = False
    otr_generator = None
    _history_model = None
    _history_pairs = ()

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: SFTConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func: Callable | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = TokenSFTConfig(f"{model_name.split('/')[-1]}-TokenSFT")
        # A plain SFTConfig (or TrainingArguments) is accepted for drop-in use and means stock SFT.
        token_args = args if isinstance(args, TokenSFTConfig) else None
        self.token_loss_type = token_args.token_loss_type if token_args else None
        self.token_selection = token_args.token_selection if token_args else None
        self._token_mode = self.token_loss_type is not None or self.token_selection is not None
        # OTR draws from torch's global RNG (seeded by `args.seed` and saved in checkpoints) unless a seeded
        # `torch.Generator` is assigned here.
        self.otr_generator: torch.Generator | None = None
        self._history_model = None
        self._history_pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []

        if self._token_mode:
            check_policy(model, processing_class)
            if compute_loss_func is not None:
                raise ValueError(
                    "`compute_loss_func` replaces the loss with one computed from full logits, which token-level SFT "
                    "never builds. Drop `compute_loss_func` or set token_loss_type=None and token_selection=None."
                )
            if self._needs_attention(args):
                self._check_eager_attention(self._declared_attn_implementation(model, args), args)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        if nonfinite_guard_enabled(args, self._token_mode):
            self.add_callback(NonFiniteWeightsGuard())
        if not self._token_mode:
            return

        if self._is_vision_dataset:
            raise ValueError(
                "Token-level SFT supports text datasets only; this dataset has images. Set token_loss_type=None and "
                "token_selection=None for vision-language SFT."
            )
        if self.token_loss_type == "weighted" and type(self.data_collator) is DataCollatorForLanguageModeling:
            # The stock collator ignores extra columns; ours pads `token_weights` the same way as the labels.
            stock = self.data_collator
            self.data_collator = DataCollatorForTokenSFT(
                pad_token_id=stock.pad_token_id,
                padding_free=stock.padding_free,
                return_position_ids=stock.return_position_ids,
                pad_to_multiple_of=stock.pad_to_multiple_of,
            )
        if self.token_loss_type == "otr" or self.token_selection == "sstoken":
            # They read the LM head outside the model's forward and ssToken deep-copies the policy: both are tested
            # under FSDP2 (tests/distributed), not yet under ZeRO-3, whose copies would hold empty partitions.
            if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                raise ValueError(
                    "token_loss_type='otr' and token_selection='sstoken' are not supported with DeepSpeed ZeRO-3 yet. "
                    "Use FSDP2 (examples/accelerate_configs/fsdp2.yaml), DDP or ZeRO-1/2."
                )
        if self.token_loss_type == "otr":
            self._check_otr_head()
        if self.token_selection == "sstoken":
            if self._needs_attention(self.args):
                self._check_eager_attention(self._unwrapped_config()._attn_implementation, self.args)
                self._attention_module = self._find_attention_module(self.args.sstoken_attention_layer)
            self._build_history_model()
            self.add_callback(_HistoryEMACallback(self))

    # ------------------------------------------------------------------------------------------------------------
    # Initialisation helpers
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _needs_attention(args) -> bool:
        return isinstance(args, TokenSFTConfig) and args.token_selection == "sstoken" and args.sstoken_gamma > 0

    @staticmethod
    def _declared_attn_implementation(model, args) -> str | None:
        """The attention implementation the model will have, when it is known before loading (else None)."""
        if isinstance(model, PreTrainedModel):
            return model.config._attn_implementation
        if isinstance(model, str):
            # transformers loads SDPA (or flash) by default; only an explicit "eager" gives attention probabilities.
            return (args.model_init_kwargs or {}).get("attn_implementation") or "sdpa (the default)"
        return None

    @staticmethod
    def _check_eager_attention(implementation: str | None, args) -> None:
        if implementation is None or implementation == "eager":
            return
        raise ValueError(
            f"token_selection='sstoken' with sstoken_gamma={args.sstoken_gamma} scores tokens by their attention to "
            "the prompt, which only the eager attention implementation returns, but the model uses "
            f"attn_implementation={implementation!r}. Load the model with eager attention "
            "(`TokenSFTConfig(model_init_kwargs={'attn_implementation': 'eager'})`, `--attn_implementation eager` on "
            "the command line, or `from_pretrained(..., attn_implementation='eager')`), or set sstoken_gamma=0.0 to "
            "select tokens by the retrospective excess loss alone (any attention implementation)."
        )

    def _unwrapped(self) -> PreTrainedModel:
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    def _unwrapped_config(self):
        return self._unwrapped().config

    def _backbone(self) -> torch.nn.Module:
        # The module TRL's fused forward runs (`base_model`); its forward hook sees `last_hidden_state` with its graph.
        return self._unwrapped().base_model

    def _find_attention_module(self, layer: int) -> torch.nn.Module:
        layers = [module for name, module in self._backbone().named_modules() if name.endswith("self_attn")]
        if not layers:
            raise ValueError(
                "token_selection='sstoken' could not find the attention modules (`*.self_attn`) of "
                f"{type(self._unwrapped()).__name__}. Set sstoken_gamma=0.0 to select tokens without attention."
            )
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"sstoken_attention_layer={layer}, but the model has {len(layers)} attention layers.")
        return layers[layer]

    def _check_otr_head(self) -> None:
        head = lm_head_params(self.model)
        uses_ops_kernel = self.args.otr_estimator == "expected" or self.args.otr_sampler == "gumbel"
        # The Gumbel sampler and the expected-form kernel project `W h + b` only: a logit scale folds into their
        # temperatures, a softcap cannot.
        if uses_ops_kernel and (head["softcap"] is not None or head["logit_scale"] <= 0):
            raise ValueError(
                f"{'otr_estimator=expected' if self.args.otr_estimator == 'expected' else 'otr_sampler=gumbel'} does "
                f"not support this model's logits transform (softcap={head['softcap']}, logit_scale="
                f"{head['logit_scale']}). Use otr_estimator='mc' with otr_sampler='multinomial'."
            )

    def _build_history_model(self) -> None:
        """A frozen copy of the policy on the same device: the ssToken history model θ_his."""
        # Deep-copied before `accelerator.prepare`; only its backbone and LM-head weights are used (never its patched
        # forward), so the copy needs no fused head of its own.
        self._history_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        history_params = dict(self._history_model.named_parameters())
        self._history_pairs = [
            (history_params[name], param) for name, param in self.model.named_parameters() if param.requires_grad
        ]

    @property
    def history_model(self) -> PreTrainedModel | None:
        """The ssToken history model (None unless token_selection='sstoken')."""
        return self._history_model

    def update_history_model(self) -> None:
        """θ_his ← α·θ_his + (1 − α)·θ over the trainable parameters (no-op for α = 1)."""
        if self._history_model is None or self.args.sstoken_history_decay == 1.0:
            return
        if self.is_fsdp_enabled:
            # FSDP2 replaced the policy's parameters by sharded (DTensor) ones after the copy was made: pair them by
            # name again; the history copy stays whole on every rank and follows the gathered weights.
            history = dict(self._history_model.named_parameters())
            self._history_pairs = [(history[name], param) for name, param in self.model.named_parameters()
                                   if param.requires_grad]  # fmt: skip
        ema_update_(
            [his for his, _ in self._history_pairs],
            [_full_weight(param.detach()) for _, param in self._history_pairs],
            decay=self.args.sstoken_history_decay,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints: the history model is saved and restored with the optimizer state
    # ------------------------------------------------------------------------------------------------------------

    def _history_state(self) -> dict[str, torch.Tensor]:
        names = {id(param): name for name, param in self._history_model.named_parameters()}
        return {names[id(his)]: his.detach().contiguous() for his, _ in self._history_pairs}

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._history_model is not None and self.args.should_save:
            from safetensors.torch import save_file

            save_file(self._history_state(), os.path.join(output_dir, HISTORY_CHECKPOINT_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._history_model is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, HISTORY_CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"Checkpoint {checkpoint} has no ssToken history model ({HISTORY_CHECKPOINT_NAME}), so resuming would "
                "restart the history from the current weights. Resume from a checkpoint written by TokenSFTTrainer "
                "with token_selection='sstoken' (and save_only_model=False)."
            )
        from safetensors.torch import load_file

        state = load_file(path, device=str(self._history_pairs[0][0].device) if self._history_pairs else "cpu")
        expected = self._history_state()
        if set(state) != set(expected):
            raise ValueError(
                f"{path} holds parameters {sorted(set(state) ^ set(expected))[:5]}... that do not match this model's "
                "trainable parameters. Resume with the same model and PEFT configuration."
            )
        history_params = dict(self._history_model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                history_params[name].copy_(tensor)

    # ------------------------------------------------------------------------------------------------------------
    # Dataset preparation: carry and validate `token_weights`
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if self.token_loss_type != "weighted":
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        columns = column_names(dataset)
        if TOKEN_WEIGHTS_COLUMN not in columns:
            raise ValueError(
                f"token_loss_type='weighted' needs a {TOKEN_WEIGHTS_COLUMN!r} column (one float per loss token), but "
                f"the {dataset_name} dataset has columns {columns}. Build it from "
                "`trl_tokenlevel.data.sft_columns.tokenize_sft_dataset(dataset, tokenizer)['labels']`."
            )
        # Row numbers of the user's dataset for error messages (a stream's rows are checked lazily, as they come).
        if isinstance(dataset, Dataset):
            dataset = dataset.add_column(ROW_ID_COLUMN, list(range(len(dataset))))
        else:
            dataset = dataset.map(lambda _, index: {ROW_ID_COLUMN: index}, with_indices=True)
        # TRL's preparation up to the labels, with nothing truncated, packed or shuffled yet: the weights are checked
        # against the full tokenization, then truncated/packed together with the ids (`prepare_token_weights`).
        untruncated = _ArgsView(args, max_length=None, shuffle_dataset=False)
        dataset = super()._prepare_dataset(dataset, processing_class, untruncated, False, formatting_func, dataset_name)
        return prepare_token_weights(dataset, args, packing, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # `remove_unused_columns=True` (the default) keeps only signature columns: add ours so it reaches the collator.
        if self.token_loss_type == "weighted" and TOKEN_WEIGHTS_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, TOKEN_WEIGHTS_COLUMN]

    # ------------------------------------------------------------------------------------------------------------
    # Token counts: ssToken normalises by the tokens it keeps, counted globally like TRL's `num_items_in_batch`
    # ------------------------------------------------------------------------------------------------------------

    def sstoken_kept_count(self, valid: torch.Tensor) -> torch.Tensor:
        """Tokens `ops.sft.ss_token_select` keeps for a `[B, T]` validity mask (a function of the labels alone)."""
        ratio = self.args.sstoken_ratio
        counts = valid.sum(dim=-1) if self.args.sstoken_select_scope == "sequence" else valid.sum().reshape(1)
        # Same rule and float guard as `ss_token_select`: ceil(ρ·N), at least 1, none for an empty row.
        kept = torch.ceil(counts.to(torch.float64) * ratio - 1e-9).clamp(min=1).to(counts.dtype)
        return torch.where(counts > 0, kept, torch.zeros_like(kept)).sum()

    def _get_num_items_in_batch(self, batch_samples, device):
        if self.token_selection != "sstoken" or not batch_samples or "labels" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        kept = sum(self.sstoken_kept_count(batch["labels"][..., 1:] != -100) for batch in batch_samples)
        # Hand the parent one stand-in batch whose pre-shifted labels hold exactly `kept` valid entries, so the count
        # goes through TRL/transformers' own cross-rank gathering and parallelism corrections unchanged.
        stand_in = torch.zeros(int(kept), dtype=torch.long)
        return super()._get_num_items_in_batch([{"labels": stand_in, "shift_labels": stand_in}], device)

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _capture(self, store: dict):
        """Forward hooks that keep the backbone's last hidden state and/or one layer's attention probabilities."""
        handles = []
        if self.token_loss_type == "otr":

            def keep_hidden(module, args, output):
                store["hidden"] = output.last_hidden_state

            handles.append(self._backbone().register_forward_hook(keep_hidden))
        if self.token_selection == "sstoken" and self.args.sstoken_gamma > 0:

            def keep_attention(module, args, output):
                # Eager attention returns (attn_output, attn_weights); the weights only feed a selection score.
                store["attention"] = output[1].detach() if output[1] is not None else None

            handles.append(self._attention_module.register_forward_hook(keep_attention))
        try:
            yield store
        finally:
            for handle in handles:
                handle.remove()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._token_mode:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        token_weights = inputs.pop(TOKEN_WEIGHTS_COLUMN, None)
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True

        with self._capture({}) as captured:
            outputs = model(**inputs, fused_lm_head=True)
        seq_len = inputs["input_ids"].shape[1] - 1
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens.
        log_probs = outputs.log_probs[:, -seq_len:]
        valid = outputs.label_mask[:, -seq_len:]
        labels = inputs["labels"][:, 1:].to(log_probs.device)

        per_token = self._per_token_loss(mode, log_probs, valid, labels, token_weights, captured)
        if self.token_selection == "sstoken":
            keep = self._sstoken_keep(mode, inputs, log_probs, valid, labels, captured)
            per_token = per_token * keep
            local_count = keep.sum()
        else:
            local_count = valid.sum()
        # Normalised like TRL: by the token count of the whole optimizer step (all accumulation steps and ranks), or
        # of this micro-batch when none is given (evaluation). ssToken counts kept tokens (`_get_num_items_in_batch`).
        num_tokens = local_count if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        self._log_sft_metrics(mode, inputs, outputs)
        if return_outputs:
            warnings.warn(
                "`return_outputs=True` (logits for `compute_metrics`) costs an extra full-logits forward pass.",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
            return loss, outputs
        return loss

    def _per_token_loss(self, mode, log_probs, valid, labels, token_weights, captured) -> torch.Tensor:
        """`[B, T-1]` per-token loss (0 outside loss tokens) of the active `token_loss_type`."""
        nll = -log_probs  # zero on ignored positions
        if self.token_loss_type is None:
            # ssToken alone masks TRL's own per-token loss.
            return nll * log_probs.exp().detach() if self.args.loss_type == "dft" else nll
        if self.token_loss_type == "weighted":
            if token_weights is None:
                raise ValueError(
                    f"token_loss_type='weighted' but the {mode} batch has no {TOKEN_WEIGHTS_COLUMN!r}: add the column "
                    "(one float per loss token) to the dataset."
                )
            weights = token_weights[:, 1:][:, -log_probs.shape[1] :].to(log_probs)
            self._log_masked_stats(mode, "token_weights", weights, valid)
            return nll * weights
        if self.token_loss_type == "chord_phi":
            per_token = chord_sft_per_token_loss(
                log_probs, weighting=self.args.chord_weighting, cutoff_prob=self.args.chord_cutoff_prob
            )
            if self.args.chord_weighting != "none":
                probs = log_probs.detach().clamp(max=math.log(self.args.chord_cutoff_prob)).exp()
                weights = probs * (1 - probs) if self.args.chord_weighting == "phi" else probs
                self._log_masked_stats(mode, "token_weights", weights, valid)
            return per_token * valid
        # OTR
        position_loss = self._otr_position_losses(mode, log_probs, valid, labels, captured["hidden"])
        otr = torch.zeros_like(log_probs).masked_scatter(valid, position_loss.to(log_probs.dtype))
        self._log_masked_stats(mode, "otr/nll", nll.detach(), valid, extremes=False)
        self._log_masked_stats(mode, "otr/loss", otr.detach(), valid, extremes=False)
        # `0 * nll` keeps the fused graph, so an all-masked micro-batch still backpropagates a zero.
        return self.args.otr_coef * otr + self.args.otr_nll_coef * nll

    def _otr_sample(self, rows: torch.Tensor, head: dict, gold: torch.Tensor):
        """K exact samples per row from the exploration policy `softmax(z / κ)` (no gradient).

        Returns `(samples [N, K], raw logits at [samples, gold] [N, K + 1] or None)`.
        """
        args = self.args
        # A sampler fed NaN/inf logits fails deep in torch ("invalid multinomial distribution") or, for Gumbel-max,
        # silently draws garbage: name the cause instead.
        for what, tensor in (("hidden states", rows), ("LM-head weights", head["weight"])):
            if not bool(torch.isfinite(tensor).all()):
                raise FloatingPointError(
                    f"OTR cannot sample at step {self.state.global_step}: the policy's {what} are not finite (NaN/inf), "
                    "so its logits are not a distribution. The weights diverged in an earlier step: lower the learning "
                    "rate or set max_grad_norm, and resume from the last checkpoint."
                )
        if args.otr_sampler == "gumbel":
            # `gumbel_max_sample_chunked` projects `W h + b`: fold the logit scale into the temperature.
            samples = gumbel_max_sample_chunked(
                rows, head["weight"], head["bias"], num_samples=args.otr_num_samples,
                temperature=args.otr_temperature / head["logit_scale"], generator=self.otr_generator,
            )  # fmt: skip
            return samples, None
        try:
            return sample_tokens_tiled(
                rows, head["weight"], head["bias"], args.otr_num_samples, args.otr_temperature,
                logit_scale=head["logit_scale"], softcap=head["softcap"], generator=self.otr_generator,
                extra_indices=gold.unsqueeze(-1),
            )  # fmt: skip
        except RuntimeError as error:
            if "multinomial" not in str(error):
                raise
            raise FloatingPointError(
                f"OTR cannot sample at step {self.state.global_step}: the policy's logits overflow to non-finite "
                f"values at otr_temperature={args.otr_temperature}. Raise otr_temperature, lower the learning rate or "
                "train in fp32/bf16 instead of fp16."
            ) from error

    def _otr_position_losses(self, mode, log_probs, valid, labels, hidden) -> torch.Tensor:
        """OTR loss `[N]` at the N valid positions, from the hidden states the fused forward produced."""
        args = self.args
        head = lm_head_params(self.model)
        weight, bias, scale, softcap = head["weight"], head["bias"], head["logit_scale"], head["softcap"]
        # Row t of the shifted hidden states predicts label t + 1, exactly as in TRL's fused head.
        rows = hidden[:, :-1][:, -log_probs.shape[1] :].to(weight.device)[valid]
        gold = labels[valid]
        if args.otr_estimator == "expected":
            # No samples, so no sampled-token reward to log (it would cost one more vocabulary pass).
            return otr_expected_loss(
                rows, weight, bias, gold, beta=args.otr_beta,
                exploration_temperature=args.otr_temperature / scale,
                logprob_temperature=args.otr_logprob_temperature / scale,
            )  # fmt: skip

        samples, raw_values = self._otr_sample(rows.detach(), head, gold)
        if args.otr_include_gold:
            drawn, samples = samples, otr_ensure_gold(samples, gold)
            if raw_values is not None:
                # A replaced sample is the gold token, whose raw logit is the last column.
                replaced = samples != drawn
                raw_values[:, :-1] = torch.where(replaced, raw_values[:, -1:], raw_values[:, :-1])
        rewards = otr_rewards(samples, gold, beta=args.otr_beta, dtype=torch.float32)
        self._log_mean(mode, "otr/mean_reward", rewards.mean(dim=-1))
        self._log_mean(mode, "otr/gold_sampled", (samples == gold.unsqueeze(-1)).any(dim=-1).float())
        tau = args.otr_logprob_temperature
        if tau == 1.0:
            label_log_probs = log_probs[valid]  # from the fused head, with its gradient: no extra vocabulary pass
        else:
            label_log_probs = chunked_token_logprobs(
                rows, weight, bias, gold, temperature=tau, logit_scale=scale, softcap=softcap
            )
        sampled = sampled_log_probs(
            rows, weight, bias, samples, gold, label_log_probs, tau, scale, softcap, raw_values=raw_values
        )
        return otr_pg_loss(sampled, rewards, baseline=args.otr_baseline)

    def _history_log_probs(self, inputs, labels, valid) -> torch.Tensor:
        """Label log-probs `[B, T-1]` under the history model (no gradient; 0 outside loss tokens)."""
        with torch.no_grad():
            hidden = backbone_hidden_states(self._history_model, inputs["input_ids"], inputs.get("attention_mask"))
            head = lm_head_params(self._history_model)
            rows = hidden[:, :-1][:, -valid.shape[1] :].to(head["weight"].device)[valid]
            token_logps = chunked_token_logprobs(
                rows, head["weight"], head["bias"], labels[valid],
                logit_scale=head["logit_scale"], softcap=head["softcap"],
            )  # fmt: skip
        return torch.zeros(valid.shape, dtype=token_logps.dtype, device=valid.device).masked_scatter(valid, token_logps)

    def _sstoken_keep(self, mode, inputs, log_probs, valid, labels, captured) -> torch.Tensor:
        """ssToken's kept-token mask `[B, T-1]`."""
        args = self.args
        history = self._history_log_probs(inputs, labels, valid)
        rel = retrospective_excess_loss(log_probs.float(), history.float()) * valid
        if args.sstoken_gamma > 0:
            attention = captured.get("attention")
            if attention is None:
                raise RuntimeError(
                    "ssToken got no attention probabilities from the model: it does not run eager attention. Load it "
                    "with attn_implementation='eager', or set sstoken_gamma=0.0."
                )
            prompt = (inputs["labels"] == -100) & inputs["attention_mask"].bool()
            # Scores are per token position; token i's label log-prob sits at i − 1 after the shift.
            attention_scores = attention_prompt_mass(attention.float(), prompt.to(attention.device))[:, 1:]
        else:
            attention_scores = torch.zeros_like(rel)
        scores = ss_token_scores(
            rel, attention_scores, valid, gamma=args.sstoken_gamma, norm_scope=args.sstoken_norm_scope
        )
        keep = ss_token_select(scores, valid, ratio=args.sstoken_ratio, scope=args.sstoken_select_scope)
        gather = self.accelerator.gather_for_metrics
        kept, total = gather(keep.sum()).sum(), gather(valid.sum()).sum()
        self._metrics[mode]["sstoken/selected_fraction"].append((kept / total).item() if total > 0 else 0.0)
        self._log_masked_stats(mode, "sstoken/rel", rel, valid, extremes=False)
        return keep

    # ------------------------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------------------------

    def _log_mean(self, mode: str, key: str, values: torch.Tensor) -> None:
        """Mean over all ranks of a 1-D tensor of per-position values."""
        gather = self.accelerator.gather_for_metrics
        total = gather(values.detach().float().sum()).sum()
        count = gather(torch.tensor(values.numel(), device=values.device)).sum()
        self._metrics[mode][key].append((total / count).item() if count > 0 else 0.0)

    def _log_masked_stats(self, mode: str, prefix: str, values, valid, extremes: bool = True) -> None:
        """Token mean (and global min/max) of `values` over the loss tokens, across ranks."""
        values, valid = values.detach().float(), valid.bool()
        gather = self.accelerator.gather_for_metrics
        total, count = gather(values[valid].sum()).sum(), gather(valid.sum()).sum()
        self._metrics[mode][f"{prefix}/mean" if extremes else prefix].append(
            (total / count).item() if count > 0 else 0.0
        )
        if extremes:
            inf = torch.tensor(float("inf"), device=values.device)
            low = gather(torch.where(valid, values, inf).min()).min()
            high = gather(torch.where(valid, values, -inf).max()).max()
            if torch.isfinite(low):
                self._metrics[mode][f"{prefix}/min"].append(low.item())
                self._metrics[mode][f"{prefix}/max"].append(high.item())

    def _log_sft_metrics(self, mode: str, inputs: dict, outputs) -> None:
        """The metrics `SFTTrainer.compute_loss` logs, with the same names and meaning (TRL 1.16)."""
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        entropy_sum = gather(outputs.entropy.detach().sum()).sum()
        num_correct = gather(outputs.is_top1.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                num_tokens_in_batch = gather(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                num_tokens_in_batch = gather(local).sum().item()
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            self._total_train_tokens += num_tokens_in_batch // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            self._metrics[mode]["aux_loss"].append(gather(outputs.aux_loss).mean().item())


class _ArgsView:
    """Read-only view of a config with a few attributes overridden (TRL's dataset preparation only reads `args`)."""

    def __init__(self, args, **overrides):
        self._args, self._overrides = args, overrides

    def __getattr__(self, name):
        overrides = self.__dict__["_overrides"]
        return overrides[name] if name in overrides else getattr(self.__dict__["_args"], name)
