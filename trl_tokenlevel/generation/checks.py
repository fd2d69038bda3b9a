"""Argument and file checks for the generation helpers, called at the top of each public function so that a bad
input fails before any model runs, with the argument (or file), the value, the valid range and the fix."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, fields

from ..checks import check_number, check_tokenizer_fits, lm_head_shape

# Rows by which the LM heads of one model family may differ (padding to a multiple of 64/128/...).
MAX_HEAD_PADDING = 1024


def check_decoding_args(max_new_tokens, do_sample=False, temperature=1.0, top_k=0, top_p=1.0) -> None:
    """The token-choice arguments shared by `routed_generate`, `ead_generate`, `cascade_generate`, `cached_generate`."""
    check_number("max_new_tokens", max_new_tokens, "it is a number of tokens", low=0, integer=True)
    check_number("temperature", temperature, "the logits are divided by it", low=0.0, low_open=True)
    check_number("top_k", top_k, "it is a number of tokens (0 keeps all)", low=0, integer=True)
    check_number("top_p", top_p, "it is a nucleus probability mass (1 keeps all)", low=0.0, high=1.0, low_open=True)
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample={do_sample!r} must be True or False.")


def check_generation_args(small_model, large_model, tokenizer, max_new_tokens, do_sample, temperature, top_k, top_p):
    """`check_model_pair` (without a large model: the single model's head and tokenizer) and `check_decoding_args`."""
    if large_model is None:
        lm_head_shape(small_model, "model")
        if tokenizer is not None:
            check_tokenizer_fits(tokenizer, small_model, "model")
    else:
        check_model_pair(small_model, large_model, tokenizer)
    check_decoding_args(max_new_tokens, do_sample, temperature, top_k, top_p)


def check_routing(router, small_model, threshold) -> None:
    """`routed_generate`'s router (a `TokenRouter` built for `small_model`, or a callable) and threshold θ."""
    if hasattr(router, "config") and hasattr(router.config, "hidden_size"):
        check_router_matches(router, small_model)
    elif not callable(router):
        raise ValueError(
            f"router={type(router).__name__} is neither a `TokenRouter` nor a callable returning [B] probabilities. "
            "Load one with `TokenRouter.from_pretrained(folder)` or pass e.g. `lambda inputs: probabilities`."
        )
    check_number("threshold", threshold, "a token is routed iff its probability p ≥ θ (θ > 1 never routes, θ <= 0 "
                 "always does; NaN would compare false everywhere)", optional=True, infinite=True)  # fmt: skip


def check_ead_args(threshold, window, min_dwell) -> None:
    """`ead_generate`'s switching rule: τ in bits, the entropy window and the minimal dwell."""
    check_number("threshold", threshold, "it is compared with a mean entropy in bits (inf never switches to the "
                 "large model; NaN would compare false everywhere)", infinite=True)  # fmt: skip
    check_number("window", window, "it is the number of recent entropies averaged", low=1, integer=True)
    check_number("min_dwell", min_dwell, "it is the number of tokens generated between two switches", low=1,
                 integer=True)  # fmt: skip


def check_cascade_args(threshold, rule, alpha, target_deferral_rate=None) -> None:
    """`cascade_generate` / `calibrate_cascade`: deferral threshold, rule, Chow-Quantile α and target rate."""
    check_number("threshold", threshold, "rows whose score (a log-probability statistic) is below it are deferred "
                 "(-inf defers none; NaN would compare false everywhere)", optional=True, infinite=True)  # fmt: skip
    check_number("alpha", alpha, "it is the quantile of the token log-probabilities (Chow-Quantile)", low=0.0,
                 high=1.0)  # fmt: skip
    check_number("target_deferral_rate", target_deferral_rate, "it is a share of prompts", low=0.0, high=1.0,
                 optional=True)  # fmt: skip
    if not (isinstance(rule, str) or callable(rule)):
        raise ValueError(f"rule={rule!r} must be a rule name or a callable scoring (log_probs, mask).")


def check_model_pair(small_model, large_model, tokenizer=None) -> None:
    """Both models have an LM head, and the tokenizer fits both embedding tables (logits are cut to the smaller
    head, which same-family pairs pad differently, so the head widths themselves may differ)."""
    small_rows, _ = lm_head_shape(small_model, "small_model")
    large_rows, _ = lm_head_shape(large_model, "large_model")
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, small_model, "small_model")
        check_tokenizer_fits(tokenizer, large_model, "large_model")
    # One family's heads differ only by padding (e.g. Qwen2.5 0.5B/7B: 151,936/152,064 rows); heads further apart
    # belong to different tokenizers, where one id means different tokens.
    if abs(small_rows - large_rows) > MAX_HEAD_PADDING:
        raise ValueError(
            f"`small_model` has an LM head over {small_rows} tokens and `large_model` over {large_rows}: more than "
            f"{MAX_HEAD_PADDING} rows apart, so they do not share a tokenizer and one token id would mean different "
            "tokens. Use two models of one family (same tokenizer)."
        )


