"""TensorBLEU (spec §17) against a plain per-sentence BLEU written here with NLTK ``sentence_bleu`` semantics."""

import math
import random
from collections import Counter

import pytest
import torch

from trl_tokenlevel.rewards import tensor_bleu_statistics, tensor_sentence_bleu

F64 = torch.float64
PAD = 0


def assert_printed(actual, printed):
    """Compare with digits as printed in the spec: tolerance is half a unit of the last printed digit."""
    values = torch.as_tensor(actual, dtype=F64).reshape(-1).tolist()
    printed = [printed] if isinstance(printed, str) else list(printed)
    assert len(values) == len(printed), (values, printed)
    for value, text in zip(values, printed):
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert abs(value - float(text)) <= 0.5 * 10**-decimals + 1e-12, f"{value} != {text}"


# ---------------------------------------------------------------------------------------------------------------------
# Plain reference: one sentence at a time, Python lists and Counters.
# ---------------------------------------------------------------------------------------------------------------------


def ngrams(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def reference_bleu(candidate, references, max_n=4, weights=None, smoothing="floor", epsilon=0.1, add_k=1.0):
    weights = weights or [1.0 / max_n] * max_n
    references = [r for r in references if r]
    if not candidate:
        return 0.0
    numerators, denominators = [], []
    for n in range(1, max_n + 1):
        counts = ngrams(candidate, n)
        max_ref = Counter()
        for ref in references:
            for gram, count in ngrams(ref, n).items():
                max_ref[gram] = max(max_ref[gram], count)
        numerators.append(sum(min(count, max_ref[gram]) for gram, count in counts.items()))
        denominators.append(max(1, sum(counts.values())))
    if numerators[0] == 0:
        return 0.0
    precisions, zeros_seen = [], 0
    for n, (num, den) in enumerate(zip(numerators, denominators)):
        if smoothing == "floor":
            precisions.append((epsilon if num == 0 else num) / den)
        elif smoothing == "add-k":
            precisions.append(num / den if n == 0 else (num + add_k) / (den + add_k))
        elif smoothing == "exp":
            if num == 0:
                zeros_seen += 1
                precisions.append(1 / (2**zeros_seen * den))
            else:
                precisions.append(num / den)
        else:
            if num == 0 and weights[n] != 0:
                return 0.0
            precisions.append(num / den)
    c = len(candidate)
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length)) if references else 0
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(sum(w * math.log(p) for w, p in zip(weights, precisions) if w != 0))


def pad_batch(sequences, width):
    return torch.tensor([seq + [PAD] * (width - len(seq)) for seq in sequences])


def pad_references(reference_lists, num_refs, width):
    rows = []
    for refs in reference_lists:
        refs = refs + [[]] * (num_refs - len(refs))
        rows.append([ref + [PAD] * (width - len(ref)) for ref in refs])
    return torch.tensor(rows)


# ---------------------------------------------------------------------------------------------------------------------


def test_worked_example():
    candidates = torch.tensor([[1, 2, 3, 4, 5]])
    references = torch.tensor([[1, 2, 3, 5, 6]])
    stats = tensor_bleu_statistics(candidates, references, PAD)
    assert stats.matches.tolist() == [[4, 2, 1, 0]] and stats.totals.tolist() == [[5, 4, 3, 2]]
    precisions = torch.where(stats.matches == 0, 0.1, stats.matches.to(F64)) / stats.totals
    assert_printed(precisions, ["0.8", "0.5", "0.333333", "0.05"])
    assert stats.reference_length.tolist() == [5]  # BP = 1
    bleu = tensor_sentence_bleu(candidates, references, PAD, smoothing="floor", epsilon=0.1, dtype=F64)
    assert_printed(bleu, "0.285744")
    assert_printed(reference_bleu([1, 2, 3, 4, 5], [[1, 2, 3, 5, 6]]), "0.285744")


def test_default_is_floor_0_1_float32_on_ids_device():
    candidates, references = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[1, 2, 3, 5, 6]])
    bleu = tensor_sentence_bleu(candidates, references, PAD)
    assert bleu.dtype == torch.float32 and bleu.device == candidates.device
    assert_printed(bleu, "0.285744")


