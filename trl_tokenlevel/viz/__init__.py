"""Visualisation of per-token signals."""

from .heatmap import (
    ColorScale,
    HeatmapPanel,
    TokenRow,
    token_heatmap_html,
    token_heatmap_markdown,
    token_heatmap_page,
    token_heatmap_terminal,
    write_token_heatmap,
)

__all__ = [
    "ColorScale",
    "HeatmapPanel",
    "TokenRow",
    "token_heatmap_html",
    "token_heatmap_markdown",
    "token_heatmap_page",
    "token_heatmap_terminal",
    "write_token_heatmap",
]
