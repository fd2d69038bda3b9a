"""DeepSpeed ZeRO-3 leaves each rank an empty partition of every parameter (the whole shape is in `ds_shape`): the
construction-time checks must read the whole shape, or they refuse every ZeRO-3 model (seen on CPU when DeepSpeed 0.19
got as far as loading the reference model; ZeRO-3 training itself does not run on CPU with accelerate 1.16)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trl_tokenlevel.checks import check_same_vocabulary, check_tokenizer_fits, lm_head_shape


def _partitioned_like_zero3(model):
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0)  # what a rank holds outside GatheredParameters
    return model


def test_checks_read_the_whole_shape_of_partitioned_parameters():
    config = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    model = _partitioned_like_zero3(LlamaForCausalLM(config))
    assert lm_head_shape(model, "model") == (96, 16)
    check_same_vocabulary(model, "model", model, "ref_model", "same head")

    class Tokenizer:
        def __len__(self):
            return 97

    with pytest.raises(ValueError, match="97 tokens but `ref_model`'s input embedding has 96 rows"):
        check_tokenizer_fits(Tokenizer(), model, "ref_model")
