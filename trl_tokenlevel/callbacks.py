"""Training callbacks: per-token heatmaps of fixed held-out examples while a token-level trainer trains.

```python
from trl_tokenlevel import TokenDPOTrainer
from trl_tokenlevel.callbacks import TokenHeatmapCallback

trainer = TokenDPOTrainer(model=..., args=args, train_dataset=train)
trainer.add_callback(TokenHeatmapCallback(trainer, heldout.select(range(4)), every_n_steps=50))
trainer.train()  # -> <output_dir>/token_heatmaps/step-000000.html, step-000050.html, ... and the reporters
```

What is drawn depends on the trainer (each panel is computed for the same examples at every render):

- `TokenDPOTrainer`: the implicit token reward `β·(log π_θ(y_t) − log π_ref(y_t))` of each chosen and rejected
  completion (From r to Q*), from `TokenDPOTrainer.compute_token_rewards`.
- `TokenSFTTrainer`: the policy's probability of each target token and its entropy; the CHORD-φ weight `p(1 − p)`
  (`token_loss_type="chord_phi"`), the `token_weights` column (`"weighted"`, when the examples carry it), ssToken's
  retrospective excess loss and its kept-token mask (`token_selection="sstoken"`).
- `TokenGRPOTrainer`: a greedy completion of each prompt, its per-token entropy and, with
  `token_selection="entropy_quantile"`, the 80/20 high-entropy mask (the quantile is taken over the drawn completions,
  not over a training batch).

Every process computes the panels (so models sharded with FSDP or ZeRO-3 run their forward on all ranks) and only the
main process writes the page and logs it: to TensorBoard as Markdown text, to Weights & Biases as HTML and to Trackio as
Markdown, for whichever of these reporters `report_to` turns on.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
from transformers import TrainerCallback

from trl_tokenlevel.viz import HeatmapPanel, TokenRow, token_heatmap_markdown, token_heatmap_page

PanelFn = Callable[[object, list[dict]], list[HeatmapPanel]]


class TokenHeatmapCallback(TrainerCallback):
    """Render per-token signals of a few fixed examples every `every_n_steps` optimizer steps.

    Args:
        trainer: the `TokenDPOTrainer`, `TokenGRPOTrainer` or `TokenSFTTrainer` to watch (as TRL's
            `LogCompletionsCallback`, the callback needs the trainer, not only the model).
        examples: rows in the trainer's dataset format (preference pairs, prompts, or SFT examples); keep it to a
            handful: each render runs a no-grad forward (and, for GRPO, a generation) on all of them.
        every_n_steps: render at step 0 (before training), every `every_n_steps` steps and at the last step.
        output_subdir: pages go to `<output_dir>/<output_subdir>/step-XXXXXX.html`.
        max_new_tokens: GRPO only, length of the greedy completions (default: `max_completion_length`, at most 64).
        panels_fn: `(trainer, examples) -> list[HeatmapPanel]` to draw something else; defaults to the trainer's.
    """

    def __init__(
        self,
        trainer,
        examples: Sequence[dict],
        every_n_steps: int = 50,
        output_subdir: str = "token_heatmaps",
        max_new_tokens: int | None = None,
        panels_fn: PanelFn | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.examples = [dict(row) for row in examples]
        if not self.examples:
            raise ValueError("TokenHeatmapCallback needs at least one example to draw.")
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.output_subdir = output_subdir
        self.panels_fn = panels_fn or _default_panels_fn(trainer, max_new_tokens)
        self.written: list[str] = []
        self._last_step: int | None = None

    # -- TrainerCallback hooks --------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.render(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self.render(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.render(state.global_step)

    # -- rendering ----------------------------------------------------------------------------------------------------

    def render(self, step: int) -> str | None:
        """Compute the panels (every process), then write and log them (main process). Returns the page's path."""
        if step == self._last_step:
            return None
        self._last_step = step
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                panels = self.panels_fn(self.trainer, self.examples)
        finally:
            model.train(was_training)
        if not self.trainer.is_world_process_zero():
            return None
        folder = os.path.join(self.trainer.args.output_dir, self.output_subdir)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{step:06d}.html")
        title = f"{type(self.trainer).__name__}: per-token signals at step {step}"
        page = token_heatmap_page(panels, title)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(page)
        self.written.append(path)
        self._log_to_reporters(panels, page, step)
        return path

    def _log_to_reporters(self, panels: list[HeatmapPanel], page: str, step: int) -> None:
        from transformers.integrations import TensorBoardCallback, TrackioCallback, WandbCallback

        markdown = token_heatmap_markdown(panels)
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.add_text("token_heatmaps", markdown, global_step=step)
                callback.tb_writer.flush()
            elif isinstance(callback, WandbCallback) and callback._wandb.run is not None:
                callback._wandb.log({"token_heatmaps": callback._wandb.Html(page), "train/global_step": step})
            elif isinstance(callback, TrackioCallback) and getattr(callback, "_initialized", False):
                trackio = callback._trackio
                if hasattr(trackio, "Markdown"):  # releases without Markdown reports get the HTML file only
                    trackio.log({"token_heatmaps": trackio.Markdown(markdown)}, step=step)