def check_router_matches(router, small_model) -> None:
    """A `TokenRouter` reads the small model's hidden states and embedding ids: its shape must be that model's."""
    config = router.config
    rows, hidden = lm_head_shape(small_model, "small_model")
    embedding = small_model.get_input_embeddings().weight
    sides = {
        "hidden_size": (config.hidden_size, hidden),
        "vocab_size": (config.vocab_size, embedding.shape[0]),
        "embedding_dim": (config.embedding_dim, embedding.shape[1]),
    }
    wrong = {name: pair for name, pair in sides.items() if pair[0] != pair[1]}
    if wrong:
        detail = ", ".join(f"{name} {mine} (small model: {theirs})" for name, (mine, theirs) in wrong.items())
        raise ValueError(
            f"The router was built for another small model: router {detail}. Use the router trained on this small "
            "model's features, or build and train one with `TokenRouter.from_small_model(small_model)`."
        )


def read_router_folder(path: str, config_name: str, weights_name: str, config_class) -> tuple[dict, dict]:
    """The router config (checked against `config_class`'s fields) and weights of a `save_pretrained` folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    fix = "Point to a folder written by `TokenRouter.save_pretrained` (or save the router again)."
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Router folder {path!r} does not exist. {fix}")
    config_file, weights_file = os.path.join(path, config_name), os.path.join(path, weights_name)
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"The router folder is incomplete: {file} is missing. {fix}")
    try:
        with open(config_file) as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}). {fix}") from error
    known = {f.name for f in fields(config_class)}
    required = {f.name for f in fields(config_class) if f.default is MISSING and f.default_factory is MISSING}
    if not isinstance(config, dict) or set(config) - known or required - set(config):
        found = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ValueError(
            f"{config_file} holds {found}, but a router config has the keys {sorted(known)} (required: "
            f"{sorted(required)}). {fix}"
        )
    try:
        state = load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_file} is not a readable safetensors file ({error}). {fix}") from error
    return config, state


def load_router_state(router, state: dict, weights_file: str) -> None:
    """`router.load_state_dict(state)`, naming the file and the mismatching tensors if it does not fit."""
    expected = {name: tuple(tensor.shape) for name, tensor in router.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if found != expected:
        differ = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise ValueError(
            f"{weights_file} does not match its router config: tensors {differ[:4]} differ (config: "
            f"{[expected.get(n) for n in differ[:4]]}, file: {[found.get(n) for n in differ[:4]]}). The folder mixes "
            "files of two routers: save the router again with `TokenRouter.save_pretrained`."
        )
    router.load_state_dict(state)


def check_labelling_args(
    small_model, large_model, tokenizer, max_new_tokens, top_k, batch_size, continuation_max_new_tokens, margin
) -> None:
    """`build_routing_dataset`'s models and numbers."""
    check_model_pair(small_model, large_model, tokenizer)
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("continuation_max_new_tokens", continuation_max_new_tokens),
    ):
        check_number(name, value, "it is a number of tokens", low=0, integer=True)
    check_number("top_k", top_k, "it is the number of sorted top logits stored per token", low=1, integer=True)
    check_number("batch_size", batch_size, "it is a number of examples", low=1, integer=True)
    check_number("margin", margin, "it is the reward margin the judge requires")


def check_router_config(config) -> None:
    """Every field of a `TokenRouterConfig` (shape and threshold)."""
    for name in ("hidden_size", "vocab_size", "embedding_dim", "top_k", "width", "num_blocks", "expansion"):
        check_number(name, getattr(config, name), "it is a layer size or count", low=1, integer=True)
    check_number("dropout", config.dropout, "it is a dropout probability", low=0.0, high=1.0, high_open=True)
    check_number("threshold", config.threshold, "a token is routed iff its probability p ≥ θ", infinite=True)


def check_router_training(config, target_recall=None) -> None:
    """Every field of a `RouterTrainingConfig` (and `calibrate_router`'s target recall)."""
    check_number("learning_rate", config.learning_rate, "it is an AdamW step size", low=0.0, low_open=True)
    check_number("weight_decay", config.weight_decay, "it is a weight decay", low=0.0)
    check_number("recall_factor", config.recall_factor, "it scales the positive-class weight", low=0.0,
                 low_open=True)  # fmt: skip
    for name in ("batch_size", "num_epochs"):
        check_number(name, getattr(config, name), "it is a count", low=1, integer=True)
    check_number("patience", config.patience, "it is a number of epochs", low=0, integer=True)
    check_number("seed", config.seed, "it seeds torch", integer=True)
    check_number("validation_fraction", config.validation_fraction, "it is a share of the tokens (1 leaves none "
                 "to train on)", low=0.0, high=1.0, low_open=True, high_open=True)  # fmt: skip
    for name, value in (("target_recall", config.target_recall if target_recall is None else target_recall),
                        ("default_threshold", config.default_threshold)):  # fmt: skip
        check_number(name, value, "it is a recall or a probability threshold", low=0.0, high=1.0)
