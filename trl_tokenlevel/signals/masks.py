"""Token masks learned or derived from a reference model (SparsePO, https://huggingface.co/papers/2410.05102)."""

from __future__ import annotations

import math

import torch
from torch import nn

SPARSEPO_MASK_INITS = ("official", "mean_mixer")


def norm_eps_of(config) -> float:
    """The LayerNorm ε of the official mask: the model's own norm ε (`layer_norm_eps`, `layer_norm_epsilon`, or, for
    RMSNorm models such as Llama, `rms_norm_eps`; the official code reads the first two only), else 1e-5."""
    for name in ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 1e-5


class SparsePOMask(nn.Module):
    r"""SparsePO's learnable token mask over the reference hidden states of all layers (`simple_all` in the paper's code).

        a_{ℓ,t} = Dropout( ReLU( w_ℓ · LN(h_{ℓ,t}) + b_ℓ ) )        one LayerNorm shared by the layers; w_ℓ ∈ R^H, b_ℓ ∈ R
        m_t     = Dropout( ReLU( Σ_ℓ c_ℓ a_{ℓ,t} ) )                  c ∈ R^L, no bias; m_t ∈ [0, ∞), not capped at 1

    The reference hidden states carry no gradient; the mask parameters are trained jointly with the policy. ReLU makes
    many weights exactly 0; a mask that collapses to all zeros leaves the loss at log 2 (the trainer logs sparsity).

    Initialisation (`init`):

    - ``"official"`` (default): as `masks/mask_models.py::SimpleMaskAllLayers`, whose layers are PyTorch `Linear`
      modules with their default initialisation: ``w_ℓ, b_ℓ ~ U(±1/√H)``, ``c ~ U(±1/√L)``, LayerNorm weight 1, bias 0,
      ε = the model's norm ε (:func:`norm_eps_of`). Draws are made in the official module's order (w₁, b₁, …, w_L,
      b_L, c), so under the same seed the parameters are the official ones exactly. The mixer's random signs mean that
      at initialisation ``m_t = 0`` on the tokens where the negatively weighted layers dominate.
    - ``"mean_mixer"`` (this package's earlier choice): ``w_ℓ ~ N(0, 1/H)``, ``b_ℓ = 0``, ``c_ℓ = 1/L``: the initial
      mask is the mean of the per-layer ReLU scores, zero only where every layer's score is negative.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        dropout: float = 0.01,
        *,
        init: str = "official",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if init not in SPARSEPO_MASK_INITS:
            raise ValueError(f"SparsePO mask init must be one of {SPARSEPO_MASK_INITS}, got {init!r}.")
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.layer_weight = nn.Parameter(torch.empty(num_layers, hidden_size))
        self.layer_bias = nn.Parameter(torch.zeros(num_layers))
        self.mixer = nn.Parameter(torch.full((num_layers,), 1.0 / num_layers))
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            if init == "official":
                bound = 1.0 / math.sqrt(hidden_size)
                for layer in range(num_layers):
                    # `Linear(H, 1).reset_parameters()`: Kaiming-uniform (a = √5) weight, i.e. U(±1/√H), then the bias.
                    nn.init.kaiming_uniform_(self.layer_weight[layer : layer + 1], a=math.sqrt(5))
                    self.layer_bias[layer : layer + 1].uniform_(-bound, bound)
                nn.init.kaiming_uniform_(self.mixer.view(1, num_layers), a=math.sqrt(5))  # `Linear(L, 1, bias=False)`
            else:
                nn.init.normal_(self.layer_weight, std=hidden_size**-0.5)

    def forward(self, layer_hidden: list[torch.Tensor]) -> torch.Tensor:
        """`layer_hidden`: L tensors `(B, T, H)` (no grad) -> mask `(B, T)`."""
        stacked = torch.stack(layer_hidden, dim=0).to(self.layer_weight.dtype)  # (L, B, T, H)
        scores = torch.einsum("lbth,lh->lbt", self.norm(stacked), self.layer_weight) + self.layer_bias[:, None, None]
        activations = self.dropout(torch.relu(scores))
        return self.dropout(torch.relu(torch.einsum("lbt,l->bt", activations, self.mixer)))
