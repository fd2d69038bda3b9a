"""Test-only switch that lets accelerate take its FSDP2 path on CPU (gloo), so trainer-level FSDP2 runs here.

accelerate 1.x selects FSDP only for GPU-like distributed types (`AcceleratorState.__init__` ignores the FSDP plugin
when the type is MULTI_CPU), so on CPU `fsdp=...` silently falls back to DDP. Everything after that choice
(`fully_shard` on a gloo device mesh, DTensor parameters, sharded optimizer state) works on CPU. After the original
initialisation this patch makes the one choice accelerate skips: distributed type FSDP with the plugin it was given.
Never imported by the package.
"""

from __future__ import annotations


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_allows_fsdp_on_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._allows_fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__
