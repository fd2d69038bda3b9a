"""Offline signal builders: add per-token reward and weight columns to a preference dataset.

Every builder tokenizes exactly as `TokenDPOTrainer` will (`tokenize_preference_dataset`), scores each completion
token with frozen models under `no_grad`, batched on the models' device with a progress bar, and returns the dataset
with one float per completion token (EOS / end-of-turn included) in the new columns. Log-probabilities come from the
backbone's hidden states and the chunked ops, so no `[batch, seq, vocab]` logits are built here either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.token_columns import _tokenizer_of, tokenize_preference_dataset
from ..ops.chunked import (
    backbone_hidden_states,
    chunked_contrastive_logprobs,
    chunked_token_logprobs,
    lm_head_params,
)

# [unverified] T-REG's contrastive prompts are not public; these follow the paper's description (ask for a better /
# worse revision along helpfulness, correctness, coherence and conciseness). Pass your own templates for real runs.
TREG_BETTER_TEMPLATE = "{prompt}\n(Answer in the most helpful, correct, coherent and concise way.)"
TREG_WORSE_TEMPLATE = "{prompt}\n(Answer in an unhelpful, incorrect, incoherent and verbose way.)"

# Scores one batch: (hidden states of each model at the predicting positions [N, H], targets [N]) -> values [N].
TokenScorer = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


def _right_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def score_completion_tokens(
    models: Sequence[PreTrainedModel],
    prompt_ids: Sequence[Sequence[Sequence[int]]],
    completion_ids: Sequence[Sequence[int]],
    scorer: TokenScorer,
    pad_token_id: int,
    batch_size: int = 8,
    desc: str = "Scoring completion tokens",
) -> list[list[float]]:
    """Score every completion token with `scorer`; one list of floats per completion.

    `prompt_ids[m][i]` is the context model `m` sees before completion `i` (contexts may differ between models, as in
    T-REG's contrastive prompts; the completion ids are always identical). A token at sequence position 0 (empty
    context) has no predicting position and gets 0.
    """
    results: list[list[float]] = []
    for start in tqdm(range(0, len(completion_ids), batch_size), desc=desc):
        completions = completion_ids[start : start + batch_size]
        hiddens, targets = [], None
        for model, contexts in zip(models, prompt_ids):
            contexts = contexts[start : start + batch_size]
            input_ids, attention_mask = _right_pad([list(c) + list(y) for c, y in zip(contexts, completions)],
                                                   pad_token_id, model.device)  # fmt: skip
            # Position p - 1 predicts the token at p: mark the predicting positions of completion tokens.
            predicts_completion = torch.zeros_like(attention_mask, dtype=torch.bool)
            for row, (context, completion) in enumerate(zip(contexts, completions)):
                first = max(len(context), 1)  # a token at position 0 has no predictor
                predicts_completion[row, first - 1 : len(context) + len(completion) - 1] = True
            hidden = backbone_hidden_states(model, input_ids, attention_mask)
            hiddens.append(hidden[predicts_completion])
            # The completion ids are the same under every context, so targets agree across models.
            targets = input_ids[:, 1:][predicts_completion[:, :-1]]
        values = scorer(hiddens, targets).float().cpu().tolist()
        offset = 0
        for context, completion in zip(prompt_ids[0][start:], completions):
            scored = len(completion) - (1 if len(context) == 0 else 0)
            padding = [0.0] * (len(completion) - scored)
            results.append(padding + values[offset : offset + scored])
            offset += scored
    return results


def _logprob_scorer(model: PreTrainedModel, index: int = 0) -> TokenScorer:
    head = lm_head_params(model)

    def score(hiddens, targets):
        return chunked_token_logprobs(
            hiddens[index], head["weight"], head["bias"], targets,
            logit_scale=head["logit_scale"], softcap=head["softcap"],
        )  # fmt: skip

    return score


def _check_same_vocabulary(*models: PreTrainedModel) -> None:
    widths = {model.get_output_embeddings().weight.shape[0] for model in models}
    if len(widths) > 1:
        raise ValueError(
            f"The models' LM heads cover different vocabularies ({sorted(widths)} tokens). Token-level signals need "
            "models that share the tokenizer (e.g. fine-tunes of the same base)."
        )


def _pad_id(processing_class) -> int:
    tokenizer = _tokenizer_of(processing_class)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def add_dpo_token_rewards(
    dataset: Dataset,
    dpo_model: PreTrainedModel,
    ref_model: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase,
    *,
    scale: float = 1.0,
    clip: float | None = None,
    batch_size: int = 8,
) -> Dataset:
    r"""Add `chosen_token_rewards` / `rejected_token_rewards` from a DPO model's per-token log-ratio:

        r_t = clip( scale · [log π_dpo(y_t|s_t) − log π_ref(y_t|s_t)], −clip, +clip )

    - TGDPO ([paper](https://huggingface.co/papers/2506.14574)): `scale=1` (the trainer multiplies by α·β itself).
    - From r to Q* ([paper](https://huggingface.co/papers/2404.12358)): `scale=β` of the DPO model gives the implicit
      token reward `β·log π_dpo/π_ref`, whose sum is the DPO sequence reward.
    - RTO ([paper](https://huggingface.co/papers/2404.18922)) dense shaping term: `scale=0.05, clip=0.05`.

    The reference should be the model the DPO model was trained from (the training reference in TGDPO).
    """
    _check_same_vocabulary(dpo_model, ref_model)
    tokenized = tokenize_preference_dataset(dataset, processing_class)
    dpo_score, ref_score = _logprob_scorer(dpo_model, 0), _logprob_scorer(ref_model, 1)

    def scorer(hiddens, targets):
        rewards = scale * (dpo_score(hiddens, targets) - ref_score(hiddens, targets))
        return rewards if clip is None else rewards.clamp(-clip, clip)

    for side in ("chosen", "rejected"):
        prompts = tokenized["prompt_ids"]
        values = score_completion_tokens(
            [dpo_model, ref_model], [prompts, prompts], tokenized[f"{side}_ids"], scorer, _pad_id(processing_class),
            batch_size, desc=f"DPO token rewards ({side})",
        )  # fmt: skip
        dataset = dataset.add_column(f"{side}_token_rewards", values)
    return dataset


def add_critical_token_weights(
    dataset: Dataset,
    positive_model: PreTrainedModel,
    negative_model: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase,
    *,
    gamma: float = 1.0,
    only_neg: bool = True,
    eos_weight_one: bool = True,
    batch_size: int = 8,
) -> Dataset:
    r"""Add cDPO critical-token weights ([paper](https://huggingface.co/papers/2411.19943)) by contrastive estimation:

        p_ce,t(y) = softmax( (1+γ)·z⁺_t − γ·z⁻_t )[y_t]          (z± = positive / negative model logits)
        rejected_token_weights = 1 − p_ce(y_l)                      chosen_token_weights = p_ce(y_w)  (only_neg=False)

    With `only_neg=True` (official default) no chosen column is written: the trainer then weights chosen tokens by 1.
    `eos_weight_one=True` (official code) gives the final EOS / end-of-turn token weight 1 on both sides, and so any
    chat-template suffix after it (ChatML's "\n" after `<|im_end|>`). The two
    models are typically LoRA fine-tunes of the base on correct (positive) and incorrect (negative) trajectories.
    """
    _check_same_vocabulary(positive_model, negative_model)
    tokenized = tokenize_preference_dataset(dataset, processing_class)
    positive_head, negative_head = lm_head_params(positive_model), lm_head_params(negative_model)

    def scorer(hiddens, targets):
        log_p_ce = chunked_contrastive_logprobs(
            hiddens[0], positive_head["weight"], hiddens[1], negative_head["weight"], targets, gamma,
            pos_bias=positive_head["bias"], neg_bias=negative_head["bias"],
            logit_scale=positive_head["logit_scale"], softcap=positive_head["softcap"],
        )  # fmt: skip
        return log_p_ce.exp()

    eos_id = _tokenizer_of(processing_class).eos_token_id
    sides = ("rejected",) if only_neg else ("chosen", "rejected")
    for side in sides:
        completions = tokenized[f"{side}_ids"]
        prompts = tokenized["prompt_ids"]
        p_ce = score_completion_tokens(
            [positive_model, negative_model], [prompts, prompts], completions, scorer, _pad_id(processing_class),
            batch_size, desc=f"Critical-token weights ({side})",
        )  # fmt: skip
        weights = [[1.0 - p for p in row] if side == "rejected" else row for row in p_ce]
        if eos_weight_one:
            for row, ids in zip(weights, completions):
                if eos_id in ids:
                    # The last EOS / end-of-turn token, and any chat-template suffix after it (e.g. "\n"), weigh 1.
                    last_eos = len(ids) - 1 - ids[::-1].index(eos_id)
                    row[last_eos:] = [1.0] * (len(ids) - last_eos)
        dataset = dataset.add_column(f"{side}_token_weights", weights)
    return dataset


def _apply_template(prompt, template: str):
    """Wrap a plain-text prompt, or the last user message of a conversational prompt, in `template`."""
    if isinstance(prompt, str):
        return template.format(prompt=prompt)
    messages = [dict(message) for message in prompt]
    last_user = max(i for i, message in enumerate(messages) if message["role"] == "user")
    messages[last_user]["content"] = template.format(prompt=messages[last_user]["content"])
    return messages


def add_contrastive_prompt_rewards(
    dataset: Dataset,
    evaluator: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase,
    *,
    better_template: str = TREG_BETTER_TEMPLATE,
    worse_template: str = TREG_WORSE_TEMPLATE,
    batch_size: int = 8,
) -> Dataset:
    r"""Add T-REG self-generated token rewards ([paper](https://huggingface.co/papers/2412.02685)):

        r̂_t = σ( log π_e(y_t | x⁺, y_<t) − log π_e(y_t | x⁻, y_<t) ) − 0.5       ∈ (−0.5, 0.5)

    `x⁺` / `x⁻` are the prompt wrapped in `better_template` / `worse_template` (each with a `{prompt}` placeholder;
    for conversational data the last user message is wrapped). The response token ids are identical in both contexts:
    the completion is tokenized once, as the trainer does, and appended to each context's prompt ids. The evaluator is
    usually the initial policy. The templates are [unverified] (no official code): treat them as a knob.
    """
    if "prompt" not in dataset.column_names:
        raise ValueError(
            "add_contrastive_prompt_rewards needs an explicit 'prompt' column to wrap in the templates; got columns "
            f"{dataset.column_names}. Split prompt and completions first (trl.extract_prompt)."
        )
    tokenized = tokenize_preference_dataset(dataset, processing_class)
    contexts = []
    for template in (better_template, worse_template):
        wrapped = dataset.map(lambda row, template=template: {"prompt": _apply_template(row["prompt"], template)})
        contexts.append(tokenize_preference_dataset(wrapped, processing_class)["prompt_ids"])
    score = _logprob_scorer(evaluator, 0)

    def scorer(hiddens, targets):
        better = score([hiddens[0]], targets)
        worse = score([hiddens[1]], targets)
        return torch.sigmoid(better - worse) - 0.5

    for side in ("chosen", "rejected"):
        values = score_completion_tokens(
            [evaluator, evaluator], contexts, tokenized[f"{side}_ids"], scorer, _pad_id(processing_class),
            batch_size, desc=f"T-REG contrastive rewards ({side})",
        )  # fmt: skip
        dataset = dataset.add_column(f"{side}_token_rewards", values)
    return dataset


@torch.no_grad()
def token_implicit_rewards(
    policy: PreTrainedModel,
    ref_model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    r"""Per-token implicit rewards of a DPO policy (From r to Q*, https://huggingface.co/papers/2404.12358):

        r̂_t = β · [log π_θ(y_t|s_t) − log π_ref(y_t|s_t)]     on completion tokens, 0 elsewhere

    Returns `(B, L-1)` aligned with the shifted completion mask (`completion_mask[:, 1:]`), like TRL's per-token
    log-probs. `Σ_t r̂_t` is the DPO sequence reward, and `log π_θ(y) = Σ_t r̂_t/β + log π_ref(y)`.
    """
    _check_same_vocabulary(policy, ref_model)
    valid = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:][valid]
    log_ratio = torch.zeros(valid.shape, dtype=torch.float32, device=input_ids.device)
    for sign, model in ((1.0, policy), (-1.0, ref_model)):
        head = lm_head_params(model)
        hidden = backbone_hidden_states(model, input_ids, attention_mask)[:, :-1][valid]
        logps = chunked_token_logprobs(
            hidden, head["weight"], head["bias"], targets, logit_scale=head["logit_scale"], softcap=head["softcap"]
        )
        log_ratio[valid] += sign * logps.float()
    return beta * log_ratio
