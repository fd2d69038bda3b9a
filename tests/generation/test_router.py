"""Router model, training, calibration and save/load; routing-label building on tiny models."""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from tests.generation.conftest import tiny_llama
from trl_tokenlevel.generation.routing import (
    ContinuationJudge,
    JudgeRequest,
    RouterTrainingConfig,
    TokenRouter,
    TokenRouterConfig,
    build_routing_dataset,
    calibrate_router,
    router_probabilities,
    routing_metrics,
    routing_tensors,
    scaled_width,
    train_router,
)
from trl_tokenlevel.ops.decoding import r2r_calibrate_threshold


def synthetic_tokens(n=1200, hidden=8, k=6, vocab=32, seed=0):
    """Routing-worthy tokens are those with a low top-1 logit margin (an uncertainty signal) — 15% positives."""
    g = torch.Generator().manual_seed(seed)
    topk = torch.sort(torch.randn(n, k, generator=g) * 2, dim=-1, descending=True).values
    margin = topk[:, 0] - topk[:, 1]
    labels = (margin < torch.quantile(margin, 0.15)).long()
    return {
        "hidden": torch.randn(n, hidden, generator=g),
        "token_ids": torch.randint(0, vocab, (n,), generator=g),
        "topk_logits": topk,
        "labels": labels,
    }


def small_router(hidden=8, vocab=32, k=6, seed=0):
    torch.manual_seed(seed)
    config = TokenRouterConfig(hidden_size=hidden, vocab_size=vocab, embedding_dim=hidden, top_k=k, width=32,
                               num_blocks=2, dropout=0.0)  # fmt: skip
    return TokenRouter(config, torch.randn(vocab, hidden))


def test_router_architecture_and_shapes(small_large):
    small, _ = small_large
    router = TokenRouter.from_small_model(small, width=24, num_blocks=3, top_k=100)
    assert router.config.top_k == 64  # clipped to the vocabulary
    # The embedding table is the small model's own tensor: shared, not trained, not saved, not counted.
    assert router.token_embedding.data_ptr() == small.get_input_embeddings().weight.data_ptr()
    assert "token_embedding" not in router.state_dict()
    assert router.num_parameters() == router.config.num_parameters() == sum(p.numel() for p in router.parameters())
    assert len(router.blocks) == 3 and router.input_proj.in_features == 3 * 32
    logits = router(torch.randn(5, 32), torch.randint(0, 64, (5,)), torch.randn(5, 64))
    assert logits.shape == (5,)
    with pytest.raises(ValueError, match="embedding table"):
        TokenRouter(router.config, torch.zeros(3, 32))


def test_default_router_is_scaled_to_the_small_model(small_large):
    small, _ = small_large
    router = TokenRouter.from_small_model(small)
    # This 23k-parameter test model is below what 5% can hold: the width stops at its floor of 8.
    assert router.config.width == 8
    assert router.config.num_blocks == 6 and router.config.expansion == 4  # R2R's depth and expansion
    # R2R's width 1024 for a 1536-wide small model; linear in the hidden size when the 5% cap does not bind.
    assert scaled_width(1536) == 1024 and scaled_width(768) == 512 and scaled_width(64) == 40
    assert scaled_width(64, small_model_parameters=3_200_000, vocab_size=49152) == 40  # 94k params: 2.9%
    capped = scaled_width(576, small_model_parameters=134_500_000, vocab_size=49152)
    config = TokenRouterConfig(hidden_size=576, vocab_size=49152, embedding_dim=576, width=capped)
    assert (
        config.num_parameters()
        <= 0.05 * 134_500_000
        < TokenRouterConfig(hidden_size=576, vocab_size=49152, embedding_dim=576, width=capped + 8).num_parameters()
    )


def test_training_reaches_target_recall_and_uses_pos_weight():
    train, val = synthetic_tokens(seed=0), synthetic_tokens(n=400, seed=1)
    router = small_router()
    config = RouterTrainingConfig(learning_rate=3e-3, batch_size=128, num_epochs=15, patience=5, target_recall=0.9)
    result = train_router(router, train, val, config, progress=False)
    assert result.validation["recall"] >= 0.9
    assert result.threshold == router.threshold
    # The calibrated threshold is the largest one that keeps the recall: the ops rule on the same probabilities.
    probs = router_probabilities(router, val)
    assert result.threshold == pytest.approx(r2r_calibrate_threshold(probs, val["labels"], 0.9))
    # Better than routing at random: far fewer than all tokens are routed at that recall.
    assert result.validation["route_rate"] < 0.6
    assert result.history[0]["train_loss"] > min(h["train_loss"] for h in result.history)


