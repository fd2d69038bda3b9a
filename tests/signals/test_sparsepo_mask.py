"""SparsePO `simple_all` mask network: the official module's initialisation (same draws under the same seed) and
forward, written out with the official structure (one LayerNorm shared by the layers, a `Linear(H, 1)` per layer, a
bias-free `Linear(L, 1)` mixer, ReLU after each)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trl_tokenlevel.signals.masks import SparsePOMask, norm_eps_of


class OfficialStructure(nn.Module):
    """The layer layout of the official `SimpleMaskAllLayers` (ReLU activations), built from PyTorch modules."""

    def __init__(self, num_layers, hidden_size, eps):
        super().__init__()
        self.per_layer = nn.ModuleList([nn.Linear(hidden_size, 1) for _ in range(num_layers)])
        self.mixer = nn.Linear(num_layers, 1, bias=False)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, layer_hidden):
        scores = [torch.relu(linear(self.norm(h))) for linear, h in zip(self.per_layer, layer_hidden)]
        return torch.relu(self.mixer(torch.cat(scores, dim=-1))).squeeze(-1)


@pytest.mark.parametrize("num_layers, hidden_size, seed", [(1, 8, 0), (3, 16, 3), (30, 576, 11)])
def test_official_init_draws_the_official_parameters(num_layers, hidden_size, seed):
    torch.manual_seed(seed)
    official = OfficialStructure(num_layers, hidden_size, eps=1e-5)
    torch.manual_seed(seed)
    ours = SparsePOMask(num_layers, hidden_size)
    assert torch.equal(ours.layer_weight, torch.cat([linear.weight for linear in official.per_layer]))
    assert torch.equal(ours.layer_bias, torch.cat([linear.bias for linear in official.per_layer]))
    assert torch.equal(ours.mixer, official.mixer.weight[0])
    assert torch.equal(ours.norm.weight, official.norm.weight) and torch.equal(ours.norm.bias, official.norm.bias)
    bound = hidden_size**-0.5
    assert ours.layer_weight.abs().max() <= bound and ours.mixer.abs().max() <= num_layers**-0.5


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_forward_and_gradients_match_the_official_structure(dtype, tol):
    torch.manual_seed(5)
    official = OfficialStructure(4, 12, eps=1e-6).to(dtype)
    torch.manual_seed(5)
    ours = SparsePOMask(4, 12, dropout=0.0, norm_eps=1e-6).to(dtype)
    hidden = [torch.randn(2, 5, 12, dtype=dtype) for _ in range(4)]
    expected, actual = official(hidden), ours(hidden)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)
    assert (actual == 0).any() and (actual > 0).any()  # the ReLUs are exercised
    expected.square().sum().backward()
    actual.square().sum().backward()
    torch.testing.assert_close(ours.layer_weight.grad, torch.cat([lin.weight.grad for lin in official.per_layer]),
                               atol=tol, rtol=tol)  # fmt: skip
    torch.testing.assert_close(ours.mixer.grad, official.mixer.weight.grad[0], atol=tol, rtol=tol)


def test_mean_mixer_init_is_the_mean_of_layer_scores():
    """The documented alternative: c = 1/L and zero biases, so the initial mask is mean_ℓ ReLU(w_ℓ · LN(h_ℓ))."""
    torch.manual_seed(0)
    mask = SparsePOMask(3, 8, dropout=0.0, init="mean_mixer")
    assert torch.equal(mask.mixer, torch.full((3,), 1 / 3)) and torch.equal(mask.layer_bias, torch.zeros(3))
    hidden = [torch.randn(2, 4, 8) for _ in range(3)]
    scores = torch.stack([torch.relu(mask.norm(h) @ w) for h, w in zip(hidden, mask.layer_weight)])
    torch.testing.assert_close(mask(hidden), scores.mean(0))
    with pytest.raises(ValueError, match="init"):
        SparsePOMask(3, 8, init="xavier")


def test_norm_eps_follows_the_model_config():
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    assert norm_eps_of(GPTNeoXConfig(layer_norm_eps=3e-5)) == 3e-5
    assert norm_eps_of(GPT2Config(layer_norm_epsilon=2e-5)) == 2e-5
    assert norm_eps_of(LlamaConfig(rms_norm_eps=1e-6)) == 1e-6
    assert norm_eps_of(object()) == 1e-5
