"""Forward hooks that read hidden states and activations out of TRL's fused LM-head forward.

TRL's fused forward returns per-token log-probs but no logits and no hidden states. The full-distribution methods
(TDPO, SparsePO, MaPO) need the backbone's last hidden state (with its graph, for the policy) and sometimes inner
activations of the reference. Hooks read them during the forward that runs anyway: no second backbone pass.
`add_backbone_forward` goes one step further for the fused full-distribution pass: a forward that runs the backbone
and skips TRL's LM head altogether, so that `ops.fused` reads each head tile once.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections import defaultdict

import torch
from accelerate.utils import is_peft_model


def causal_lm_of(model, accelerator):
    """The transformers causal LM inside DDP/FSDP/PEFT wrappers (the module whose `base_model` TRL's head runs)."""
    model = accelerator.unwrap_model(model)
    return model.get_base_model() if is_peft_model(model) else model


def add_backbone_forward(causal_lm) -> None:
    """Make `model(..., backbone_only=True)` run only the backbone and return its output (`last_hidden_state` with its
    autograd graph), without the LM head; every other call goes to the forward it replaces (TRL's fused head).

    The switch is a keyword of the instance's `forward`, like TRL's `fused_lm_head`, so the call still passes through
    every wrapper that calls `forward` (DDP gradient synchronisation, PEFT, accelerate's autocast). Labels are not
    needed: the caller scores the hidden states itself. Apply it after `add_fused_lm_head` and to the unwrapped causal
    LM (`causal_lm_of`).
    """
    from ..ops.chunked import backbone_of

    wrapped = causal_lm.forward

    @functools.wraps(type(causal_lm).forward)  # `generate` validates its kwargs against this signature
    def forward(self, *args, backbone_only=False, **kwargs):
        if not backbone_only:
            return wrapped(*args, **kwargs)
        kwargs["use_cache"] = False
        text_config = self.config.get_text_config()
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)  # as the model's own forward and TRL's head do
        outputs = backbone_of(self)(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            outputs["aux_loss"] = router_load_balancing_loss(self, outputs.router_logits, kwargs.get("attention_mask"))
        return outputs

    causal_lm.forward = types.MethodType(forward, causal_lm)


def router_load_balancing_loss(causal_lm, router_logits, attention_mask):
    """The MoE load-balancing loss the model's own forward adds (`outputs.aux_loss`): Switch Transformer's
    `num_experts · Σ_e f_e · P_e` over the router logits of every layer, as transformers' Mixtral computes it, which
    every MoE family reuses; padding (attention mask 0) does not count."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = causal_lm.config.get_text_config()
    num_experts = getattr(text_config, "num_experts", None) or getattr(causal_lm, "num_experts", None)
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]


@contextlib.contextmanager
def capture_last_hidden_state(causal_lm):
    """Yield a dict whose "hidden" entry holds the backbone's last hidden state `(B, L, H)` after the forward."""
    store = {}
    handle = causal_lm.base_model.register_forward_hook(
        lambda module, args, output: store.__setitem__("hidden", _first_tensor(output))
    )
    try:
        yield store
    finally:
        handle.remove()


# MaPO hook points on Llama-style models, grouped by type as in the paper (mlp, attention, residual stream). The
# `logits` type of the official code is left out: the fused head never materialises logits.
MAPO_HOOK_GROUPS = {
    "all": {"mlp": ("mlp.act_fn",), "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj"), "resid": ("<layer>", "norm")},
    "resid": {"resid": ("<layer>", "norm")},
}  # fmt: skip


def _decoder_layers(backbone) -> list:
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(backbone).__name__} has no `layers` list of decoder layers; SparsePO/MaPO read per-layer "
            "activations of Llama-style backbones (Llama, Qwen2, Mistral, Gemma, ...)."
        )
    return list(layers)


@contextlib.contextmanager
def record_activation_means(causal_lm, hook_set: str):
    """Record, per MaPO hook type, the per-token mean over the hidden axis of each hooked activation.

    Yields a dict `type -> list of (B, L) float32 tensors`, filled during the forward (meant for a no-grad reference).
    """
    backbone = causal_lm.base_model
    layers = _decoder_layers(backbone)
    modules = dict(backbone.named_modules())
    records = defaultdict(list)
    handles = []

    def hook_for(kind):
        return lambda module, args, output: records[kind].append(_first_tensor(output).detach().float().mean(-1))

    for kind, suffixes in MAPO_HOOK_GROUPS[hook_set].items():
        targets = []
        for suffix in suffixes:
            if suffix == "<layer>":
                targets += layers
            else:
                targets += [m for name, m in modules.items() if name == suffix or name.endswith("." + suffix)]
        if not targets:
            raise ValueError(
                f"MaPO hook type {kind!r} found no module ending in {suffixes} in {type(backbone).__name__}. Use "
                "mapo_hooks='resid' (decoder-layer outputs and final norm), which every Llama-style model has."
            )
        handles += [module.register_forward_hook(hook_for(kind)) for module in targets]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record_layer_outputs(causal_lm):
    """Yield a list filled with every decoder layer's output hidden state `(B, L, H)` (SparsePO's mask input)."""
    outputs = []
    handles = [
        layer.register_forward_hook(lambda module, args, output: outputs.append(_first_tensor(output).detach()))
        for layer in _decoder_layers(causal_lm.base_model)
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
