"""Scripted stand-ins for causal LMs: next-token distributions fixed per generation step, so that the worked examples
of the spec (entropies, token log-probs) can be driven through the real generation loops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

VOCAB = 16


def distribution_logits(top_token: int, top_prob: float, vocab: int = VOCAB) -> torch.Tensor:
    """Logits of a distribution with `top_prob` on `top_token` and the rest spread uniformly."""
    probs = torch.full((vocab,), (1.0 - top_prob) / (vocab - 1), dtype=torch.float64)
    probs[top_token] = top_prob
    return probs.log()


def entropy_bits(top_prob: float, vocab: int = VOCAB) -> float:
    rest = (1.0 - top_prob) / (vocab - 1)
    terms = [top_prob] + [rest] * (vocab - 1)
    return -sum(p * math.log2(p) for p in terms if p > 0)


def top_prob_for_entropy(bits: float, vocab: int = VOCAB) -> float:
    """Bisection on the top probability (entropy decreases from log2(vocab) at 1/vocab to 0 at 1)."""
    low, high = 1.0 / vocab, 1.0
    for _ in range(200):
        mid = (low + high) / 2
        if entropy_bits(mid, vocab) > bits:
            low = mid
        else:
            high = mid
    return (low + high) / 2


class ScriptedLM(nn.Module):
    """A causal-LM look-alike whose next-token distribution depends only on the generation step.

    Step s (the token at completion position s) puts probability `top_probs[s]` on `token`; after the script it emits
    `eos`. The step is read from the position ids, so the model works through `IncrementalDecoder`'s KV-cache path.
    It counts the columns it is fed.
    """

    def __init__(self, token: int, top_probs: list[float], prompt_length: int, eos: int = 1):
        super().__init__()
        self.token, self.top_probs, self.prompt_length, self.eos = token, list(top_probs), prompt_length, eos
        self.lm_head = nn.Linear(4, VOCAB, bias=False)
        self.generation_config = SimpleNamespace(eos_token_id=eos, pad_token_id=0)
        self.fed_columns = 0

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0):
        self.fed_columns += input_ids.shape[1]
        step = position_ids[:, -1] - (self.prompt_length - 1)
        rows = []
        for s in step.tolist():
            if 0 <= s < len(self.top_probs):
                rows.append(distribution_logits(self.token, self.top_probs[s]))
            else:
                rows.append(distribution_logits(self.eos, 0.999))
        logits = torch.stack(rows).float().unsqueeze(1)
        return SimpleNamespace(logits=logits, cache=cache if cache is not None else object())
