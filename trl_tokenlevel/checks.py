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
) -> None:
    """Raise `ValueError` unless `value` is a finite number (an integer with `integer=True`) in the given interval.

    `why` completes "valid range ... because ..." (e.g. "it is a probability"). `optional=True` accepts `None`.
    """
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    is_number = isinstance(value, Integral if integer else Real) and not isinstance(value, bool)
    in_range = is_number and math.isfinite(value)
    if in_range and low is not None:
        in_range = value > low if low_open else value >= low
    if in_range and high is not None:
        in_range = value < high if high_open else value <= high
    if in_range:
        return
    interval = _interval(low, high, low_open, high_open)
    none_text = " (or None)" if optional else ""
    raise ValueError(
        f"{name}={value!r} is out of range: it must be {kind} {interval}{none_text} because {why}. "
        f"Set {name} to a value {interval}."
    )


def check_choice(name: str, value, choices, why: str = "") -> None:
    """Raise `ValueError` naming `name`, `value` and the valid `choices` unless `value` is one of them."""
    if value in tuple(choices):
        return
    because = f" ({why})" if why else ""
    raise ValueError(
        f"{name}={value!r} is not supported{because}. Valid values: {', '.join(map(repr, choices))}."
    )


def check_order(low_name: str, low, high_name: str, high, why: str) -> None:
    """Raise `ValueError` unless `low <= high` (both already checked as numbers)."""
    if low <= high:
        return
    raise ValueError(
        f"{low_name}={low} is greater than {high_name}={high}: {why}. Set {low_name} <= {high_name}."
    )
