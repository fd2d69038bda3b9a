"""`TokenDPOTrainer`: TRL's `DPOTrainer` with token-level weights and rewards.

With `token_loss_type=None` every method defers to `DPOTrainer`, so training is stock DPO to the bit. With a token
loss, `_compute_loss` keeps TRL's fused LM-head forward (per-token log-probs, never `[batch, seq, vocab]` logits),
forms per-token log-ratios against the reference, and hands them with the per-token weights or rewards to a pure
function in `trl_tokenlevel.ops.preference`. The math lives there; this file moves tensors and logs metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from types import SimpleNamespace

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import AutoProcessor, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import (
    add_fused_lm_head,
    create_model_from_path,
    disable_dropout_in_model,
    get_config_model_id,
    use_adapter,
)

from ..checks import check_same_hidden_size, check_same_vocabulary, check_tokenizer_fits
from ..data.token_columns import (
    ROW_ID_COLUMN,
    TOKEN_BATCH_KEYS,
    TOKEN_COLUMN_FAMILIES,
    TOKEN_COLUMNS,
    DataCollatorForTokenPreference,
    column_names,
    validate_token_columns,
)
from ..ops.chunked import (
    backbone_hidden_states,
    chunked_token_kl,
    chunked_total_variation,
    lm_head_params,
)
from ..ops.fused import check_triton_available, check_triton_head, fused_token_statistics
from ..ops.preference import (
    cdpo_loss,
    mapo_zn_rescale,
    sparsepo_loss,
    tdpo_loss,
    tgdpo_token_weights,
    treg_loss,
    weighted_dpo_loss,
)
from ..signals.masks import SparsePOMask, norm_eps_of
from .guards import NonFiniteWeightsGuard, check_policy, nonfinite_guard_enabled
from .hooks import (
    add_backbone_forward,
    capture_last_hidden_state,
    causal_lm_of,
    record_activation_means,
    record_layer_outputs,
)
from .token_dpo_config import FULL_DISTRIBUTION_LOSS_TYPES, TokenDPOConfig

logger = get_logger(__name__)

# Losses that read the backbone's last hidden state of policy and reference during the fused forward.
_HIDDEN_STATE_LOSS_TYPES = ("tdpo1", "tdpo2", "sparsepo", "mapo")
# Losses that can run the fused full-distribution pass (`ops.fused`) instead of TRL's log-prob head + a chunked KL.
_FUSED_LOSS_TYPES = (*_HIDDEN_STATE_LOSS_TYPES, "aligndistil")
_SPARSEPO_MASK_FILE = "sparsepo_mask.pt"
# Bumped whenever the layout of the per-token reference cache changes, so a stale cache is never reused.
_REF_CACHE_VERSION = "trl_tokenlevel/per_token_ref_logps/v1"


class _ZeroGradientsAfterStep(TrainerCallback):
    """Zero the gradients of modules trained beside the model (they would otherwise accumulate across steps)."""

    def __init__(self, modules):
        self.modules = modules

    def on_optimizer_step(self, args, state, control, **kwargs):
        for module in self.modules:
            module.zero_grad(set_to_none=True)


class TokenDPOTrainer(DPOTrainer):
    """Drop-in replacement for [`~trl.DPOTrainer`] with token-level losses.

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics,
        callbacks, optimizers, quantization_config, peft_config:
            As in [`~trl.DPOTrainer`]. `args` may be a plain `DPOConfig` (stock DPO) or a [`TokenDPOConfig`].
        guidance_model ([`~transformers.PreTrainedModel`] or `str`, *optional*):
            TGDPO online mode: a frozen token-reward model (typically a DPO-trained model) sharing the policy's
            tokenizer. Token rewards `r̂_t = log π_g(y_t) − log π_ref(y_t)` are computed in each step under
            `no_grad`. Also settable as `args.guidance_model_name_or_path`.
        aligndistil_teachers (`tuple` of two models or paths, *optional*):
            AlignDistil's frozen (DPO model, reverse-DPO model), sharing the policy's tokenizer. Also settable as
            `args.aligndistil_dpo_model_name_or_path` / `args.aligndistil_reverse_model_name_or_path`.

    Example:
    ```python
    from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer

    args = TokenDPOConfig(output_dir="out", token_loss_type="cdpo")  # dataset has `rejected_token_weights`
    trainer = TokenDPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "dpo", "trl-tokenlevel"]
    _name = "TokenDPO"
    # `_paper` stays DPO's: every method here is a token-level form of the DPO objective.

    # Defaults of the state the overrides read, at class level so that each overridden TRL method also works on an
    # object that has only TRL's attributes (stock DPO: every override defers to `DPOTrainer`).
    token_loss_type = None
    guidance_model = None
    aligndistil_teachers = None
    sparsepo_masks = None

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable | None = None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        guidance_model: PreTrainedModel | str | None = None,
        aligndistil_teachers: tuple[PreTrainedModel | str, PreTrainedModel | str] | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = TokenDPOConfig(f"{model_name.split('/')[-1]}-TokenDPO")
        # A plain DPOConfig is accepted for drop-in use and means stock DPO.
        self.token_loss_type = args.token_loss_type if isinstance(args, TokenDPOConfig) else None

        # Everything `_prepare_dataset` reads must exist before `super().__init__()`, which tokenizes the datasets.
        if guidance_model is None and self.token_loss_type is not None:
            guidance_model = args.guidance_model_name_or_path
        if guidance_model is not None and self.token_loss_type != "tgdpo":
            raise ValueError(
                f"`guidance_model` is the TGDPO token-reward model, but token_loss_type={self.token_loss_type!r}. "
                "Set token_loss_type='tgdpo' or drop `guidance_model`."
            )
        if isinstance(guidance_model, str):
            guidance_model = create_model_from_path(guidance_model, **dict(args.model_init_kwargs or {}))
        self.guidance_model = guidance_model
        self.aligndistil_teachers = self._load_aligndistil_teachers(args, aligndistil_teachers)

        if self.token_loss_type is not None:
            check_policy(model, processing_class)
            if processing_class is None:
                processing_class = AutoProcessor.from_pretrained(
                    model if isinstance(model, str) else get_config_model_id(model.config),
                    trust_remote_code=args.trust_remote_code,
                )
            if data_collator is None:
                data_collator = self._token_collator(processing_class, args)

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

        if self.token_loss_type is not None and self.ref_model is not None:
            self._check_reference()
        if self.guidance_model is not None:
            add_fused_lm_head(self.guidance_model)
            self.guidance_model = self._prepare_frozen(self.guidance_model, "guidance_model")
        if self.aligndistil_teachers is not None:
            self.aligndistil_teachers = tuple(
                self._prepare_frozen(teacher, name)
                for teacher, name in zip(self.aligndistil_teachers, ("DPO teacher", "reverse-DPO teacher"))
            )
            if args.aligndistil_mode != "theorem1":
                # Only chosen responses against the two teachers: the reference model is not used, so free it.
                self.ref_model = None
        # The fused full-distribution pass: policy and reference run their backbones only, and one tiled pass over
        # both LM heads yields the log-probs, the KL and the metrics' statistics.
        self.fused_distribution = self._uses_fused_distribution()
        # (A plain DPOConfig has no `token_kernel`; it never runs the fused pass.)
        self.fused_backend = "triton" if self.fused_distribution and args.token_kernel == "triton" else "torch"
        if self.fused_backend == "triton":
            self._check_triton_fused_pass()
        if self.fused_distribution:
            for frozen_or_policy in (self.model, self.ref_model):
                if frozen_or_policy is not None:
                    add_backbone_forward(causal_lm_of(frozen_or_policy, self.accelerator))
        self.sparsepo_masks = None
        if self.token_loss_type == "sparsepo":
            self.sparsepo_masks = self._build_sparsepo_masks()
            # `Trainer` zeroes only the model's gradients after each optimizer step; the masks live beside it.
            self.add_callback(_ZeroGradientsAfterStep(self.sparsepo_masks))
        if nonfinite_guard_enabled(args, self.token_loss_type is not None):
            self.add_callback(NonFiniteWeightsGuard(self.sparsepo_masks or ()))

    # ------------------------------------------------------------------------------------------------------------
    # Initialisation helpers
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _token_collator(processing_class, args) -> DataCollatorForTokenPreference:
        """The stock preference collator plus per-token columns, with the pad token TRL would pick."""
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
        if pad_token not in tokenizer.get_vocab():
            raise ValueError(
                f"The pad token {pad_token!r} is not in the vocabulary of {type(tokenizer).__name__}. Set "
                "`tokenizer.pad_token` to a token of the vocabulary."
            )
        return DataCollatorForTokenPreference(
            pad_token_id=tokenizer.convert_tokens_to_ids(pad_token),
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )

    def _load_aligndistil_teachers(self, args, teachers):
        if self.token_loss_type != "aligndistil":
            if teachers is not None:
                raise ValueError("`aligndistil_teachers` is only used with token_loss_type='aligndistil'.")
            return None
        if teachers is None:
            paths = (args.aligndistil_dpo_model_name_or_path, args.aligndistil_reverse_model_name_or_path)
            if None in paths:
                raise ValueError(
                    "token_loss_type='aligndistil' needs a DPO teacher and a reverse-DPO teacher (trained on swapped "
                    "pairs): pass `aligndistil_teachers=(dpo_model, reverse_model)` or set "
                    "aligndistil_dpo_model_name_or_path and aligndistil_reverse_model_name_or_path."
                )
            teachers = paths
        return tuple(
            create_model_from_path(t, **dict(args.model_init_kwargs or {})) if isinstance(t, str) else t
            for t in teachers
        )

    def _uses_fused_distribution(self) -> bool:
        """Whether the full-distribution loss runs the fused pass (`token_kernel` "torch"/"triton", or "auto" off CUDA/XPU).

        "auto" keeps TRL's Triton log-prob head + TRL's Triton divergence on CUDA/XPU until the GPU suite shows the
        fused pass ahead ("torch" tiling or the "triton" backend, whose speed is unmeasured). MoE models keep their
        load-balancing loss: the backbone-only forward computes it from the router logits as TRL's head does.
        """
        if self.token_loss_type not in _FUSED_LOSS_TYPES:
            return False
        kernel = self.args.token_kernel
        on_gpu = self.accelerator.device.type in ("cuda", "xpu")
        return kernel in ("torch", "triton") or (kernel == "auto" and not on_gpu)

    def _check_triton_fused_pass(self) -> None:
        """token_kernel='triton' before training: triton installed, CUDA (or its interpreter), heads it supports."""
        models = {"policy": self.model}
        if self.token_loss_type != "aligndistil":  # AlignDistil folds its teachers' heads into plain linear maps
            models["reference"] = self.ref_model if self.ref_model is not None else self.model
        try:
            check_triton_available(self.accelerator.device)
            for name, model in models.items():
                head = lm_head_params(causal_lm_of(model, self.accelerator))
                check_triton_head(f"{name} model's ", head["bias"], head["logit_scale"], head["softcap"])
        except ValueError as error:
            raise ValueError(
                f"token_kernel='triton' (token_kernel='torch' is the same pass in torch): {error}"
            ) from None

    def _prepare_frozen(self, model: PreTrainedModel, name: str) -> PreTrainedModel:
        """Check the vocabulary, freeze, drop dropout and place a frozen auxiliary model like TRL's reference."""
        self._check_same_vocabulary(model, name)
        if self.args.disable_dropout:
            disable_dropout_in_model(model)
        model.requires_grad_(False)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def _build_sparsepo_masks(self) -> list:
        """One mask network (common mask) or two (reward, KL), on the training device, data-parallel like the model."""
        config = causal_lm_of(self.model, self.accelerator).config.get_text_config()
        count = 2 if self.args.sparsepo_independent_masks else 1
        masks = []
        for _ in range(count):
            mask = SparsePOMask(config.num_hidden_layers, config.hidden_size, self.args.sparsepo_mask_dropout,
                                init=self.args.sparsepo_mask_init, norm_eps=norm_eps_of(config))  # fmt: skip
            mask = mask.to(self.accelerator.device)
            if self.is_fsdp_enabled:
                # accelerate shards an FSDP2 model only together with an optimizer holding nothing but the model's
                # parameters; the masks are small, so they stay replicated and DDP averages their gradients.
                mask = torch.nn.parallel.DistributedDataParallel(mask)
            else:
                mask = self.accelerator.prepare_model(mask)
            masks.append(mask)
        return masks

    def _add_sparsepo_param_group(self, optimizer) -> None:
        if not any(group.get("sparsepo_mask") for group in optimizer.param_groups):
            # The mask networks train with the policy, at the same learning rate, with their own weight decay.
            params = [p for mask in self.sparsepo_masks for p in mask.parameters()]
            optimizer.add_param_group(
                {"params": params, "weight_decay": self.args.sparsepo_mask_weight_decay, "sparsepo_mask": True}
            )

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.sparsepo_masks is not None and not self.is_fsdp_enabled:
            self._add_sparsepo_param_group(optimizer)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Under FSDP2 the masks join the optimizer once accelerate has prepared it with the model (see
        # `_build_sparsepo_masks`): before the scheduler, which sets every group's learning rate, and before a
        # resumed optimizer state is loaded.
        if self.sparsepo_masks is not None and self.is_fsdp_enabled:
            self._add_sparsepo_param_group(optimizer or self.optimizer)
        return super().create_scheduler(num_training_steps, optimizer)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # Checkpoints go through here too, so the SparsePO masks are saved with every checkpoint and the final model.
        if self.sparsepo_masks is not None and self.accelerator.is_main_process:
            output_dir = output_dir or self.args.output_dir
            states = [self.accelerator.unwrap_model(mask).state_dict() for mask in self.sparsepo_masks]
            torch.save(states, os.path.join(output_dir, _SPARSEPO_MASK_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.sparsepo_masks is not None:
            path = os.path.join(resume_from_checkpoint, _SPARSEPO_MASK_FILE)
            if not os.path.exists(path):
                raise ValueError(
                    f"{resume_from_checkpoint} has no {_SPARSEPO_MASK_FILE}: it was not saved by a SparsePO run."
                )
            self._load_sparsepo_masks(path)

    def _load_sparsepo_masks(self, path: str) -> None:
        """Load the mask networks from `path`, naming the file and the mismatch if it was saved for another setup."""
        masks = [self.accelerator.unwrap_model(mask) for mask in self.sparsepo_masks]
        fix = (
            "Resume with the model and sparsepo_independent_masks setting of the run that wrote it, or delete the "
            "file to start the masks afresh."
        )
        try:
            states = torch.load(path, map_location=self.accelerator.device)
        except Exception as error:  # a truncated or foreign file: torch raises many different types
            raise ValueError(f"{path} is not a readable SparsePO mask file ({error}). {fix}") from error
        if not isinstance(states, list) or len(states) != len(masks):
            count = len(states) if isinstance(states, list) else type(states).__name__
            raise ValueError(f"{path} holds {count} mask network(s), this run builds {len(masks)}. {fix}")
        for index, (mask, state) in enumerate(zip(masks, states)):
            expected = {name: tuple(tensor.shape) for name, tensor in mask.state_dict().items()}
            found = {name: tuple(tensor.shape) for name, tensor in state.items()}
            if found != expected:
                raise ValueError(
                    f"{path}: mask network {index} has parameter shapes {found}, but this model needs {expected} "
                    f"(layers x hidden size): the file was saved for another model. {fix}"
                )
            mask.load_state_dict(state)

    def _check_same_vocabulary(self, other: PreTrainedModel, name: str) -> None:
        check_same_vocabulary(self.model, "model", other, name, "token rewards and teachers score the policy's tokens")

    def _check_reference(self) -> None:
        """The reference must score the policy's tokens; full-distribution losses compare whole distributions, and
        SparsePO's mask networks (sized from the policy) read the reference's layers."""
        check_tokenizer_fits(self.processing_class, self.ref_model, "ref_model")
        if self.token_loss_type in FULL_DISTRIBUTION_LOSS_TYPES:
            check_same_vocabulary(self.model, "model", self.ref_model, "ref_model",
                                  "the per-token KL compares the two next-token distributions")  # fmt: skip
        if self.token_loss_type == "sparsepo":
            why = "SparsePO's mask networks are sized from the policy and read the reference's layer outputs"
            check_same_hidden_size(self.model, "model", self.ref_model, "ref_model", why)
            layers = [causal_lm_of(m, self.accelerator).config.get_text_config().num_hidden_layers
                      for m in (self.model, self.ref_model)]  # fmt: skip
            if layers[0] != layers[1]:
                raise ValueError(
                    f"`ref_model` has {layers[1]} layers but `model` has {layers[0]}: {why}. Use a reference of the "
                    "same architecture (e.g. the policy's initial weights)."
                )

    # Which per-token column family each token loss reads (the others are ignored, with a warning).
    _FAMILY_OF_LOSS = {
        "weighted": "token_weights",
        "cdpo": "token_weights",
        "tgdpo": "token_rewards",
        "treg": "token_rewards",
    }

    def _check_token_columns(self, present: list[str], dataset_name: str, user_columns: list[str]) -> None:
        """Fail early when the dataset cannot feed the chosen token loss; warn about columns it will not read."""
        loss_type = self.token_loss_type
        family = self._FAMILY_OF_LOSS.get(loss_type)
        problem = None
        if family is not None:
            columns = TOKEN_COLUMN_FAMILIES[family][:2]
            given = [c for c in columns if c in present]
            builder = {
                "weighted": "your own weights",
                "cdpo": "`trl_tokenlevel.signals.add_critical_token_weights`",
                "tgdpo": "`trl_tokenlevel.signals.add_dpo_token_rewards`",
                "treg": "`trl_tokenlevel.signals.add_contrastive_prompt_rewards`",
            }[loss_type]
            if loss_type == "tgdpo" and self.guidance_model is not None:
                if given:
                    problem = (
                        "token_loss_type='tgdpo' got both a `guidance_model` and token reward columns "
                        f"{given}; use one source of token rewards (drop the columns or the guidance model)"
                    )
            elif loss_type == "cdpo" and "rejected_token_weights" not in present:
                problem = (
                    "token_loss_type='cdpo' needs the column 'rejected_token_weights' (and optionally "
                    f"'chosen_token_weights'); build it with {builder}"
                )
            elif not given:
                alternative = " or a `guidance_model`" if loss_type == "tgdpo" else ""
                problem = (
                    f"token_loss_type={loss_type!r} needs at least one of the columns {list(columns)}"
                    f"{alternative} (a missing side is neutral); build them with {builder}"
                )
        ref_columns = [c for c in TOKEN_COLUMN_FAMILIES["ref_token_logps"][:2] if c in present]
        if len(ref_columns) == 1:
            problem = (
                f"the dataset has {ref_columns[0]!r} but not its other side; per-token reference log-probs need both "
                "'ref_chosen_token_logps' and 'ref_rejected_token_logps' (or neither, to use the live reference)"
            )
        if problem is not None:
            raise ValueError(f"{problem}. The {dataset_name} dataset has columns {user_columns}.")
        unused = [c for c in present if c not in TOKEN_COLUMN_FAMILIES.get(family, ())[:2] and c not in ref_columns]
        if unused:
            logger.warning(
                f"token_loss_type={loss_type!r} does not read the columns {unused} of the {dataset_name} dataset; "
                "they are ignored."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Dataset preparation: carry and validate per-token columns
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.token_loss_type is None:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        user_columns = column_names(dataset)
        has_token_columns = any(name in user_columns for name in TOKEN_COLUMNS)
        streamed = isinstance(dataset, IterableDataset)
        if has_token_columns:
            # Row numbers of the user's dataset, through TRL's tokenization (which may drop rows): checked here for a
            # map-style dataset, by the collator for a stream (which keeps the column).
            if streamed:
                dataset = dataset.map(lambda _, index: {ROW_ID_COLUMN: index}, with_indices=True)
            else:
                dataset = dataset.add_column(ROW_ID_COLUMN, list(range(len(dataset))))
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        row_ids = None
        if has_token_columns and not streamed:
            row_ids = dataset[ROW_ID_COLUMN]
            dataset = dataset.remove_columns(ROW_ID_COLUMN)
        present = validate_token_columns(dataset, row_ids)
        self._check_token_columns(present, dataset_name, user_columns)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # `remove_unused_columns=True` (the default) keeps only signature columns: add ours so they reach the collator.
        if self.token_loss_type is not None and not self._is_vision_dataset:
            self._signature_columns = [*self._signature_columns, *TOKEN_COLUMNS, ROW_ID_COLUMN]

    # ------------------------------------------------------------------------------------------------------------
    # Reference log-probs: live (separate model or adapter-disabled PEFT) or precomputed per token
    # ------------------------------------------------------------------------------------------------------------

    def _reference_forward(self, model, model_kwargs, labels, backbone_only=False):
        """Per-token reference log-probs `(2B, L-1)` from `model` under no_grad (adapter disabled for PEFT); with
        `backbone_only`, the backbone's last hidden state `(2B, L, H)` instead (the fused pass scores it)."""
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        # The frozen forward never needs router logits (they would only feed a discarded MoE aux loss).
        kwargs = {key: value for key, value in model_kwargs.items() if key != "output_router_logits"}
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
        ):
            if backbone_only:
                with self.accelerator.autocast():
                    return model(**kwargs, backbone_only=True).last_hidden_state
            return model(**kwargs, labels=labels, fused_lm_head=True).log_probs

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """Precompute reference log-probs per completion token (token losses need them unsummed).

        Adds TRL's sum columns (`ref_chosen_logps`, `ref_rejected_logps`) and the per-token columns
        `ref_chosen_token_logps` / `ref_rejected_token_logps` (one value per completion token; 0 where the collator
        truncates the token away). The cache fingerprint differs from TRL's sums cache, so neither is reused for the
        other.
        """
        if self.token_loss_type is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` needs a map-style `Dataset`, got an `IterableDataset`. Convert it "
                "or set `precompute_ref_log_probs=False`."
            )
        fingerprint = [Hasher.hash((dataset._fingerprint, self._precompute_model_hash, _REF_CACHE_VERSION))]
        broadcast_object_list(fingerprint, from_process=0)
        cache_file = dataset._get_cache_file_path(fingerprint[0])
        if not os.path.exists(cache_file):
            self._write_ref_cache(dataset, name, batch_size, fingerprint[0], cache_file)
        self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, self._read_ref_cache(cache_file, dataset, name)], axis=1)

    @staticmethod
    def _read_ref_cache(cache_file: str, dataset: Dataset, name: str) -> Dataset:
        """The cached per-token reference columns, checked against `dataset` row by row (an interrupted write or a
        foreign file must not silently misalign the reference)."""
        fix = f"Delete {cache_file} and run again: the per-token reference log-probs are recomputed."
        try:
            cache = Dataset.from_file(cache_file)
        except Exception as error:  # pyarrow raises several types for a truncated file
            raise ValueError(f"The per-token reference cache {cache_file} is unreadable ({error}). {fix}") from error
        if len(cache) != len(dataset) or not {"ref_chosen_token_logps", "ref_rejected_token_logps"} <= set(
            cache.column_names
        ):
            raise ValueError(
                f"The per-token reference cache {cache_file} has {len(cache)} rows and columns {cache.column_names}, "
                f"but the {name} dataset has {len(dataset)} rows and needs 'ref_chosen_token_logps' and "
                f"'ref_rejected_token_logps': it is stale. {fix}"
            )
        for side in ("chosen", "rejected"):
            lengths = [len(ids) for ids in dataset[f"{side}_ids"]]
            cached = [len(values) for values in cache[f"ref_{side}_token_logps"]]
            if lengths != cached:
                row = next(i for i, (a, b) in enumerate(zip(lengths, cached)) if a != b)
                raise ValueError(
                    f"The per-token reference cache {cache_file} is stale: row {row} has {cached[row]} reference "
                    f"log-probs for {lengths[row]} tokens of '{side}_ids'. {fix}"
                )
        return cache

    def _write_ref_cache(self, dataset, name, batch_size, fingerprint, cache_file) -> None:
        if self.is_deepspeed_enabled and self.ref_model is None:
            raise ValueError(
                "Per-token reference precomputation with DeepSpeed needs an explicit `ref_model`; pass one or set "
                "`precompute_ref_log_probs=False`."
            )
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        )
        model = self.ref_model or self.model
        kept = {"chosen": [], "rejected": []}
        for batch in tqdm(loader, desc=f"Computing per-token reference log probs for {name} dataset"):
            model_kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            with self.accelerator.autocast():
                per_token = self._reference_forward(model, {**model_kwargs, "use_cache": False}, labels)
            per_token = per_token[:, -(batch["input_ids"].shape[1] - 1) :]
            # Back to input positions: the log-prob of the token at position p sits at p - 1 after the shift.
            by_position = torch.cat([per_token.new_zeros(per_token.shape[0], 1), per_token], dim=1).float().cpu()
            completion = batch["completion_mask"].bool().cpu()
            rows = [by_position[i][completion[i]].tolist() for i in range(by_position.shape[0])]
            half = len(rows) // 2
            # One object per pair, so that `gather_for_metrics` drops the padding duplicates of the last batch.
            pairs = self.accelerator.gather_for_metrics(list(zip(rows[:half], rows[half:])), use_gather_object=True)
            for chosen, rejected in pairs:
                kept["chosen"].append(chosen)
                kept["rejected"].append(rejected)

        if not self.accelerator.is_main_process:
            return
        keep_start = self.args.truncation_mode == "keep_start"

        def to_full_length(values: list[float], completion_length: int) -> list[float]:
            # The collator truncates the same way, so the zeros land exactly on tokens it removes.
            missing = [0.0] * (completion_length - len(values))
            return values + missing if keep_start else missing + values

        def add_columns(batch, indices):
            columns = {}
            for side in ("chosen", "rejected"):
                token_logps = [
                    to_full_length(kept[side][index], len(ids)) for index, ids in zip(indices, batch[f"{side}_ids"])
                ]
                columns[f"ref_{side}_logps"] = [sum(values) for values in token_logps]
                columns[f"ref_{side}_token_logps"] = token_logps
            return columns

        dataset.map(
            add_columns,
            with_indices=True,
            batched=True,
            remove_columns=dataset.column_names,
            new_fingerprint=fingerprint,
            cache_file_name=cache_file,
            desc=f"Caching per-token reference log probs for {name} dataset",
        )

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        if self.token_loss_type is None:
            return super()._compute_loss(model, inputs, return_outputs)
        if self.token_loss_type == "aligndistil":
            return self._aligndistil_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        non_model_keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *TOKEN_BATCH_KEYS}
        model_kwargs = {key: value for key, value in inputs.items() if key not in non_model_keys}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:]
        seq_len = shift_mask.size(1)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)

        valid = shift_mask.bool()
        if self.fused_distribution:
            outputs, ref_per_token_logps, distribution = self._fused_distribution_forward(
                model, model_kwargs, labels, valid, seq_len
            )
            per_token_logps = outputs.log_probs
        else:
            # Full-distribution losses read the backbone's last hidden state during this same forward.
            policy_lm = causal_lm_of(model, self.accelerator)
            reads_hidden = self.token_loss_type in _HIDDEN_STATE_LOSS_TYPES
            with capture_last_hidden_state(policy_lm) if reads_hidden else contextlib.nullcontext({}) as policy_capture:
                outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens.
            per_token_logps = outputs.log_probs[:, -seq_len:]
            if "ref_token_logps" in inputs:
                ref_per_token_logps = inputs["ref_token_logps"][:, 1:].to(per_token_logps.dtype)
                ref_capture = {}
            else:
                ref_model = self.ref_model if self.ref_model is not None else self.model
                with self._reference_capture(ref_model) as ref_capture:
                    ref_per_token_logps = self._reference_forward(ref_model, model_kwargs, labels)[:, -seq_len:]
            distribution = None
            if reads_hidden:
                distribution = self._distribution_signals(policy_lm, policy_capture, ref_capture, valid, seq_len)
        per_token_logratios = torch.where(valid, per_token_logps - ref_per_token_logps, 0.0)

        per_pair_loss = self._token_level_loss(
            mode, inputs, model_kwargs, labels, per_token_logps, ref_per_token_logps, per_token_logratios, shift_mask,
            distribution,
        )  # fmt: skip
        loss = per_pair_loss.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)
        ref_chosen_logps, ref_rejected_logps = ref_per_token_logps.sum(dim=1).chunk(2, dim=0)
        self._log_dpo_metrics(
            mode,
            inputs,
            outputs,
            seq_len,
            chosen_logps,
            rejected_logps,
            chosen_logps - ref_chosen_logps,
            rejected_logps - ref_rejected_logps,
        )
        if return_outputs:
            # TRL's deprecated `compute_metrics` path needs logits: one extra no-grad forward, as in `DPOTrainer`.
            with torch.no_grad():
                outputs = model(**{k: v for k, v in model_kwargs.items() if k != "output_router_logits"})
            return loss, outputs
        return loss

    @contextlib.contextmanager
    def _reference_capture(self, ref_model):
        """During the reference forward, capture what the full-distribution loss needs from the reference."""
        if self.token_loss_type not in _HIDDEN_STATE_LOSS_TYPES:
            yield {}
            return
        ref_lm = causal_lm_of(ref_model, self.accelerator)
        with contextlib.ExitStack() as stack:
            capture = {"lm": ref_lm, "hidden": stack.enter_context(capture_last_hidden_state(ref_lm))}
            if self.token_loss_type == "mapo":
                capture["activations"] = stack.enter_context(record_activation_means(ref_lm, self.args.mapo_hooks))
            if self.token_loss_type == "sparsepo":
                capture["layers"] = stack.enter_context(record_layer_outputs(ref_lm))
            yield capture

    def _fused_distribution_forward(self, model, model_kwargs, labels, valid, seq_len):
        """Policy and reference backbones only, then ONE tiled pass over both LM heads (`ops.fused`).

        Returns `(outputs, ref_per_token_logps, distribution)`: `outputs` carries the per-token `log_probs` (with
        gradient), `entropy`, `mean_logits` and `is_top1` `(2B, L-1)` that TRL's fused head would return (0 outside
        completions), `ref_per_token_logps` the reference's log-probs, and `distribution` the KL(π_ref‖π_θ) plus the
        SparsePO/MaPO token masks.
        """
        with self.accelerator.autocast():
            policy_outputs = model(**model_kwargs, backbone_only=True)
        policy_hidden = policy_outputs.last_hidden_state
        ref_model = self.ref_model if self.ref_model is not None else self.model
        with self._reference_capture(ref_model) as ref_capture:
            ref_hidden = self._reference_forward(ref_model, model_kwargs, labels, backbone_only=True)
        policy_head = lm_head_params(causal_lm_of(model, self.accelerator))
        ref_head = lm_head_params(ref_capture["lm"])

        def rows(states):  # (2B, L, ...) -> (N, ...): the positions that predict a completion token
            return states[:, :-1][:, -seq_len:][valid]

        stats = fused_token_statistics(
            rows(policy_hidden), policy_head["weight"], policy_head["bias"], labels[:, 1:][:, -seq_len:][valid],
            rows(ref_hidden), ref_head["weight"], ref_head["bias"], direction="forward",
            logit_scale=policy_head["logit_scale"], softcap=policy_head["softcap"],
            teacher_logit_scale=ref_head["logit_scale"], teacher_softcap=ref_head["softcap"], backend=self.fused_backend,
        )  # fmt: skip

        def per_token(values):  # masked_scatter keeps an all-masked batch connected to the graph (a zero loss)
            return values.new_zeros(valid.shape).masked_scatter(valid, values)

        outputs = SimpleNamespace(
            log_probs=per_token(stats.log_probs), entropy=per_token(stats.entropy),
            mean_logits=per_token(stats.mean_logits), is_top1=per_token(stats.is_top1),
            aux_loss=policy_outputs.get("aux_loss"),
        )  # fmt: skip
        distribution = {"kl": per_token(stats.kl), **self._token_masks(ref_capture, valid, seq_len)}
        return outputs, per_token(stats.ref_log_probs), distribution

    def _distribution_signals(self, policy_lm, policy_capture, ref_capture, valid, seq_len) -> dict:
        """Per-token KL(π_ref‖π_θ) `(2B, L-1)` from hidden states in tiles, plus the SparsePO/MaPO token masks."""
        policy_head, ref_head = lm_head_params(policy_lm), lm_head_params(ref_capture["lm"])
        kl = chunked_token_kl(
            policy_capture["hidden"][:, :-1][:, -seq_len:][valid], policy_head["weight"], policy_head["bias"],
            ref_capture["hidden"]["hidden"][:, :-1][:, -seq_len:][valid], ref_head["weight"], ref_head["bias"],
            direction="forward", student_logit_scale=policy_head["logit_scale"],
            teacher_logit_scale=ref_head["logit_scale"], student_softcap=policy_head["softcap"],
            teacher_softcap=ref_head["softcap"], backend=self.args.token_kernel,
        )  # fmt: skip
        kl = torch.zeros(valid.shape, dtype=kl.dtype, device=kl.device).masked_scatter(valid, kl)
        return {"kl": kl, **self._token_masks(ref_capture, valid, seq_len)}

    def _token_masks(self, ref_capture, valid, seq_len) -> dict:
        """SparsePO's learned or MaPO's activation-based token masks `(2B, L-1)` from the reference's activations."""

        def at_predicting_positions(states):  # (2B, L, ...) -> (2B, L-1, ...), the positions that predict y_t
            return states[:, :-1][:, -seq_len:]

        signals = {}
        if self.token_loss_type == "mapo":
            per_type = []
            for means in ref_capture["activations"].values():
                masks = [
                    mapo_zn_rescale(at_predicting_positions(m), valid, self.args.mapo_degenerate_fill) for m in means
                ]
                per_type.append(torch.stack(masks).mean(0))
            signals["reward_mask"] = torch.stack(per_type).mean(0)
        elif self.token_loss_type == "sparsepo":
            layers = [at_predicting_positions(h) for h in ref_capture["layers"]]
            signals["reward_mask"] = self.sparsepo_masks[0](layers)
            if len(self.sparsepo_masks) == 2:
                signals["kl_mask"] = self.sparsepo_masks[1](layers)
        return signals

    def _token_level_loss(
        self,
        mode,
        inputs,
        model_kwargs,
        labels,
        per_token_logps,
        ref_per_token_logps,
        per_token_logratios,
        shift_mask,
        distribution=None,
    ) -> torch.Tensor:
        """Dispatch to the ops function of `token_loss_type`; returns the per-pair loss `(B,)`."""
        chosen_logratios, rejected_logratios = per_token_logratios.chunk(2, dim=0)
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        loss_type = self.token_loss_type

        if distribution is not None:
            return self._full_distribution_loss(
                mode, chosen_logratios, rejected_logratios, chosen_mask, rejected_mask, shift_mask, distribution
            )

        if loss_type in ("weighted", "cdpo"):
            weights = inputs["token_weights"][:, 1:].to(per_token_logratios.dtype)
            chosen_weights, rejected_weights = weights.chunk(2, dim=0)
            self._log_token_stats(mode, "token_weights", weights, shift_mask)
            if loss_type == "weighted":
                return weighted_dpo_loss(
                    chosen_logratios, rejected_logratios, chosen_weights, rejected_weights,
                    chosen_mask, rejected_mask, self.beta,
                )  # fmt: skip
            return cdpo_loss(
                chosen_logratios, rejected_logratios, chosen_weights, rejected_weights,
                chosen_mask, rejected_mask, self.beta, aggregation=self.args.cdpo_aggregation,
            )  # fmt: skip

        rewards = self._token_rewards(inputs, model_kwargs, labels, ref_per_token_logps, shift_mask)
        self._log_token_stats(mode, "token_rewards", rewards, shift_mask)
        chosen_rewards, rejected_rewards = rewards.chunk(2, dim=0)
        if loss_type == "tgdpo":
            chosen_weights, rejected_weights = tgdpo_token_weights(
                chosen_rewards, rejected_rewards, self.args.tgdpo_alpha, self.beta, self.args.tgdpo_min_weight
            )
            self._log_token_stats(mode, "token_weights", torch.cat([chosen_weights, rejected_weights]), shift_mask)
            return weighted_dpo_loss(
                chosen_logratios, rejected_logratios, chosen_weights, rejected_weights,
                chosen_mask, rejected_mask, self.beta,
            )  # fmt: skip
        chosen_logps, rejected_logps = per_token_logps.chunk(2, dim=0)
        loss, parts = treg_loss(
            chosen_logratios, rejected_logratios, chosen_rewards, rejected_rewards, chosen_mask, rejected_mask,
            self.beta, self.args.treg_alpha, reg_form=self.args.treg_reg_form,
            reg_reduction=self.args.treg_reg_reduction, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        )  # fmt: skip
        for key in ("reg_chosen", "reg_rejected", "pair_weight"):
            self._metrics[mode][f"treg/{key}"].append(self.accelerator.gather(parts[key].detach()).mean().item())
        return loss

    def _full_distribution_loss(
        self, mode, chosen_logratios, rejected_logratios, chosen_mask, rejected_mask, shift_mask, distribution
    ) -> torch.Tensor:
        chosen_kl, rejected_kl = distribution["kl"].chunk(2, dim=0)
        if self.token_loss_type in ("tdpo1", "tdpo2"):
            loss, parts = tdpo_loss(
                chosen_logratios, rejected_logratios, chosen_kl, rejected_kl, chosen_mask, rejected_mask,
                self.beta, self.args.tdpo_alpha, variant=self.token_loss_type,
            )  # fmt: skip
        else:
            reward_chosen, reward_rejected = distribution["reward_mask"].chunk(2, dim=0)
            kl_chosen, kl_rejected = (
                distribution["kl_mask"].chunk(2, dim=0) if "kl_mask" in distribution else (None, None)
            )
            sparse = self.token_loss_type == "sparsepo"
            loss, parts = sparsepo_loss(
                chosen_logratios, rejected_logratios, chosen_kl, rejected_kl, chosen_mask, rejected_mask,
                reward_chosen, reward_rejected, kl_chosen, kl_rejected, beta=self.beta,
                l1_reward=self.args.sparsepo_l1_reward if sparse else 0.0,
                l1_kl=self.args.sparsepo_l1_kl if sparse else 0.0,
            )  # fmt: skip
            self._log_token_stats(mode, "mask", distribution["reward_mask"], shift_mask)
            for side in ("chosen", "rejected"):
                sparsity = self.accelerator.gather(parts[f"mask_sparsity_{side}"]).mean().item()
                self._metrics[mode][f"mask/{side}_sparsity"].append(sparsity)
        gather = self.accelerator.gather
        seq_kl_chosen, seq_kl_rejected = gather(parts["seq_kl_chosen"]), gather(parts["seq_kl_rejected"])
        self._metrics[mode]["seq_kl/chosen"].append(seq_kl_chosen.mean().item())
        self._metrics[mode]["seq_kl/rejected"].append(seq_kl_rejected.mean().item())
        self._metrics[mode]["seq_kl/margin"].append((seq_kl_chosen - seq_kl_rejected).abs().mean().item())
        return loss

    @torch.no_grad()
    def _aligndistil_policy_samples(self, model, input_ids, attention_mask, completion_mask):
        """On-policy AlignDistil: one sample per prompt from the current policy (temperature 1, no top-k/top-p, up to
        `aligndistil_max_new_tokens`, ending at EOS), laid out as the DPO batch is (prompt then response, right-padded)
        with its completion mask. The prompt is every attended token before the chosen response."""
        prompt_part = attention_mask.bool() & ~completion_mask.bool()
        prompt_rows = [ids[keep].tolist() for ids, keep in zip(input_ids, prompt_part)]
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos_id = tokenizer.eos_token_id
        width = max(len(row) for row in prompt_rows)
        prompts = torch.full((len(prompt_rows), width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        prompt_mask = torch.zeros_like(prompts)
        for i, row in enumerate(prompt_rows):  # left padding for generation
            prompts[i, width - len(row) :] = torch.tensor(row, dtype=input_ids.dtype, device=input_ids.device)
            prompt_mask[i, width - len(row) :] = 1
        policy = self.accelerator.unwrap_model(model)
        sampled = policy.generate(
            input_ids=prompts, attention_mask=prompt_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=self.args.aligndistil_max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
        )[:, width:]  # fmt: skip
        responses = []
        for row in sampled.tolist():
            end = row.index(eos_id) + 1 if eos_id in row else len(row)
            responses.append(row[:end])
        total = max(len(p) + len(r) for p, r in zip(prompt_rows, responses))
        new_ids = torch.full((len(prompt_rows), total), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        new_attention = torch.zeros_like(new_ids)
        new_completion = torch.zeros_like(new_ids)
        for i, (prompt, response) in enumerate(zip(prompt_rows, responses)):
            row = torch.tensor(prompt + response, dtype=input_ids.dtype, device=input_ids.device)
            new_ids[i, : len(row)] = row
            new_attention[i, : len(row)] = 1
            new_completion[i, len(prompt) : len(row)] = 1
        return new_ids, new_attention, new_completion

    def _aligndistil_loss(self, model, inputs, return_outputs):
        r"""AlignDistil: reverse KL from the policy to a per-token extrapolated teacher on the chosen responses
        (off-policy) or on one policy sample per prompt (`aligndistil_on_policy`, `_aligndistil_policy_samples`).

        The teacher logits are a linear combination of two heads, `z* = a_t·z^1 + b_t·z^2` (aligndistil:
        `a = 1+ω_t, b = −ω_t` on DPO / reverse-DPO logits), which equals one projection of the concatenated hidden
        states `[a·h¹ ; b·h² ; a ; b]` with the concatenated head `[W¹, W², bias¹, bias²]`: the chunked reverse-KL
        kernel then never builds logits. ω_t itself comes from a chunked total-variation pass. With the fused pass the
        policy runs its backbone only, and one tiled pass over the policy and teacher heads yields the KL and the
        logged log-probs/entropy (over the KL's positions and the completion tokens, which differ by one position in
        the official mode).
        """
        mode = "train" if self.model.training else "eval"
        batch_size = inputs["input_ids"].shape[0] // 2  # chosen rows only: the student never sees rejected responses
        input_ids, attention_mask = inputs["input_ids"][:batch_size], inputs["attention_mask"][:batch_size]
        completion_mask = inputs["completion_mask"][:batch_size]
        if self.args.aligndistil_on_policy:
            input_ids, attention_mask, completion_mask = self._aligndistil_policy_samples(
                model, input_ids, attention_mask, completion_mask
            )
        seq_len = completion_mask.size(1) - 1
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        model_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        policy_lm = causal_lm_of(model, self.accelerator)
        # Default: the standard causal shift. The official off-policy code masks unshifted positions (tokens 2..T+1);
        # its on-policy code shifts but skips the position predicting the first response token.
        positions = completion_mask[:, 1:]
        if self.args.aligndistil_official_positions:
            if self.args.aligndistil_on_policy:
                first = (completion_mask.cumsum(dim=1) == 1) & completion_mask.bool()
                positions = positions * ~first[:, 1:]
            else:
                positions = completion_mask[:, :-1]
        valid, shift_mask = positions.bool(), completion_mask[:, 1:]
        if self.fused_distribution:
            with self.accelerator.autocast():
                policy_hidden = model(**model_kwargs, backbone_only=True).last_hidden_state
            # Score the KL's positions and the completion tokens (for the logged log-probs) in the same pass.
            valid = valid | shift_mask.bool()
        else:
            with capture_last_hidden_state(policy_lm) as capture:
                outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            policy_hidden = capture["hidden"]
        in_loss = positions.bool()[valid]  # rows of `valid` that are KL positions
        student = policy_hidden[:, :-1][:, -seq_len:][valid]

        dpo_teacher, second = self.aligndistil_teachers[0], self.aligndistil_teachers[1]
        args, beta, beta2 = self.args, self.beta, self.args.aligndistil_beta2
        with torch.no_grad():
            dpo_hidden = backbone_hidden_states(dpo_teacher, input_ids, attention_mask)[:, :-1][valid]
            if args.aligndistil_mode == "theorem1":
                second = self.ref_model if self.ref_model is not None else model
                if self.fused_distribution:
                    second_hidden = self._reference_forward(second, model_kwargs, labels, backbone_only=True)
                else:
                    with capture_last_hidden_state(causal_lm_of(second, self.accelerator)) as ref_capture:
                        self._reference_forward(second, model_kwargs, labels)
                    second_hidden = ref_capture["hidden"]
                second_hidden = second_hidden[:, :-1][:, -seq_len:][valid]
            else:
                second_hidden = backbone_hidden_states(second, input_ids, attention_mask)[:, :-1][valid]
        heads = [lm_head_params(causal_lm_of(m, self.accelerator)) for m in (policy_lm, dpo_teacher, second)]
        if heads[1]["softcap"] is not None or heads[2]["softcap"] is not None:
            raise ValueError(
                "AlignDistil's chunked teacher needs linear logits; teachers with logit softcapping are not supported."
            )

        if args.aligndistil_mode in ("aligndistil", "theorem1_adaptive"):
            tvd = chunked_total_variation(
                dpo_hidden, heads[1]["weight"], second_hidden, heads[2]["weight"], bias_a=heads[1]["bias"],
                bias_b=heads[2]["bias"], logit_scale_a=heads[1]["logit_scale"], logit_scale_b=heads[2]["logit_scale"],
            )  # fmt: skip
            omega = beta2 * tvd + 1e-3
            # aligndistil: z^d + ω(z^d − z^r); theorem1_adaptive: ω·z^d + (1 − ω)·z^r.
            adaptive = args.aligndistil_mode == "theorem1_adaptive"
            first_coef, second_coef = (omega, 1 - omega) if adaptive else (1 + omega, -omega)
            token_coef = beta / omega
        else:
            ratio = torch.full((dpo_hidden.shape[0],), beta / beta2, device=dpo_hidden.device)
            first_coef, second_coef = (ratio, 1 - ratio) if args.aligndistil_mode == "theorem1" else (1 + ratio, -ratio)
            omega, token_coef = ratio, torch.full_like(ratio, beta2)
        first_coef = first_coef * heads[1]["logit_scale"]
        second_coef = second_coef * heads[2]["logit_scale"]
        teacher_hidden = [first_coef[:, None] * dpo_hidden, second_coef[:, None] * second_hidden]
        teacher_weight = [heads[1]["weight"], heads[2]["weight"].to(heads[1]["weight"].dtype)]
        for coef, head in ((first_coef, heads[1]), (second_coef, heads[2])):
            if head["bias"] is not None:  # a bias becomes one more input feature with constant value `coef`
                teacher_hidden.append(coef[:, None])
                teacher_weight.append(head["bias"][:, None].to(teacher_weight[0].dtype))
        teacher = (
            torch.cat(teacher_hidden, dim=-1).to(teacher_weight[0].dtype),
            torch.cat(teacher_weight, dim=1),
            None,
        )
        if self.fused_distribution:
            stats = fused_token_statistics(
                student, heads[0]["weight"], heads[0]["bias"], input_ids[:, 1:][:, -seq_len:][valid], *teacher,
                direction="reverse", temperature=args.aligndistil_temperature, logit_scale=heads[0]["logit_scale"],
                softcap=heads[0]["softcap"], backend=self.fused_backend,
            )  # fmt: skip
            kl = stats.kl

            def completion_tokens(values):  # (N,) over `valid` -> (B, L-1), 0 outside the completion tokens
                values = values.new_zeros(valid.shape).masked_scatter(valid, values)
                return torch.where(shift_mask.bool(), values, 0)

            outputs = SimpleNamespace(
                log_probs=completion_tokens(stats.log_probs), entropy=completion_tokens(stats.entropy)
            )
        else:
            kl = chunked_token_kl(
                student, heads[0]["weight"], heads[0]["bias"], *teacher, direction="reverse",
                temperature=args.aligndistil_temperature, student_logit_scale=heads[0]["logit_scale"],
                student_softcap=heads[0]["softcap"], backend=args.token_kernel,
            )  # fmt: skip
        token_loss = torch.zeros(valid.shape, dtype=kl.dtype, device=kl.device).masked_scatter(
            valid, torch.where(in_loss, token_coef * kl, 0.0)
        )
        per_sequence = token_loss.sum(dim=1)
        if args.aligndistil_len_norm:
            per_sequence = per_sequence / positions.sum(dim=1).clamp(min=1)
        loss = per_sequence.mean()

        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        kl, omega = kl[in_loss], omega[in_loss]
        count = gather(in_loss.sum()).sum().clamp(min=1)
        metrics["aligndistil/kl_mean"].append((gather(kl.detach().sum()).sum() / count).item())
        metrics["aligndistil/omega_mean"].append((gather(omega.sum()).sum() / count).item())
        metrics["aligndistil/omega_max"].append(
            gather(omega.max() if omega.numel() else omega.new_zeros(())).max().item()
        )
        entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum()).sum()
        metrics["entropy"].append((entropy_sum / gather(shift_mask.sum()).sum().clamp(min=1)).item())
        metrics["logps/chosen"].append(gather(outputs.log_probs[:, -seq_len:].detach().sum(dim=1)).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(attention_mask.sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _token_rewards(self, inputs, model_kwargs, labels, ref_per_token_logps, shift_mask) -> torch.Tensor:
        """Per-token rewards `(2B, L-1)`: from the dataset columns, or TGDPO's live `log π_g − log π_ref`."""
        if self.guidance_model is None:
            return inputs["token_rewards"][:, 1:].to(ref_per_token_logps.dtype)
        guidance_logps = self._reference_forward(self.guidance_model, model_kwargs, labels)[:, -shift_mask.size(1) :]
        return torch.where(shift_mask.bool(), guidance_logps - ref_per_token_logps, 0.0)

    @torch.no_grad()
    def compute_token_rewards(self, inputs: dict) -> torch.Tensor:
        """Per-token implicit rewards `β·(log π_θ(y_t) − log π_ref(y_t))` of a collated batch (From r to Q*).

        Returns `(2B, L-1)` aligned with `completion_mask[:, 1:]` (chosen rows, then rejected rows), 0 outside
        completions. Works in stock and token mode, with a reference model, a PEFT adapter-disabled reference, or
        precomputed per-token reference log-probs in the batch.
        """
        inputs = self._prepare_inputs(inputs)
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        model_kwargs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "use_cache": False,
        }
        seq_len = completion_mask.size(1) - 1
        policy_logps = self.model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:]
        if "ref_token_logps" in inputs:
            ref_logps = inputs["ref_token_logps"][:, 1:]
        elif self.ref_model is None and not is_peft_model(self.model):
            raise ValueError(
                "The reference model is not in memory (precompute_ref_log_probs=True without `ref_model`), so token "
                "rewards cannot be computed for new rows. Pass `ref_model=` to the trainer."
            )
        else:
            ref_logps = self._reference_forward(self.ref_model or self.model, model_kwargs, labels)[:, -seq_len:]
        return torch.where(completion_mask[:, 1:].bool(), self.beta * (policy_logps - ref_logps), 0.0)

    # ------------------------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------------------------

    def _log_token_stats(self, mode: str, prefix: str, values: torch.Tensor, shift_mask: torch.Tensor) -> None:
        """Token-weighted mean per side and global min/max over completion tokens, gathered across ranks.

        All statistics travel in one tensor: one gather and one device-to-host copy per call.
        """
        values = values.detach().float()
        valid = shift_mask.bool()
        (chosen, rejected), (chosen_valid, rejected_valid) = values.chunk(2), valid.chunk(2)
        inf = torch.tensor(float("inf"), device=values.device)
        stats = torch.stack([
            torch.where(chosen_valid, chosen, 0.0).sum(), chosen_valid.sum().float(),
            torch.where(rejected_valid, rejected, 0.0).sum(), rejected_valid.sum().float(),
            -torch.where(valid, values, inf).min(), torch.where(valid, values, -inf).max(),
        ])  # fmt: skip
        gathered = self.accelerator.gather(stats[None]).view(-1, 6)
        chosen_sum, chosen_count, rejected_sum, rejected_count = gathered[:, :4].sum(dim=0).tolist()
        low, high = -gathered[:, 4].max().item(), gathered[:, 5].max().item()
        metrics = self._metrics[mode]
        metrics[f"{prefix}/chosen_mean"].append(chosen_sum / chosen_count if chosen_count > 0 else 0.0)
        metrics[f"{prefix}/rejected_mean"].append(rejected_sum / rejected_count if rejected_count > 0 else 0.0)
        if math.isfinite(low):
            metrics[f"{prefix}/min"].append(low)
            metrics[f"{prefix}/max"].append(high)

    def _log_dpo_metrics(
        self, mode, inputs, outputs, seq_len, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios
    ) -> None:
        """The metrics `DPOTrainer` logs, with the same names and meaning (rewards are the unweighted `β·ΣΔ`)."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        chosen_mask, rejected_mask = inputs["completion_mask"][:, 1:].chunk(2, dim=0)
        shift_mask = inputs["completion_mask"][:, 1:]

        entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum()).sum()
        token_count = gather(shift_mask.sum()).sum()
        metrics["entropy"].append((entropy_sum / token_count).item() if token_count > 0 else 0.0)

        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        chosen_mean_logits, rejected_mean_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        for side, mean_logits, mask in (
            ("chosen", chosen_mean_logits, chosen_mask),
            ("rejected", rejected_mean_logits, rejected_mask),
        ):
            total = gather(mean_logits[mask.bool()].sum()).sum().item()
            count = gather(mask.sum()).sum().item()
            metrics[f"logits/{side}"].append(total / count if count > 0 else 0.0)

        chosen_is_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        correct = gather((chosen_is_top1 & chosen_mask.bool()).sum()).sum()
        count = gather(chosen_mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(self.accelerator.gather(accuracies).mean().item())
        metrics["rewards/margins"].append(self.accelerator.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(rejected_logps.detach()).mean().item())
