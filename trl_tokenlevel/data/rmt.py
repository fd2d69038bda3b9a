"""RMT (Reinforcement Mid-Training, https://huggingface.co/papers/2509.24375) prompts from an unlabeled corpus.

Each RL prompt is a document prefix `x_<t`; the policy writes a reasoning trace and then predicts the next token
`x_t`, rewarded by :class:`~trl_tokenlevel.rewards.grpo_rewards.RMTNextTokenReward`. Target positions follow the
entropy curriculum (spec §9 (b), [recon]): difficulty is the base model's next-token entropy on the corpus, computed
once per document; prompt i of N is drawn with curriculum progress i/N (easy first, hard later), so train with
`shuffle_dataset=False` to keep that order. The rows also carry the whole document and the target position, which
`TokenGRPOTrainer` uses for RMT's next-token-prediction term on the other corpus tokens (`rmt_ntp_coef`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset

from ..ops.advantages import rmt_sample_targets
from ..ops.decoding import next_token_entropy

RMT_INSTRUCTION = "\n\nThink about the text above, then give the next token as <answer>token</answer>."


@torch.no_grad()
def corpus_token_entropy(model, token_ids: Sequence[int]) -> torch.Tensor:
    """Base-model entropy (nats) of `p(·|x_<t)` for t = 1..L−1 of one document, (L,) with position 0 set to 0."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(token_ids)], device=device)
    logits = model(input_ids=ids).logits[0, :-1]
    return torch.cat([torch.zeros(1, device=device), next_token_entropy(logits)]).cpu()


def build_rmt_dataset(
    documents: Sequence[str],
    tokenizer,
    model,
    *,
    num_prompts: int | None = None,
    min_context: int = 8,
    curriculum: str = "softmax",
    curriculum_temperature: float = 1.0,
    instruction: str = RMT_INSTRUCTION,
    seed: int = 0,
) -> Dataset:
    """RMT prompt rows from `documents` with curriculum-sampled targets, in training order.

    Prompt i (of `num_prompts`, default one per document) uses document `i mod n` and draws one target position
    `t ∈ [min_context, L)` with :func:`~trl_tokenlevel.ops.advantages.rmt_sample_targets` at progress i/num_prompts
    over that document's candidates, from the base `model`'s entropies (:func:`corpus_token_entropy`).

    Columns: `prompt` (decoded `x_<t` + `instruction`), `rmt_target` (decoded `x_t`), `rmt_document_ids` (the whole
    document's token ids), `rmt_target_position` (t), `rmt_target_entropy` (the base model's entropy at t).
    """
    if min_context < 1:
        raise ValueError(f"min_context must be >= 1 (a prompt needs a prefix), got {min_context}.")
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in documents]
    short = [i for i, ids in enumerate(encoded) if len(ids) <= min_context]
    if short:
        raise ValueError(
            f"RMT documents {short[:5]} have at most min_context={min_context} tokens, so no target position is left; "
            "drop them or lower min_context."
        )
    if not encoded:
        raise ValueError("build_rmt_dataset needs at least one document.")
    entropies = [corpus_token_entropy(model, ids) for ids in encoded]
    total = len(encoded) if num_prompts is None else num_prompts
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(total):
        doc = index % len(encoded)
        ids, entropy = encoded[doc], entropies[doc]
        candidates = torch.arange(len(ids)) >= min_context
        target = rmt_sample_targets(entropy[None], candidates[None], index, total, generator=generator,
                                    curriculum=curriculum, curriculum_temperature=curriculum_temperature)  # fmt: skip
        position = int(target[0].nonzero()[0, 0])
        rows.append({
            "prompt": tokenizer.decode(ids[:position]) + instruction,
            "rmt_target": tokenizer.decode(ids[position : position + 1]),
            "rmt_document_ids": list(ids),
            "rmt_target_position": position,
            "rmt_target_entropy": float(entropy[position]),
        })  # fmt: skip
    return Dataset.from_list(rows)
