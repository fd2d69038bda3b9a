import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD = 0
VOCAB = 64


def tiny_llama(seed: int, hidden: int = 32, layers: int = 2, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def small_large():
    """Two random Llamas with the same vocabulary: different seeds, widths and depths."""
    return tiny_llama(0, hidden=32, layers=2), tiny_llama(1, hidden=48, layers=3)


@pytest.fixture(scope="session")
def padded_prompts():
    """Three left-padded prompts of lengths 4, 5 and 6 (batch size 3 on purpose: see test_router_probability_batch)."""
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = PAD, 0
    ids[1, :1], mask[1, :1] = PAD, 0
    return ids, mask
