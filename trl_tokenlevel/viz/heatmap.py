"""Token heatmaps: per-token values (rewards, weights, entropy, masks) coloured over the decoded tokens, as HTML, ANSI
or Markdown.

The colour scale follows the values, so that the legend never shows a value that cannot occur:

- values that are all 0 or 1 (a selection or routing mask): two colours, white for 0 and green for 1;
- values that are all >= 0 (entropy, weights, probabilities): white at 0 to green at the largest value;
- anything else (rewards, advantages): diverging, red below 0, white at 0, green above, symmetric around 0.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

_WHITE = (255, 255, 255)


@dataclass
class TokenRow:
    """One completion to draw: its decoded tokens, one value per token, and a heading (e.g. the prompt)."""

    title: str
    tokens: Sequence[str]
    values: Sequence[float]

    def __post_init__(self):
        if len(self.tokens) != len(self.values):
            raise ValueError(f"TokenRow {self.title!r}: {len(self.tokens)} tokens but {len(self.values)} values.")


@dataclass
class HeatmapPanel:
    """Rows sharing one colour scale and one legend, e.g. the entropy of every example.

    `labels` names the two colours of a 0/1 mask, e.g. `("small model", "large model")`, and marks the panel as one.
    """

    name: str
    rows: Sequence[TokenRow]
    value_name: str = "value"
    labels: tuple[str, str] | None = None


class ColorScale:
    """Maps values to background colours; `kind` is "binary", "sequential" or "diverging" (see the module docstring).

    `binary=None` detects a 0/1 mask from the values (all 0 or 1, at least one 1); `True` forces the two-colour scale
    (a mask that happens to be all 0), `False` forbids it (a continuous quantity that happens to be 0 or 1).
    """

    def __init__(self, rows: Sequence[TokenRow], binary: bool | None = None):
        values = [float(v) for row in rows for v in row.values]
        if binary is None:
            binary = bool(values) and all(v in (0.0, 1.0) for v in values) and 1.0 in values
        if binary:
            self.kind, self.scale = "binary", 1.0
        elif all(v >= 0 for v in values):
            self.kind, self.scale = "sequential", max(values, default=0.0)
        else:
            self.kind, self.scale = "diverging", max(abs(v) for v in values)
        if self.scale <= 0:
            self.scale = 1.0  # all zeros: everything white

    def rgb(self, value: float) -> tuple[int, int, int]:
        """White at 0; green for positive values, red for negative ones, saturating at |value| = scale."""
        strength = min(abs(value) / self.scale, 1.0)
        fade = round(255 * (1 - 0.75 * strength))
        return (fade, 255, fade) if value >= 0 else (255, fade, fade)

    def legend(self, labels: tuple[str, str] | None = None) -> list[tuple[str, tuple[int, int, int]]]:
        """`(text, colour)` swatches covering exactly the range of values that can occur."""
        if self.kind == "binary":
            names = labels or ("0", "1")
            return [(names[0], self.rgb(0.0)), (names[1], self.rgb(1.0))]
        top = (f"{self.scale:.3g}", self.rgb(self.scale))
        if self.kind == "sequential":
            return [("0", _WHITE), top]
        return [(f"{-self.scale:.3g}", self.rgb(-self.scale)), ("0", _WHITE), top]


_STYLE = (
    "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
    ".row{margin:1.2em 0}.tokens{font-family:monospace;white-space:pre-wrap;line-height:1.8}"
    ".tok{padding:2px 1px;border-radius:3px}.legend span{padding:2px 6px;font-family:monospace;"
    "border:1px solid #ccc}</style>"
)


def _panel_html(panel: HeatmapPanel, heading: str) -> str:
    scale = ColorScale(panel.rows, binary=True if panel.labels else None)
    value_name = html.escape(panel.value_name)
    swatches = "".join(
        f"<span style='background:rgb{colour}'>{html.escape(text)}</span>"
        for text, colour in scale.legend(panel.labels)
    )
    parts = [f"<{heading}>{html.escape(panel.name)}</{heading}>", f"<p class='legend'>{value_name}: {swatches}</p>"]
    for row in panel.rows:
        spans = "".join(
            f"<span class='tok' style='background:rgb{scale.rgb(v)}' title='{value_name} = {v:.4f}'>"
            f"{html.escape(token)}</span>"
            for token, v in zip(row.tokens, row.values)
        )
        parts.append(
            f"<div class='row'><div><b>{html.escape(row.title)}</b> (sum {sum(row.values):.4f})</div>"
            f"<div class='tokens'>{spans}</div></div>"
        )
    return "\n".join(parts)


def token_heatmap_page(panels: Sequence[HeatmapPanel], title: str) -> str:
    """A self-contained HTML page with one section per panel; hovering a token shows its value."""
    head = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}</head>"
    body = [f"<body><h2>{html.escape(title)}</h2>"] + [_panel_html(panel, "h3") for panel in panels]
    return head + "\n" + "\n".join(body) + "\n</body></html>"


def token_heatmap_html(
    rows: Sequence[TokenRow],
    title: str = "Per-token values",
    value_name: str = "value",
    labels: tuple[str, str] | None = None,
) -> str:
    """A self-contained HTML page for one set of rows (one colour scale for all of them)."""
    return token_heatmap_page([HeatmapPanel(title, rows, value_name, labels)], title)


def write_token_heatmap(
    path: str,
    rows: Sequence[TokenRow],
    title: str = "Per-token values",
    value_name: str = "value",
    labels: tuple[str, str] | None = None,
) -> str:
    """Write `token_heatmap_html(rows, title, value_name, labels)` to `path` and return the path."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(token_heatmap_html(rows, title, value_name, labels))
    return path


def token_heatmap_markdown(panels: Sequence[HeatmapPanel], max_tokens: int = 200) -> str:
    """Markdown for reporters that do not render HTML (TensorBoard's text tab): each token with its value."""
    lines = []
    for panel in panels:
        lines.append(f"### {panel.name}")
        for row in panel.rows:
            shown = list(zip(row.tokens, row.values))[:max_tokens]
            cells = " ".join(f"`{token!r}`&nbsp;{value:+.3g}" for token, value in shown)
            more = f" … ({len(row.tokens) - max_tokens} more)" if len(row.tokens) > max_tokens else ""
            lines.append(f"**{row.title}** ({panel.value_name}, sum {sum(row.values):.4f})  \n{cells}{more}\n")
    return "\n".join(lines)


def token_heatmap_terminal(row: TokenRow, scale: ColorScale | None = None) -> str:
    """The same colouring with 24-bit ANSI background colours, for a quick look in a terminal."""
    scale = scale or ColorScale([row])
    coloured = "".join(
        "\x1b[48;2;{};{};{}m\x1b[30m{}\x1b[0m".format(*scale.rgb(v), token) for token, v in zip(row.tokens, row.values)
    )
    return f"{row.title}\n{coloured}"