def test_save_load_round_trip(tmp_path):
    router = small_router()
    calibrate_router(router, synthetic_tokens(n=200), target_recall=0.95)
    data = synthetic_tokens(n=50, seed=3)
    expected = router_probabilities(router, data)
    path = router.save_pretrained(str(tmp_path / "router"))
    with pytest.raises(ValueError, match="small_model"):
        TokenRouter.from_pretrained(path)
    small = SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding.from_pretrained(router.token_embedding))
    loaded = TokenRouter.from_pretrained(path, small_model=small)
    assert loaded.threshold == router.threshold and loaded.config == router.config
    torch.testing.assert_close(router_probabilities(loaded, data), expected, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        TokenRouter.from_pretrained(str(tmp_path))


def test_calibration_worked_example_through_the_router():
    """Spec §13: validation probabilities [0.9, 0.8, 0.7, 0.4, 0.35, 0.2, 0.1, 0.05], labels [1, 1, 0, 1, 0, 1, 0, 0]
    → θ = 0.2; recall 1 and 6 of 8 tokens routed at θ."""
    probs = torch.tensor([0.9, 0.8, 0.7, 0.4, 0.35, 0.2, 0.1, 0.05], dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 1, 0, 1, 0, 0])
    router = small_router()
    logits = torch.logit(probs).float()
    # A router whose head returns the given logits whatever the input.
    router.head = torch.nn.Module()
    router.head.forward = lambda x: logits[: len(x)].unsqueeze(-1)
    data = {"hidden": torch.zeros(8, 8), "token_ids": torch.zeros(8, dtype=torch.long),
            "topk_logits": torch.zeros(8, 6), "labels": labels}  # fmt: skip
    assert calibrate_router(router, data) == pytest.approx(0.2, abs=1e-6)
    metrics = routing_metrics(probs, labels, router.threshold - 1e-7)
    assert metrics["recall"] == 1.0 and metrics["route_rate"] == 0.75


def test_no_positive_labels_falls_back_to_default_threshold():
    data = synthetic_tokens(n=100)
    data["labels"] = torch.zeros_like(data["labels"])
    router = small_router()
    assert calibrate_router(router, data, default_threshold=0.42) == 0.42


# ----------------------------------------------------------------------------------------------------------------
# Label building
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tiny_tokenizer):
    # Untied LM heads: random tied models mostly repeat the last token, so their predictions would always agree.
    small = tiny_llama(0, hidden=32, layers=1, vocab=len(tiny_tokenizer))
    large = tiny_llama(1, hidden=48, layers=2, vocab=len(tiny_tokenizer))
    return small, large


PROMPTS = ["Q: What is 12 plus 13?\nA:", "Q: Repeat the words: dog fish tree\nA:", "Q: How many?\nA:"]


class RecordingJudge:
    def __init__(self):
        self.requests = []

    def __call__(self, requests):
        self.requests += requests
        return [len(self.requests) - len(requests) + i < 1000 and (r.position % 2 == 0) for i, r in
                enumerate(requests)]  # fmt: skip


def test_build_routing_dataset_with_custom_judge(tiny_pair, tiny_tokenizer):
    small, large = tiny_pair
    judge = RecordingJudge()
    dataset = Dataset.from_dict({"prompt": PROMPTS, "answer": ["25", "dog fish tree", "5"]})
    labelled = build_routing_dataset(small, large, tiny_tokenizer, dataset, judge=judge, max_new_tokens=6,
                                     top_k=10, batch_size=2, progress=False)  # fmt: skip
    assert len(labelled) == 3 and labelled["answer"] == dataset["answer"]
    mismatches = 0
    for row in labelled:
        t = len(row["completion_ids"])
        assert 0 < t <= 6
        assert len(row["hidden_states"]) == t and len(row["hidden_states"][0]) == 32
        assert len(row["topk_logits"]) == t and len(row["topk_logits"][0]) == 10
        for pos in range(t):
            differ = row["slm_token_ids"][pos] != row["llm_token_ids"][pos]
            assert row["mismatch"][pos] == differ
            assert row["labels"][pos] == int(differ and pos % 2 == 0)
        # Reference = the large model's greedy completion, so the large model's prediction is the reference token.
        assert row["llm_token_ids"] == row["completion_ids"]
        mismatches += sum(row["mismatch"])
    assert len(judge.requests) == mismatches > 0
    request = judge.requests[0]
    assert request.slm_token != request.llm_token and isinstance(request.example, dict)

    tensors = routing_tensors(labelled)
    n = sum(len(r["labels"]) for r in labelled)
    assert tensors["hidden"].shape == (n, 32) and tensors["topk_logits"].shape == (n, 10)
    assert tensors["labels"].sum() == sum(sum(r["labels"]) for r in labelled)


