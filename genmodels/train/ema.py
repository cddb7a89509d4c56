"""Exponential moving average of model weights (the EMA generator of Karras et al. 2018 sec. 4),
with BatchNorm statistics that belong to the averaged weights.

    ema_update(ema, model, ema_decay(0.999, step))
    standing_batchnorm_stats(ema, lambda g: ema(torch.randn(128, 100, generator=g)), seed=0)   # before sampling
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

STANDING_STATS_NUM_BATCHES = 16


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters.

    ``model`` may be DDP-wrapped: its ``.module`` holds the same names as the plain ``ema_model``.
    BatchNorm running statistics are not copied: they describe the live weights' activations,
    not the average's (recompute them with ``standing_batchnorm_stats``). Other buffers
    (spectral-norm u/v vectors) are copied. decay = 0 copies, decay = 1 keeps.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"expected EMA decay in [0, 1], got {decay}")
    model = getattr(model, "module", model)
    ema_params, params = list(ema_model.parameters()), list(model.parameters())
    ema_buffers, buffers = dict(ema_model.named_buffers()), dict(model.named_buffers())
    if len(ema_params) != len(params) or ema_buffers.keys() != buffers.keys():
        raise ValueError("ema_model and model differ in structure; build the EMA copy with copy.deepcopy(model)")
    for ema_p, p in zip(ema_params, params):
        ema_p.lerp_(p, 1.0 - decay)
    batchnorm = _batchnorm_buffer_names(ema_model)
    for name, buffer in buffers.items():
        if name not in batchnorm:
            ema_buffers[name].copy_(buffer)


def ema_decay(target: float, step: int) -> float:
    """Decay ramped up from 0.1 towards `target` as (1 + step) / (10 + step) (the num_updates rule
    of TensorFlow's ExponentialMovingAverage): with a fixed 0.999 a run of ~1k steps samples from
    an average still dominated by its first, untrained generators."""
    return min(target, (1 + step) / (10 + step))


@torch.no_grad()
def standing_batchnorm_stats(model: nn.Module, forward: Callable[[torch.Generator], object], *, seed: int,
                             num_batches: int = STANDING_STATS_NUM_BATCHES) -> None:
    """Recompute every BatchNorm's running mean/var in `model` as the plain average over
    `num_batches` calls of `forward(generator)`, each running one batch of the inputs the model
    meets when it is used ("standing statistics", Brock et al. 2019 sec. 4.2 / BigGAN), leaving
    the model in eval mode.

    `forward` draws its noise from `generator`, a private one seeded with `seed`, never from the
    global RNG (drawing from it would change the training noise after a resume). Same weights
    and seed give the same statistics on every rank; under torch.distributed rank 0's are
    broadcast anyway, so the ranks agree to the bit whatever their kernels did.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
        layer.train()
    try:
        for _ in range(num_batches):
            forward(generator)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for layer in layers:
            dist.broadcast(layer.running_mean, src=0)
            dist.broadcast(layer.running_var, src=0)


def _batchnorm_buffer_names(model: nn.Module) -> set[str]:
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, _BatchNorm)
            for name, _ in module.named_buffers(recurse=False)}