# ----------------------------------------------------------------------------------------------------------------------
# What each trainer draws
# ----------------------------------------------------------------------------------------------------------------------


def _default_panels_fn(trainer, max_new_tokens: int | None) -> PanelFn:
    from trl_tokenlevel.trainers.token_dpo_trainer import TokenDPOTrainer
    from trl_tokenlevel.trainers.token_grpo_trainer import TokenGRPOTrainer
    from trl_tokenlevel.trainers.token_sft_trainer import TokenSFTTrainer

    for trainer_class, panels_fn in (
        (TokenDPOTrainer, dpo_panels),
        (TokenGRPOTrainer, functools.partial(grpo_panels, max_new_tokens=max_new_tokens)),
        (TokenSFTTrainer, sft_panels),
    ):
        if isinstance(trainer, trainer_class):
            return panels_fn
    raise TypeError(
        f"TokenHeatmapCallback draws TokenDPOTrainer, TokenGRPOTrainer and TokenSFTTrainer signals, got "
        f"{type(trainer).__name__}; pass panels_fn=(trainer, examples) -> list[HeatmapPanel] for other trainers."
    )


def _tokenizer(trainer):
    processing_class = trainer.processing_class
    return getattr(processing_class, "tokenizer", processing_class)


def _decode(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([token]) for token in ids]


def _prompt_title(prompt, limit: int = 80) -> str:
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    text = " ".join(text.split())
    return text if len(text) <= limit else "…" + text[-limit:]


