"""Exponential moving average of model weights (the EMA generator of Karras et al. 2018 sec. 4)."""

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied as they are.

    ``model`` may be DDP-wrapped: its ``.module`` holds the same names as the plain ``ema_model``.
    Buffers (BatchNorm running stats, spectral-norm u/v vectors) are copied rather than averaged:
    they are statistics of the current weights, not weights. decay = 0 copies, decay = 1 keeps.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"expected EMA decay in [0, 1], got {decay}")
    model = getattr(model, "module", model)
    ema_params, params = list(ema_model.parameters()), list(model.parameters())
    ema_buffers, buffers = list(ema_model.buffers()), list(model.buffers())
    if len(ema_params) != len(params) or len(ema_buffers) != len(buffers):
        raise ValueError("ema_model and model differ in structure; build the EMA copy with copy.deepcopy(model)")
    for ema_p, p in zip(ema_params, params):
        ema_p.lerp_(p, 1.0 - decay)
    for ema_b, b in zip(ema_buffers, buffers):
        ema_b.copy_(b)


def ema_decay(target: float, step: int) -> float:
    """Decay ramped up from 0.1 towards `target` as (1 + step) / (10 + step) (the num_updates rule
    of TensorFlow's ExponentialMovingAverage): with a fixed 0.999 a run of ~1k steps samples from
    an average still dominated by its first, untrained generators."""
    return min(target, (1 + step) / (10 + step))
