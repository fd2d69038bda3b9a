"""Generation helpers: arguments checked at call time (before any model runs), routers and router folders that do not
fit are named with the fix; meaningful extremes (θ = ±inf) keep working."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from datasets import Dataset

from trl_tokenlevel.generation import (
    AdaptiveTemperatureLogitsProcessor,
    ImplicitRewardLogitsProcessor,
    RouterTrainingConfig,
    TokenRouter,
    TokenRouterConfig,
    build_routing_dataset,
    cached_generate,
    calibrate_cascade,
    calibrate_router,
    cascade_generate,
    ead_generate,
    routed_generate,
    train_router,
)

from ..generation.conftest import tiny_llama
from .support import assert_refused

NAN = math.nan


@pytest.fixture(scope="module")
def pair():
    small, large = tiny_llama(0, hidden=32, layers=1), tiny_llama(1, hidden=48, layers=1)
    ids = torch.randint(3, 64, (2, 4), generator=torch.Generator().manual_seed(0))
    return small, large, ids, torch.ones_like(ids)


def _always(inputs):
    return torch.ones(len(inputs.token_ids))


# (function, keyword arguments, field named). Each must fail before a forward pass.
CALL_CASES = {
    "routed_threshold_nan": ("routed", {"threshold": NAN}, "threshold=nan"),
    "routed_temperature_zero": ("routed", {"temperature": 0.0, "do_sample": True}, "temperature=0.0"),
    "routed_temperature_nan": ("routed", {"temperature": NAN}, "temperature=nan"),
    "routed_top_p_zero": ("routed", {"top_p": 0.0}, "top_p=0.0"),
    "routed_top_k_negative": ("routed", {"top_k": -1}, "top_k=-1"),
    "routed_max_new_tokens_negative": ("routed", {"max_new_tokens": -1}, "max_new_tokens=-1"),
    "routed_do_sample_string": ("routed", {"do_sample": "yes"}, "do_sample='yes'"),
    "ead_threshold_nan": ("ead", {"threshold": NAN}, "threshold=nan"),
    "ead_window_zero": ("ead", {"threshold": 1.0, "window": 0}, "window=0"),
    "ead_min_dwell_zero": ("ead", {"threshold": 1.0, "min_dwell": 0}, "min_dwell=0"),
    "cascade_threshold_nan": ("cascade", {"threshold": NAN}, "threshold=nan"),
    "cascade_alpha": ("cascade", {"threshold": -1.0, "alpha": 1.5}, "alpha=1.5"),
    "calibrate_cascade_rate": ("calibrate", {"target_deferral_rate": 2.0}, "target_deferral_rate=2.0"),
    "cached_top_p": ("cached", {"top_p": 1.5}, "top_p=1.5"),
    "label_top_k_zero": ("label", {"top_k": 0}, "top_k=0"),
    "label_batch_size_zero": ("label", {"batch_size": 0}, "batch_size=0"),
}


def _call(kind, small, large, ids, mask, **kwargs):
    if kind == "routed":
        return routed_generate(
            small, large, _always, ids, mask, max_new_tokens=kwargs.pop("max_new_tokens", 2), **kwargs
        )
    if kind == "ead":
        return ead_generate(small, large, ids, mask, max_new_tokens=2, **kwargs)
    if kind == "cascade":
        return cascade_generate(small, large, ids, mask, max_new_tokens=2, **kwargs)
    if kind == "calibrate":
        return calibrate_cascade(small, ids, mask, max_new_tokens=2, **kwargs)
    if kind == "label":
        dataset = Dataset.from_list([{"prompt": "1 plus 1?", "completion": " 2"}])
        return build_routing_dataset(small, large, None, dataset, completion_column="completion",
                                     reward_fn=lambda *_: 0.0, **kwargs)  # fmt: skip
    return cached_generate(small, ids, mask, max_new_tokens=2, **kwargs)


class _NoForward(torch.nn.Module):
    """Wraps a model and fails if it runs: argument errors must come first."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")


@pytest.mark.parametrize("case", list(CALL_CASES))
def test_generation_argument(case, pair, tmp_path):
    small, large, ids, mask = pair
    kind, kwargs, named = CALL_CASES[case]
    field = named.split("=")[0]
    assert_refused(lambda: _call(kind, _NoForward(small), _NoForward(large), ids, mask, **kwargs), ValueError,
                   str(tmp_path), [named], rf"Set {field}|must be True or False")  # fmt: skip


@pytest.mark.parametrize("threshold,routed", [(math.inf, 0.0), (-math.inf, 1.0), (2.0, 0.0)])
def test_routing_threshold_extremes_are_valid(threshold, routed, pair):
    """By design: θ outside [0, 1] (and ±inf) means never / always route; it is accepted."""
    small, large, ids, mask = pair
    out = routed_generate(small, large, lambda inputs: torch.full((len(inputs.token_ids),), 0.5), ids, mask,
                          threshold=threshold, max_new_tokens=3, eos_token_id=[])  # fmt: skip
    assert out.large_token_fraction == routed


def test_ead_infinite_threshold_never_switches(pair):
    small, large, ids, mask = pair
    out = ead_generate(small, large, ids, mask, threshold=math.inf, min_dwell=1, max_new_tokens=3, eos_token_id=[])
    assert out.large_token_fraction == 0.0 and sum(out.stats["switches"]) == 0


def test_router_built_for_another_small_model(pair, tmp_path):
    small, large, ids, mask = pair
    router = TokenRouter.from_small_model(tiny_llama(2, hidden=16, layers=1), width=8, num_blocks=1, top_k=4)
    assert_refused(lambda: routed_generate(small, large, router, ids, mask, max_new_tokens=2), ValueError,
                   str(tmp_path), ["The router was built for another small model", "hidden_size 16 (small model: 32)"],
                   r"TokenRouter.from_small_model\(small_model\)")  # fmt: skip


