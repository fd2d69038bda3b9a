"""On-policy preference pairs: sample the model on verifiable problems, label the samples by correctness.

Rejected answers are the model's own mistakes, so their first wrong token is where a token-level method should put
its negative credit (`tasks.first_wrong_token`). Used by the default `trl-tokenlevel dpo` job and the claims suite.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from .builtin.tasks import Problem, first_wrong_char, is_correct, normalize, to_messages


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[list[dict]],
    num_samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    seed: int = 0,
) -> list[list[str]]:
    """`num_samples` completions per conversational prompt (temperature 0 means greedy, one distinct sample).

    Generation stops at the tokenizer's EOS (end of turn). Sampling is seeded once, so the result depends on `seed`,
    the prompts and the batch size, not on what ran before.
    """
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"num_samples, batch_size and max_new_tokens must be >= 1, got {num_samples}, {batch_size}, "
            f"{max_new_tokens}."
        )
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the last real token
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampling = temperature > 0
    completions: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
                for p in prompts[start : start + batch_size]
            ]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=1.0 if sampling else None,
                top_k=0 if sampling else None,
                num_return_sequences=num_samples if sampling else 1,
                pad_token_id=tokenizer.pad_token_id,
            )
            decoded = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            per_prompt = num_samples if sampling else 1
            for index in range(len(texts)):
                group = decoded[index * per_prompt : (index + 1) * per_prompt]
                completions.append(group if sampling else group * num_samples)
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return completions


def accuracy(problems: Sequence[Problem], completions: Sequence[str]) -> float:
    """Fraction of `completions` (one per problem) that are exactly right."""
    if not problems:
        raise ValueError("accuracy needs at least one problem.")
    return sum(is_correct(p, c) for p, c in zip(problems, completions, strict=True)) / len(problems)


def build_preference_pairs(
    problems: Sequence[Problem],
    samples: Sequence[Sequence[str]],
    n_shots: int = 2,
    fallback_to_gold: bool = False,
    seed: int = 0,
) -> list[dict]:
    """One conversational DPO row per problem that has a wrong sample and a right one.

    `chosen` is a correct sample (or, with `fallback_to_gold`, the gold answer when no sample is right: then the row's
    `chosen_source` is `"gold"`); `rejected` is a wrong sample, chosen at random among the distinct wrong answers.
    Rows keep `task`, `answer`, `key` and `first_wrong_char` (index in the normalised rejected text) for analysis.
    """
    rng = random.Random(seed)
    rows = []
    for problem, group in zip(problems, samples, strict=True):
        texts = [normalize(text) for text in group]
        right = sorted({t for t in texts if t == problem.answer})
        wrong = sorted({t for t in texts if t != problem.answer and t})
        if not wrong:
            continue
        if right:
            chosen, source = right[0], "policy"
        elif fallback_to_gold:
            chosen, source = problem.answer, "gold"
        else:
            continue
        rejected = rng.choice(wrong)
        rows.append(
            {
                "prompt": to_messages(problem, n_shots=n_shots),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "task": problem.task,
                "answer": problem.answer,
                "key": problem.key,
                "chosen_source": source,
                "first_wrong_char": first_wrong_char(problem, rejected),
                "sample_accuracy": sum(t == problem.answer for t in texts) / len(texts),
            }
        )
    return rows


__all__ = ["accuracy", "build_preference_pairs", "sample_completions"]
