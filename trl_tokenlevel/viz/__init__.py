"""Visualisation of per-token signals."""

from .heatmap import TokenRow, token_heatmap_html, token_heatmap_terminal, write_token_heatmap

__all__ = ["TokenRow", "token_heatmap_html", "token_heatmap_terminal", "write_token_heatmap"]