def test_router_that_is_not_callable(pair, tmp_path):
    small, large, ids, mask = pair
    assert_refused(lambda: routed_generate(small, large, 0.5, ids, mask, max_new_tokens=2), ValueError, str(tmp_path),
                   ["router=float"], r"TokenRouter.from_pretrained")  # fmt: skip


def test_small_and_large_models_with_other_tokenizers(pair, tmp_path):
    small, _, ids, mask = pair
    other = tiny_llama(3, hidden=32, layers=1, vocab=4096)
    assert_refused(lambda: routed_generate(small, other, _always, ids, mask, max_new_tokens=2), ValueError,
                   str(tmp_path), ["`small_model` has an LM head over 64 tokens", "`large_model` over 4096"],
                   r"same tokenizer")  # fmt: skip


def test_tokenizer_larger_than_small_model(pair, tiny_tokenizer, tmp_path):
    small, large, _, _ = pair  # vocabulary 64, the tiny tokenizer has hundreds of tokens
    assert_refused(lambda: routed_generate(small, large, _always, prompts=["Q: 1 plus 1?"], tokenizer=tiny_tokenizer,
                                           max_new_tokens=2), ValueError, str(tmp_path),
                   [f"{len(tiny_tokenizer)} tokens", "`small_model`'s input embedding has 64 rows"],
                   r"resize_token_embeddings")  # fmt: skip


def test_processor_arguments(pair, tmp_path):
    small, large, _, _ = pair
    assert_refused(lambda: AdaptiveTemperatureLogitsProcessor(entropy_pivot=2.0), ValueError, str(tmp_path),
                   ["entropy_pivot=2.0"], r"Set entropy_pivot")  # fmt: skip
    assert_refused(lambda: ImplicitRewardLogitsProcessor(small, small, beta=NAN), ValueError, str(tmp_path),
                   ["beta=nan"], r"Set beta")  # fmt: skip
    other = tiny_llama(3, hidden=32, layers=1, vocab=80)
    assert_refused(lambda: ImplicitRewardLogitsProcessor(small, other, beta=0.1), ValueError, str(tmp_path),
                   ["`ref_model` has an LM head over 80 tokens", "`dpo_model` covers 64"], r"same tokenizer")  # fmt: skip


def test_router_config_and_training_arguments(tmp_path):
    assert_refused(lambda: TokenRouterConfig(hidden_size=8, vocab_size=32, embedding_dim=8, dropout=1.0), ValueError,
                   str(tmp_path), ["dropout=1.0"], r"Set dropout")  # fmt: skip
    router = TokenRouter(TokenRouterConfig(hidden_size=8, vocab_size=32, embedding_dim=8, top_k=4, width=8,
                                           num_blocks=1))  # fmt: skip
    data = {"hidden": torch.zeros(4, 8), "token_ids": torch.zeros(4, dtype=torch.long),
            "topk_logits": torch.zeros(4, 4), "labels": torch.tensor([0, 1, 0, 1])}  # fmt: skip
    assert_refused(lambda: train_router(router, data, config=RouterTrainingConfig(validation_fraction=1.0),
                                        progress=False), ValueError, str(tmp_path), ["validation_fraction=1.0"],
                   r"Set validation_fraction")  # fmt: skip
    assert_refused(lambda: calibrate_router(router, data, target_recall=1.5), ValueError, str(tmp_path),
                   ["target_recall=1.5"], r"Set target_recall")  # fmt: skip


# Router folders -------------------------------------------------------------------------------------------------------


@pytest.fixture
def router_folder(tmp_path):
    router = TokenRouter(TokenRouterConfig(hidden_size=8, vocab_size=32, embedding_dim=8, top_k=4, width=8,
                                           num_blocks=1))  # fmt: skip
    return router.save_pretrained(str(tmp_path / "router"))


def _damage(folder, how):
    config_file, weights_file = os.path.join(folder, "router_config.json"), os.path.join(folder, "router.safetensors")
    if how == "missing_weights":
        os.remove(weights_file)
        return FileNotFoundError, [weights_file, "is missing"]
    if how == "missing_config":
        os.remove(config_file)
        return FileNotFoundError, [config_file, "is missing"]
    if how == "corrupt_json":
        with open(config_file, "w") as handle:
            handle.write('{"hidden_size": 8,')
        return ValueError, [config_file, "not valid JSON"]
    if how == "unknown_key":
        config = json.load(open(config_file))
        json.dump({**config, "layers": 3}, open(config_file, "w"))
        return ValueError, [config_file, "'layers'"]
    if how == "corrupt_weights":
        with open(weights_file, "wb") as handle:
            handle.write(b"not safetensors")
        return ValueError, [weights_file, "not a readable safetensors file"]
    # Weights of another router beside this config.
    TokenRouter(TokenRouterConfig(hidden_size=16, vocab_size=32, embedding_dim=16, top_k=4, width=8,
                                  num_blocks=1)).save_pretrained(folder + "_other")  # fmt: skip
    os.replace(os.path.join(folder + "_other", "router.safetensors"), weights_file)
    return ValueError, [weights_file, "does not match its router config"]


@pytest.mark.parametrize("how", ["missing_weights", "missing_config", "corrupt_json", "unknown_key", "corrupt_weights",
                                 "other_router_weights"])  # fmt: skip
def test_router_folder(how, router_folder, tmp_path):
    exception, names = _damage(router_folder, how)
    snapshot_dir = str(tmp_path / "unrelated")
    assert_refused(lambda: TokenRouter.from_pretrained(router_folder), exception, snapshot_dir, names,
                   r"TokenRouter.save_pretrained")  # fmt: skip