def test_features_match_small_model_decoding(tiny_pair, tiny_tokenizer):
    """The teacher-forced features of position t equal what the small model sees when decoding that prefix."""
    from trl_tokenlevel.generation.kv import IncrementalDecoder, encode_prompts

    small, large = tiny_pair
    dataset = Dataset.from_dict({"prompt": PROMPTS[:1], "completion": [" 12 plus"]})
    row = build_routing_dataset(small, large, tiny_tokenizer, dataset, judge=lambda reqs: [False] * len(reqs),
                                completion_column="completion", top_k=5, progress=False)[0]  # fmt: skip
    assert row["completion_ids"][-1] == tiny_tokenizer.eos_token_id  # add_eos
    ids, mask = encode_prompts(tiny_tokenizer, PROMPTS[:1])
    prefix = torch.tensor([row["prompt_ids"] + row["completion_ids"][:2]])
    step = IncrementalDecoder(small, capture_hidden=True).step(prefix, torch.ones_like(prefix))
    torch.testing.assert_close(torch.tensor(row["hidden_states"][2]), step.hidden[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(row["topk_logits"][2]), torch.topk(step.logits[0], 5).values,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert row["slm_token_ids"][2] == int(step.logits[0].argmax())
    assert sum(row["labels"]) == 0


def test_continuation_judge_with_reward_function(tiny_pair, tiny_tokenizer):
    small, large = tiny_pair
    seen = {}

    def reward(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer)
        # Reward the large-model branch (odd entries) in the first request only.
        return [1.0 if i == 1 else 0.0 for i in range(len(completions))]

    judge = ContinuationJudge(large, tiny_tokenizer, reward_fn=reward, max_new_tokens=3)
    prompt_ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    example = {"prompt": PROMPTS[0], "answer": "25"}
    requests = [JudgeRequest(prompt_ids, [5], 7, 9, example, 1), JudgeRequest(prompt_ids, [], 8, 10, example, 0)]
    assert judge(requests) == [True, False]
    assert seen["answer"] == ["25"] * 4 and seen["prompts"] == [PROMPTS[0]] * 4
    assert seen["completions"][0].startswith(tiny_tokenizer.decode([5, 7]))
    # Symmetric mode with a margin: |Δ| = 1 > 0.5 in the first request only.
    judge.symmetric, judge.margin = True, 0.5
    assert judge(requests) == [True, False]
    # Without a reward function: routing-worthy iff the continuations after the branch differ as text.
    text_judge = ContinuationJudge(large, tiny_tokenizer, max_new_tokens=3)
    verdicts = text_judge(requests)
    cont = text_judge.continuations([prompt_ids + [5, 7], prompt_ids + [5, 9]])
    assert verdicts[0] == (tiny_tokenizer.decode(cont[0]) != tiny_tokenizer.decode(cont[1]))


def test_build_routing_dataset_errors(tiny_pair, tiny_tokenizer):
    small, large = tiny_pair
    dataset = Dataset.from_dict({"question": ["x"]})
    with pytest.raises(ValueError, match="'prompt' not found"):
        build_routing_dataset(small, large, tiny_tokenizer, dataset, progress=False)
    with pytest.raises(ValueError, match="either"):
        build_routing_dataset(small, large, tiny_tokenizer, Dataset.from_dict({"prompt": ["x"]}),
                              judge=lambda r: [], reward_fn=lambda **k: [], progress=False)  # fmt: skip
