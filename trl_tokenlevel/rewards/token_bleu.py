"""TensorBLEU: vectorised per-sentence BLEU on token-id tensors, computed on the ids' device (spec §17).

Paper: "TensorBLEU: Vectorized GPU-based BLEU Score Implementation for Per-Sentence In-Training Evaluation",
https://huggingface.co/papers/2510.05485. This is "Token-ID BLEU" for development and RL rewards: it scores token ids,
so it is not comparable with SacreBLEU. Semantics follow NLTK ``sentence_bleu`` (modified precision with
denominators clamped ≥ 1, 0 when no unigram matches, brevity penalty from the closest reference length with ties
going to the shorter reference).

Mechanics: n-grams via ``unfold``; the candidate and reference n-grams of the whole batch are mapped to compact ids
with ``torch.unique(dim=0, return_inverse=True)`` (no V^n hashing), and counts are kept sparse per (sentence, n-gram)
key, so memory grows with the number of n-grams, not with batch size × distinct n-grams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SMOOTHING_METHODS = ("none", "floor", "add-k", "exp")


@dataclass
class BleuStatistics:
    """Sufficient statistics of per-sentence BLEU.

    ``matches`` (B, max_n) clipped n-gram matches; ``totals`` (B, max_n) candidate n-gram counts; ``candidate_length``
    (B,) non-pad candidate tokens; ``reference_length`` (B,) length of the closest reference (0 without references).
    """

    matches: torch.Tensor
    totals: torch.Tensor
    candidate_length: torch.Tensor
    reference_length: torch.Tensor


def _clipped_matches(candidates: torch.Tensor, references: torch.Tensor, pad_token_id: int, n: int):
    """Clipped n-gram matches ``Σ_g min(count_cand(g), max_r count_ref_r(g))`` and candidate n-gram counts, (B,)."""
    batch, num_refs = references.shape[:2]
    cand_windows = candidates.unfold(1, n, 1)  # (B, Wc, n)
    ref_windows = references.unfold(2, n, 1)  # (B, R, Wr, n)
    cand_valid = (cand_windows != pad_token_id).all(-1)
    ref_valid = (ref_windows != pad_token_id).all(-1)
    totals = cand_valid.sum(dim=1)
    matches = torch.zeros(batch, dtype=torch.long, device=candidates.device)

    cand_ngrams = cand_windows[cand_valid]
    ref_ngrams = ref_windows[ref_valid]
    if cand_ngrams.shape[0] == 0 or ref_ngrams.shape[0] == 0:
        return matches, totals
    cand_owner = torch.nonzero(cand_valid)[:, 0]  # sentence b
    ref_owner = torch.nonzero(ref_valid)[:, :2]  # (sentence b, reference r)
    _, compact = torch.unique(torch.cat([cand_ngrams, ref_ngrams]), dim=0, return_inverse=True)
    num_ngrams = int(compact.max()) + 1
    cand_ids, ref_ids = compact[: cand_ngrams.shape[0]], compact[cand_ngrams.shape[0] :]

    # Candidate counts per (b, g).
    cand_keys, cand_counts = torch.unique(cand_owner * num_ngrams + cand_ids, return_counts=True)
    # Reference counts per (b, r, g), then the maximum over r per (b, g).
    ref_keys, ref_counts = torch.unique(
        (ref_owner[:, 0] * num_refs + ref_owner[:, 1]) * num_ngrams + ref_ids, return_counts=True
    )
    ref_sentence_keys = (ref_keys // (num_refs * num_ngrams)) * num_ngrams + ref_keys % num_ngrams
    max_keys, max_index = torch.unique(ref_sentence_keys, return_inverse=True)
    max_counts = torch.zeros_like(max_keys).scatter_reduce(0, max_index, ref_counts, "amax", include_self=False)

    position = torch.searchsorted(max_keys, cand_keys).clamp(max=max_keys.shape[0] - 1)
    found = max_keys[position] == cand_keys
    clipped = torch.where(found, torch.minimum(cand_counts, max_counts[position]), torch.zeros_like(cand_counts))
    matches.index_add_(0, cand_keys // num_ngrams, clipped)
    return matches, totals


def tensor_bleu_statistics(
    candidates: torch.Tensor,
    references: torch.Tensor,
    pad_token_id: int,
    *,
    max_n: int = 4,
) -> BleuStatistics:
    """Per-sentence BLEU statistics of ``candidates`` (B, Lc) against ``references`` (B, Lr) or (B, R, Lr).

    An n-gram counts only if none of its tokens is ``pad_token_id`` (which must not be a real token); an all-pad
    reference row is an absent reference (so rows may have different numbers of references).
    """
    if references.dim() == 2:
        references = references[:, None, :]
    if candidates.dim() != 2 or references.dim() != 3 or references.shape[0] != candidates.shape[0]:
        raise ValueError(
            f"Expected candidates (B, Lc) and references (B, Lr) or (B, R, Lr); got {tuple(candidates.shape)} and "
            f"{tuple(references.shape)}."
        )
    # unfold needs at least max_n columns; padding adds no n-gram.
    candidates = F.pad(candidates, (0, max(0, max_n - candidates.shape[1])), value=pad_token_id)
    references = F.pad(references, (0, max(0, max_n - references.shape[2])), value=pad_token_id)
    per_order = [_clipped_matches(candidates, references, pad_token_id, n) for n in range(1, max_n + 1)]
    matches = torch.stack([m for m, _ in per_order], dim=1)
    totals = torch.stack([t for _, t in per_order], dim=1)

    candidate_length = (candidates != pad_token_id).sum(dim=1)
    ref_lengths = (references != pad_token_id).sum(dim=2)  # (B, R)
    present = ref_lengths > 0
    # Closest reference length, ties to the shorter one (NLTK `closest_ref_length`): minimise (|r − c|, r).
    big = references.shape[2] + 1
    key = (ref_lengths - candidate_length[:, None]).abs() * big + ref_lengths
    key = torch.where(present, key, torch.full_like(key, big * big * 2))
    closest = ref_lengths.gather(1, key.argmin(dim=1, keepdim=True)).squeeze(1)
    reference_length = torch.where(present.any(dim=1), closest, torch.zeros_like(closest))
    return BleuStatistics(matches, totals, candidate_length, reference_length)


def tensor_sentence_bleu(
    candidates: torch.Tensor,
    references: torch.Tensor,
    pad_token_id: int,
    *,
    max_n: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str = "floor",
    epsilon: float = 0.1,
    add_k: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sentence token-id BLEU, (B,) on the device of ``candidates`` (spec §17).

    Paper: https://huggingface.co/papers/2510.05485.
    ``BLEU = BP · exp(Σ_n w_n log p_n)``, ``p_n = clipped matches / max(1, candidate n-grams)``,
    ``BP = 1 if c > r else exp(1 − r/c)`` with r the closest reference length. A zero-length candidate, or one with
    no matching unigram (NLTK's rule), scores 0.

    ``smoothing`` of zero-match orders (NLTK ``SmoothingFunction`` equivalents):
    - ``"floor"`` (default): a zero count becomes ``epsilon`` (default 0.1), ``p_n = ε/max(1, total)``; = ``method1``.
    - ``"none"``: any zero precision gives BLEU 0 (``method0`` up to its float-min floor).
    - ``"add-k"``: ``p_n = (m_n + k)/(max(1, total_n) + k)`` for n ≥ 2, unigrams unsmoothed; k = 1 is ``method2``.
    - ``"exp"``: the j-th zero-count order gets ``1/(2^j · max(1, total_n))``; = ``method3`` (NLTK's exponential decay,
      not the simplified 1e-12 floor of the ``rxlm`` sentence version).

    Defaults: max_n = 4, uniform weights ``1/max_n``, floor smoothing with ε = 0.1, float32 output.
    """
    if smoothing not in SMOOTHING_METHODS:
        raise ValueError(f"smoothing={smoothing!r} is not supported; use one of {SMOOTHING_METHODS}.")
    weights = [1.0 / max_n] * max_n if weights is None else list(weights)
    if len(weights) != max_n:
        raise ValueError(f"Need {max_n} weights (one per n-gram order), got {len(weights)}.")
    stats = tensor_bleu_statistics(candidates, references, pad_token_id, max_n=max_n)
    matches = stats.matches.to(dtype)
    denominators = stats.totals.clamp(min=1).to(dtype)
    zero = stats.matches == 0

    if smoothing == "floor":
        numerators = torch.where(zero, torch.full_like(matches, epsilon), matches)
        precisions = numerators / denominators
    elif smoothing == "add-k":
        precisions = (matches + add_k) / (denominators + add_k)
        precisions[:, 0] = matches[:, 0] / denominators[:, 0]
    elif smoothing == "exp":
        decay = torch.pow(2.0, torch.cumsum(zero.long(), dim=1).to(dtype))
        precisions = torch.where(zero, 1.0 / (decay * denominators), matches / denominators)
    else:
        precisions = matches / denominators

    weight = torch.tensor(weights, dtype=dtype, device=matches.device)
    used = weight != 0
    log_precisions = torch.where(used, torch.log(precisions.clamp(min=torch.finfo(dtype).tiny)), 0.0)
    geometric_mean = torch.exp((weight * log_precisions).sum(dim=1))

    cand_len = stats.candidate_length.to(dtype)
    ref_len = stats.reference_length.to(dtype)
    brevity = torch.where(cand_len > ref_len, torch.ones_like(cand_len), torch.exp(1 - ref_len / cand_len.clamp(min=1)))
    bleu = brevity * geometric_mean
    scored = (stats.candidate_length > 0) & (stats.matches[:, 0] > 0)
    if smoothing == "none":
        scored &= ~(zero & used).any(dim=1)
    return torch.where(scored, bleu, torch.zeros_like(bleu))
