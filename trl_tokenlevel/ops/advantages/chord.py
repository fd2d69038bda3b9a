"""CHORD, on-/off-policy mixing with dynamic weighting (spec §7), https://huggingface.co/papers/2508.11408.

``L = (1 − μ)·L_GRPO + μ·L_SFT`` with the μ schedule, and CHORD-φ's token weights ``φ(p) = p(1 − p)`` on the expert
tokens. The math is an SFT token loss, so it lives in :mod:`trl_tokenlevel.ops.sft`; it is re-exported here so every
RL family is reachable from ``ops.advantages``.
"""

from trl_tokenlevel.ops.sft import chord_mix, chord_mu, chord_phi, chord_sft_loss  # noqa: F401  (re-exported)

__all__ = ["chord_mix", "chord_mu", "chord_phi", "chord_sft_loss"]
