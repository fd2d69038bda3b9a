"""Generation-time token-level methods: R2R routing, entropy-adaptive switching, cascades, logits processors."""

from .cascade import PostHocDeferral, calibrate_cascade, cascade_generate, cascade_scores
from .ead import ead_generate
from .kv import IncrementalDecoder, TokenRoutingOutput, cached_generate, encode_prompts
from .processors import AdaptiveTemperatureLogitsProcessor, ImplicitRewardLogitsProcessor
from .routing import (
    ContinuationJudge,
    JudgeRequest,
    RouterInputs,
    RouterTrainingConfig,
    TokenRouter,
    TokenRouterConfig,
    build_routing_dataset,
    calibrate_router,
    routed_generate,
    router_probabilities,
    routing_tensors,
    train_router,
)

__all__ = [
    "AdaptiveTemperatureLogitsProcessor",
    "ContinuationJudge",
    "ImplicitRewardLogitsProcessor",
    "IncrementalDecoder",
    "JudgeRequest",
    "PostHocDeferral",
    "RouterInputs",
    "RouterTrainingConfig",
    "TokenRouter",
    "TokenRouterConfig",
    "TokenRoutingOutput",
    "build_routing_dataset",
    "cached_generate",
    "calibrate_cascade",
    "calibrate_router",
    "cascade_generate",
    "cascade_scores",
    "ead_generate",
    "encode_prompts",
    "routed_generate",
    "router_probabilities",
    "routing_tensors",
    "train_router",
]
