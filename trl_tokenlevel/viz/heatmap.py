"""Token heatmaps: per-token values (rewards, weights, entropy) coloured over the decoded tokens, as HTML or ANSI."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class TokenRow:
    """One completion to draw: its decoded tokens, one value per token, and a heading (e.g. the prompt)."""

    title: str
    tokens: Sequence[str]
    values: Sequence[float]

    def __post_init__(self):
        if len(self.tokens) != len(self.values):
            raise ValueError(f"TokenRow {self.title!r}: {len(self.tokens)} tokens but {len(self.values)} values.")


def _scale(rows: Sequence[TokenRow]) -> float:
    largest = max((abs(v) for row in rows for v in row.values), default=0.0)
    return largest if largest > 0 else 1.0


def _rgb(value: float, scale: float) -> tuple[int, int, int]:
    """Diverging colour: white at 0, green for positive, red for negative, saturating at |value| = scale."""
    strength = min(abs(value) / scale, 1.0)
    fade = round(255 * (1 - 0.75 * strength))
    return (fade, 255, fade) if value >= 0 else (255, fade, fade)


def token_heatmap_html(rows: Sequence[TokenRow], title: str = "Per-token values", value_name: str = "value") -> str:
    """A self-contained HTML page; hovering a token shows its value. One colour scale for all rows."""
    scale = _scale(rows)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".row{margin:1.2em 0}.tokens{font-family:monospace;white-space:pre-wrap;line-height:1.8}"
        ".tok{padding:2px 1px;border-radius:3px}.legend span{padding:2px 6px;font-family:monospace}</style>",
        f"</head><body><h2>{html.escape(title)}</h2>",
        f"<p class='legend'>{html.escape(value_name)}: "
        f"<span style='background:rgb{_rgb(-scale, scale)}'>{-scale:.3g}</span>"
        "<span style='background:rgb(255,255,255)'>0</span>"
        f"<span style='background:rgb{_rgb(scale, scale)}'>{scale:.3g}</span></p>",
    ]
    for row in rows:
        spans = "".join(
            f"<span class='tok' style='background:rgb{_rgb(v, scale)}' title='{html.escape(value_name)} = {v:.4f}'>"
            f"{html.escape(token)}</span>"
            for token, v in zip(row.tokens, row.values)
        )
        total = sum(row.values)
        parts.append(
            f"<div class='row'><div><b>{html.escape(row.title)}</b> (sum {total:.4f})</div>"
            f"<div class='tokens'>{spans}</div></div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_token_heatmap(path: str, rows: Sequence[TokenRow], title: str = "Per-token values", value_name: str = "value") -> str:
    """Write `token_heatmap_html(rows, title, value_name)` to `path` and return the path."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(token_heatmap_html(rows, title, value_name))
    return path


def token_heatmap_terminal(row: TokenRow, scale: float | None = None) -> str:
    """The same colouring with 24-bit ANSI background colours, for a quick look in a terminal."""
    scale = scale or _scale([row])
    coloured = "".join(
        "\x1b[48;2;{};{};{}m\x1b[30m{}\x1b[0m".format(*_rgb(v, scale), token) for token, v in zip(row.tokens, row.values)
    )
    return f"{row.title}\n{coloured}"
