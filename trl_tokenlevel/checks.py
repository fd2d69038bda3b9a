"""Argument checks shared by the configs and the generation helpers.

Every check raises `ValueError` with the same four parts: the field and the value it got, the valid range, why the
range is what it is, and the fix. Configs call them from `__post_init__`; functions call them at the top, before any
model runs.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "(finite)"


def check_number(
    name: str,
    value,
    why: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
    infinite: bool = False,
) -> None:
    """Raise `ValueError` unless `value` is a finite number (an integer with `integer=True`) in the given interval.

    `why` completes "valid range ... because ..." (e.g. "it is a probability"). `optional=True` accepts `None`;
    `infinite=True` accepts ±inf (a threshold that is never or always crossed), never NaN.
    """
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    is_number = isinstance(value, Integral if integer else Real) and not isinstance(value, bool)
    in_range = is_number and (math.isfinite(value) or (infinite and not math.isnan(value)))
    if in_range and low is not None:
        in_range = value > low if low_open else value >= low
    if in_range and high is not None:
        in_range = value < high if high_open else value <= high
    if in_range:
        return
    interval = _interval(low, high, low_open, high_open)
    none_text = (" (or None)" if optional else "") + (" (±inf allowed, not NaN)" if infinite else "")
    raise ValueError(
        f"{name}={value!r} is out of range: it must be {kind} {interval}{none_text} because {why}. "
        f"Set {name} to a value {interval}."
    )


def check_choice(name: str, value, choices, why: str = "") -> None:
    """Raise `ValueError` naming `name`, `value` and the valid `choices` unless `value` is one of them."""
    if value in tuple(choices):
        return
    because = f" ({why})" if why else ""
    raise ValueError(f"{name}={value!r} is not supported{because}. Valid values: {', '.join(map(repr, choices))}.")


def check_order(low_name: str, low, high_name: str, high, why: str) -> None:
    """Raise `ValueError` unless `low <= high` (both already checked as numbers)."""
    if low <= high:
        return
    raise ValueError(f"{low_name}={low} is greater than {high_name}={high}: {why}. Set {low_name} <= {high_name}.")


# ------------------------------------------------------------------------------------------------------------------
# Models that must fit together (policy and reference/teacher/guidance model, small and large model, tokenizer)
# ------------------------------------------------------------------------------------------------------------------


def _unwrapped(model):
    return getattr(model, "module", model)  # DDP / DeepSpeed wrappers keep the model in `.module`


def _full_shape(weight) -> tuple[int, ...] | None:
    # DeepSpeed ZeRO-3 leaves each rank an empty partition and keeps the whole shape in `ds_shape`; an FSDP2 DTensor's
    # `shape` is already the whole one.
    return None if weight is None else tuple(getattr(weight, "ds_shape", weight.shape))


def lm_head_shape(model, name: str) -> tuple[int, int]:
    """`(vocabulary rows, hidden size)` of `model`'s LM head; `ValueError` naming `name` if it has none."""
    model = _unwrapped(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shape = _full_shape(getattr(head, "weight", None))
    if shape is None or len(shape) != 2:
        raise ValueError(
            f"`{name}` ({type(model).__name__}) has no output embeddings (get_output_embeddings() returned "
            f"{type(head).__name__ if head is not None else None}): token-level methods read the LM head. Load it "
            "with `AutoModelForCausalLM.from_pretrained(...)` (a causal LM with its head), not `AutoModel`."
        )
    return shape


def check_same_vocabulary(model, model_name: str, other, other_name: str, why: str) -> None:
    """Raise `ValueError` naming both models and their LM-head widths unless they cover the same vocabulary."""
    rows, _ = lm_head_shape(model, model_name)
    other_rows, _ = lm_head_shape(other, other_name)
    if rows != other_rows:
        raise ValueError(
            f"`{other_name}` has an LM head over {other_rows} tokens but `{model_name}` covers {rows}: {why}. Use a "
            f"`{other_name}` with the same tokenizer and vocabulary (e.g. a fine-tune of the same base), or "
            f"`resize_token_embeddings` one of them if they share the tokenizer."
        )


def check_same_hidden_size(model, model_name: str, other, other_name: str, why: str) -> None:
    """Raise `ValueError` naming both models and their hidden sizes unless they are equal."""
    _, hidden = lm_head_shape(model, model_name)
    _, other_hidden = lm_head_shape(other, other_name)
    if hidden != other_hidden:
        raise ValueError(
            f"`{other_name}` has hidden size {other_hidden} but `{model_name}` has {hidden}: {why}. Use a "
            f"`{other_name}` of the same architecture and size as `{model_name}`."
        )


def check_tokenizer_fits(tokenizer, model, model_name: str) -> None:
    """Raise `ValueError` if `tokenizer` can emit ids beyond `model`'s input-embedding table."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    model = _unwrapped(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = (_full_shape(getattr(embeddings, "weight", None)) or (None,))[0]
    if rows is None or tokenizer is None or not hasattr(tokenizer, "__len__"):
        return
    if len(tokenizer) > rows:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but `{model_name}`'s input embedding has {rows} rows: ids >= "
            f"{rows} would index past it. Call `{model_name}.resize_token_embeddings(len(tokenizer))` after adding "
            "tokens, or use the tokenizer the model was trained with."
        )