def dpo_panels(trainer, examples: list[dict]) -> list[HeatmapPanel]:
    """Implicit token rewards of the chosen and rejected completions, one row each (chosen first)."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from trl_tokenlevel.data import tokenize_preference_dataset

    tokenizer = _tokenizer(trainer)
    columns = ("prompt", "chosen", "rejected")
    tokenized = tokenize_preference_dataset(Dataset.from_list([{k: row[k] for k in columns} for row in examples]),
                                            trainer.processing_class)  # fmt: skip
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(list(tokenized))
    rewards = trainer.compute_token_rewards(batch).float().cpu()
    mask = batch["completion_mask"][:, 1:].bool()
    n = len(examples)
    rows = []
    for i in range(n):
        for side, row in (("chosen", i), ("rejected", n + i)):
            ids = batch["input_ids"][row, 1:][mask[row]].tolist()
            title = f"{side}: {_prompt_title(examples[i]['prompt'])}"
            rows.append(TokenRow(title, _decode(tokenizer, ids), rewards[row][mask[row]].tolist()))
    return [HeatmapPanel("Implicit token reward β·log π_θ/π_ref", rows, "reward")]


def _label_statistics(model, input_ids, attention_mask, labels, output_attentions: bool = False):
    """`(log p(y_t), entropy, outputs)` at every label position `[B, T-1]` from a full-logits forward.

    Full logits are fine here: the callback draws a handful of short examples.
    """
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=output_attentions,
                    use_cache=False)  # fmt: skip
    log_probs = outputs.logits[:, :-1].float().log_softmax(dim=-1)
    targets = labels[:, 1:]
    label_log_probs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return label_log_probs, entropy, outputs


def sft_panels(trainer, examples: list[dict]) -> list[HeatmapPanel]:
    """Target-token probability and entropy over the loss tokens, plus the active method's weights or selection."""
    from datasets import Dataset

    from trl_tokenlevel.data.sft_columns import tokenize_sft_dataset
    from trl_tokenlevel.ops.sft import (
        attention_prompt_mass,
        retrospective_excess_loss,
        ss_token_scores,
        ss_token_select,
    )

    args, tokenizer, model = trainer.args, _tokenizer(trainer), trainer.model
    tokenized = tokenize_sft_dataset(
        Dataset.from_list(examples), trainer.processing_class, completion_only_loss=args.completion_only_loss,
        assistant_only_loss=args.assistant_only_loss, dataset_text_field=args.dataset_text_field,
    )  # fmt: skip
    width = max(len(ids) for ids in tokenized["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in tokenized["input_ids"]], device=device)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in tokenized["input_ids"]],
                                  device=device)  # fmt: skip
    labels = torch.tensor([list(lab) + [-100] * (width - len(lab)) for lab in tokenized["labels"]], device=device)
    valid = labels[:, 1:] != -100

    sstoken = getattr(trainer, "token_selection", None) == "sstoken"
    wants_attention = sstoken and args.sstoken_gamma > 0
    log_probs, entropy, outputs = _label_statistics(model, input_ids, attention_mask, labels, wants_attention)
    probs = log_probs.exp()
    signals = [
        ("Probability of the target token", "p(y_t)", probs),
        ("Entropy of the policy (nats)", "entropy", entropy),
    ]

    method = getattr(trainer, "token_loss_type", None)
    if method == "chord_phi" and args.chord_weighting != "none":
        clamped = probs.clamp(max=args.chord_cutoff_prob)
        weights = clamped * (1 - clamped) if args.chord_weighting == "phi" else clamped
        signals.append((f"CHORD weight ({args.chord_weighting})", "weight", weights))
    if method == "weighted" and all("token_weights" in row for row in examples):
        weights = torch.zeros_like(probs)
        for i, row in enumerate(examples):
            weights[i][valid[i]] = torch.tensor(row["token_weights"], dtype=weights.dtype, device=weights.device)
        signals.append(("Token weight (token_weights column)", "weight", weights))
    if sstoken and trainer.history_model is not None:
        # The trainer's own history forward: the copied model's forward is not meant to be called directly.
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        history_log_probs = trainer._history_log_probs(batch, labels[:, 1:], valid).float()
        rel = retrospective_excess_loss(log_probs, history_log_probs) * valid
        if wants_attention:
            layer = outputs.attentions[args.sstoken_attention_layer].float()
            prompt = (labels == -100) & attention_mask.bool()
            attention_scores = attention_prompt_mass(layer, prompt)[:, 1:]
        else:
            attention_scores = torch.zeros_like(rel)
        scores = ss_token_scores(
            rel, attention_scores, valid, gamma=args.sstoken_gamma, norm_scope=args.sstoken_norm_scope
        )
        keep = ss_token_select(scores, valid, ratio=args.sstoken_ratio, scope=args.sstoken_select_scope)
        signals.append(("ssToken retrospective excess loss", "REL", rel))
        signals.append(("ssToken kept tokens", "kept", keep.float()))

    panels = []
    for name, value_name, values in signals:
        rows = []
        for i, row in enumerate(examples):
            ids = labels[i, 1:][valid[i]].tolist()
            title = _prompt_title(row["prompt"]) if "prompt" in row else f"example {i}"
            rows.append(TokenRow(title, _decode(tokenizer, ids), values[i][valid[i]].float().cpu().tolist()))
        labels_01 = ("dropped", "kept") if value_name == "kept" else None
        panels.append(HeatmapPanel(name, rows, value_name, labels_01))
    return panels


def grpo_panels(trainer, examples: list[dict], max_new_tokens: int | None = None) -> list[HeatmapPanel]:
    """Greedy completions of the example prompts, their per-token entropy and the 80/20 high-entropy selection."""
    from trl.data_utils import maybe_apply_chat_template

    from trl_tokenlevel.ops.selection import high_entropy_token_mask

    args, tokenizer, model = trainer.args, _tokenizer(trainer), trainer.model
    max_new_tokens = max_new_tokens or min(args.max_completion_length or 64, 64)
    prompts = [maybe_apply_chat_template({"prompt": row["prompt"]}, tokenizer)["prompt"] for row in examples]
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    device = next(model.parameters()).device
    encoded = {key: value.to(device) for key, value in encoded.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    prompt_width = encoded["input_ids"].shape[1]
    completion = sequences[:, prompt_width:]
    # Completion tokens up to and including the first end-of-sequence token.
    eos = torch.tensor(sorted(_eos_ids(model, tokenizer)), device=device)
    is_eos = torch.isin(completion, eos)
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    completion_mask = ~after_eos
    attention_mask = torch.cat([encoded["attention_mask"], completion_mask.long()], dim=1)
    labels = torch.cat([torch.full_like(encoded["input_ids"], -100), completion.masked_fill(after_eos, -100)], dim=1)
    _, entropy, _ = _label_statistics(model, sequences, attention_mask, labels)
    entropy = entropy[:, prompt_width - 1 :]

    signals = [("Entropy of the policy at each completion token (nats)", "entropy", entropy)]
    if getattr(args, "token_selection", None) == "entropy_quantile":
        selected = high_entropy_token_mask(entropy, completion_mask, rho=args.entropy_top_ratio,
                                           entropy_selection=args.entropy_selection)  # fmt: skip
        signals.append((f"80/20 selection (top {args.entropy_top_ratio:.0%} entropy)", "selected", selected.float()))
    panels = []
    for name, value_name, values in signals:
        rows = []
        for i, row in enumerate(examples):
            ids = completion[i][completion_mask[i]].tolist()
            rows.append(TokenRow(_prompt_title(row["prompt"]), _decode(tokenizer, ids),
                                 values[i][completion_mask[i]].float().cpu().tolist()))  # fmt: skip
        labels_01 = ("not selected", "selected") if value_name == "selected" else None
        panels.append(HeatmapPanel(name, rows, value_name, labels_01))
    return panels


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else ({configured} if configured is not None else set())
    return ids
