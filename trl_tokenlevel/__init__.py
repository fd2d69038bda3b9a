"""trl-tokenlevel: token-level credit assignment for Hugging Face TRL.

`from trl_tokenlevel import TokenDPOConfig, TokenDPOTrainer` is the drop-in for `trl.DPOConfig`/`trl.DPOTrainer`
(likewise `TokenGRPOConfig`/`TokenGRPOTrainer` and `TokenSFTConfig`/`TokenSFTTrainer`).
Trainers are imported lazily so that `trl_tokenlevel.ops` stays importable with torch alone.
"""

from __future__ import annotations

import importlib
import warnings

__version__ = "0.1.0"

# We override private TRL methods (`_compute_loss`, `_prepare_dataset`, ...), which change between minor releases.
TESTED_TRL_MINORS = ("1.16",)

_LAZY = {
    "TokenDPOConfig": "trl_tokenlevel.trainers.token_dpo_config",
    "TokenDPOTrainer": "trl_tokenlevel.trainers.token_dpo_trainer",
    "TokenSFTConfig": "trl_tokenlevel.trainers.token_sft_config",
    "TokenSFTTrainer": "trl_tokenlevel.trainers.token_sft_trainer",
    "TokenGRPOConfig": "trl_tokenlevel.trainers.token_grpo_config",
    "TokenGRPOTrainer": "trl_tokenlevel.trainers.token_grpo_trainer",
}

__all__ = list(_LAZY) + ["TESTED_TRL_MINORS", "__version__"]


def _check_trl_version() -> None:
    import trl

    minor = ".".join(trl.__version__.split(".")[:2])
    if minor not in TESTED_TRL_MINORS:
        warnings.warn(
            f"trl-tokenlevel {__version__} was tested with TRL {', '.join(m + '.x' for m in TESTED_TRL_MINORS)}, but "
            f"TRL {trl.__version__} is installed. It overrides private TRL methods that may have changed; check the "
            f"parity tests (`pytest tests/trainers`) or install `trl=={TESTED_TRL_MINORS[-1]}.*`.",
            stacklevel=3,
        )


def __getattr__(name: str):
    if name in _LAZY:
        _check_trl_version()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_tokenlevel' has no attribute {name!r}")
