"""DDP and mixed-precision helpers shared by every family's training task.

    model = wrap(module, params, device, world_size)      # DDP when world_size > 1
    precision = Precision.for_run(params.amp, device)     # what the run does (AMP on CUDA only)
    with precision.autocast():
        loss = ...
    scaler = precision.scaler()                           # one per optimizer

A task takes its `Precision` as an argument rather than deciding from the device itself, so the
AMP paths (autocast, loss scaling) run in CPU unit tests too: `Precision(torch.bfloat16, "cpu",
scaled=True)` exercises what only a GPU would otherwise reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from genmodels.config import TrainParams

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DDP) else module


def wrap(module: nn.Module, params: TrainParams, device: torch.device, world_size: int) -> nn.Module:
    module = module.to(device)
    if world_size == 1:
        return module
    if params.sync_batchnorm:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: fp32) on `device_type`, and whether losses are scaled (fp16)."""

    dtype: torch.dtype | None = None
    device_type: str = "cpu"
    scaled: bool = False

    @classmethod
    def for_run(cls, amp: str, device: torch.device) -> Precision:
        """`train.amp` on CUDA; full precision elsewhere (the loop warns that CPU ignores it)."""
        if device.type != "cuda" or amp == "none":
            return cls(None, device.type, False)
        # Loss scaling for fp16 only: bf16 has fp32's exponent range.
        return cls(_AMP_DTYPES[amp], device.type, scaled=amp == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def scaler(self) -> torch.amp.GradScaler:
        """A fresh scaler: give each optimizer its own, since `unscale_` may run once per
        optimizer between two `update()`s (a shared one breaks with d_steps_per_g_step > 1)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)


def grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad.detach().flatten().float() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads)) if grads else torch.zeros(())
