"""Token masks learned or derived from a reference model (SparsePO, https://huggingface.co/papers/2410.05102)."""

from __future__ import annotations

import torch
from torch import nn


class SparsePOMask(nn.Module):
    r"""SparsePO's learnable token mask over the reference hidden states of all layers (`simple_all` in the paper's code).

        a_{ℓ,t} = Dropout( ReLU( w_ℓ · LN(h_{ℓ,t}) + b_ℓ ) )        one LayerNorm shared by the layers; w_ℓ ∈ R^H, b_ℓ ∈ R
        m_t     = Dropout( ReLU( Σ_ℓ c_ℓ a_{ℓ,t} ) )                  c ∈ R^L, no bias; m_t ∈ [0, ∞), not capped at 1

    The reference hidden states carry no gradient; the mask parameters are trained jointly with the policy. ReLU makes
    many weights exactly 0; a mask that collapses to all zeros leaves the loss at log 2 (the trainer logs sparsity).
    """

    def __init__(self, num_layers: int, hidden_size: int, dropout: float = 0.01):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.layer_weight = nn.Parameter(torch.empty(num_layers, hidden_size))
        self.layer_bias = nn.Parameter(torch.zeros(num_layers))
        self.mixer = nn.Parameter(torch.full((num_layers,), 1.0 / num_layers))
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.layer_weight, std=hidden_size**-0.5)

    def forward(self, layer_hidden: list[torch.Tensor]) -> torch.Tensor:
        """`layer_hidden`: L tensors `(B, T, H)` (no grad) -> mask `(B, T)`."""
        stacked = torch.stack(layer_hidden, dim=0).to(self.layer_weight.dtype)  # (L, B, T, H)
        scores = torch.einsum("lbth,lh->lbt", self.norm(stacked), self.layer_weight) + self.layer_bias[:, None, None]
        activations = self.dropout(torch.relu(scores))
        return self.dropout(torch.relu(torch.einsum("lbt,l->bt", activations, self.mixer)))