@pytest.mark.parametrize("smoothing", ["none", "floor", "add-k", "exp"])
def test_random_inputs_match_reference(smoothing):
    rng = random.Random(["none", "floor", "add-k", "exp"].index(smoothing))
    batch, num_refs, vocab = 24, 3, 6  # a small vocabulary so that higher-order n-grams match
    candidates = [[rng.randint(1, vocab) for _ in range(rng.randint(0, 12))] for _ in range(batch)]
    references = [
        [[rng.randint(1, vocab) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, num_refs))]
        for _ in range(batch)
    ]
    references[0] = [list(candidates[0])] if candidates[0] else [[1, 2]]  # an exact match
    for row in range(1, 8):  # near copies (one token changed, one appended) so that 4-grams match too
        near = list(candidates[row])
        if near:
            near[rng.randrange(len(near))] = rng.randint(1, vocab)
        references[row][0] = (near + [rng.randint(1, vocab)])[:12]
    cand = pad_batch(candidates, 12)
    refs = pad_references(references, num_refs, 12)
    bleu = tensor_sentence_bleu(cand, refs, PAD, smoothing=smoothing, dtype=F64)
    expected = [reference_bleu(c, r, smoothing=smoothing) for c, r in zip(candidates, references)]
    torch.testing.assert_close(bleu, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    assert (bleu > 0).sum() >= 4


@pytest.mark.parametrize("max_n, weights", [(2, None), (3, [0.5, 0.3, 0.2]), (4, [0.4, 0.3, 0.3, 0.0])])
def test_orders_and_weights(max_n, weights):
    rng = random.Random(max_n)
    candidates = [[rng.randint(1, 4) for _ in range(rng.randint(1, 9))] for _ in range(10)]
    references = [[[rng.randint(1, 4) for _ in range(rng.randint(1, 9))]] for _ in range(10)]
    bleu = tensor_sentence_bleu(
        pad_batch(candidates, 9), pad_references(references, 1, 9), PAD, max_n=max_n, weights=weights, dtype=F64
    )
    expected = [reference_bleu(c, r, max_n=max_n, weights=weights) for c, r in zip(candidates, references)]
    torch.testing.assert_close(bleu, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


SENTENCES = [
    ("the cat sat on the mat", ["the cat is sitting on the mat", "there is a cat on the mat"]),
    ("the quick brown fox jumps over the lazy dog", ["the quick brown fox jumped over the lazy dog"]),
    (
        "it is a guide to action which ensures that the military always obeys the commands of the party",
        [
            "it is a guide to action that ensures that the military will forever heed party commands",
            "it is the guiding principle which guarantees the military forces always being under the command of the party",
            "it is the practical guide for the army always to heed the directions of the party",
        ],
    ),
    (
        "he read the book because he was interested in world history",
        ["he was interested in world history because he read the book"],
    ),
    ("hello", ["hello world"]),
    ("completely unrelated words here", ["nothing in common at all"]),
]


def test_real_text_like_sequences():
    vocab = {}
    encode = lambda text: [vocab.setdefault(word, len(vocab) + 1) for word in text.split()]  # noqa: E731
    candidates = [encode(c) for c, _ in SENTENCES]
    references = [[encode(r) for r in refs] for _, refs in SENTENCES]
    width = max(len(s) for s in candidates + [r for refs in references for r in refs])
    bleu = tensor_sentence_bleu(pad_batch(candidates, width), pad_references(references, 3, width), PAD, dtype=F64)
    expected = [reference_bleu(c, r) for c, r in zip(candidates, references)]
    torch.testing.assert_close(bleu, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    assert bleu[0] > bleu[5] and bleu[1] > 0.5 and bleu[5] == 0
    float32 = tensor_sentence_bleu(pad_batch(candidates, width), pad_references(references, 3, width), PAD)
    torch.testing.assert_close(float32, bleu.float(), rtol=1e-5, atol=1e-6)


def test_edge_cases():
    candidates = torch.tensor(
        [
            [PAD, PAD, PAD],  # zero-length candidate
            [3, PAD, PAD],  # shorter than n: denominators clamp to 1
            [7, 8, PAD],  # no unigram match
            [1, 2, 3],  # perfect match
        ]
    )
    references = torch.tensor([[1, 2, 3, PAD], [3, 4, PAD, PAD], [1, 2, PAD, PAD], [1, 2, 3, PAD]])
    bleu = tensor_sentence_bleu(candidates, references, PAD, dtype=F64)
    expected = [
        reference_bleu(c, [r]) for c, r in [([], [1, 2, 3]), ([3], [3, 4]), ([7, 8], [1, 2]), ([1, 2, 3], [1, 2, 3])]
    ]
    torch.testing.assert_close(bleu, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    assert bleu[0] == 0 and bleu[2] == 0 and 0 < bleu[1] < 1
    # A perfect match shorter than 4 tokens: floor-smoothed 4-gram precision 0.1 -> 0.1^(1/4).
    assert_printed(bleu[3], "0.562341")


def test_no_reference_and_padding_is_not_a_token():
    candidates = torch.tensor([[5, 6, 7, PAD], [5, 6, PAD, PAD]])
    references = torch.tensor([[[PAD, PAD, PAD, PAD]], [[5, 6, PAD, PAD]]])  # row 0 has no reference
    stats = tensor_bleu_statistics(candidates, references, PAD)
    assert stats.totals.tolist() == [[3, 2, 1, 0], [2, 1, 0, 0]]  # no n-gram contains the pad id
    assert stats.matches[1].tolist() == [2, 1, 0, 0]
    bleu = tensor_sentence_bleu(candidates, references, PAD, dtype=F64)
    assert bleu[0] == 0
    torch.testing.assert_close(bleu[1], torch.tensor(reference_bleu([5, 6], [[5, 6]]), dtype=F64))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="smoothing"):
        tensor_sentence_bleu(
            torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), PAD, smoothing="method7"
        )
    with pytest.raises(ValueError, match="weights"):
        tensor_sentence_bleu(
            torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), PAD, weights=[0.5, 0.5]
        )
