"""Differentiable augmentation for GANs on small data (DiffAugment, Zhao et al. 2020).

The same kind of random transform is applied to real and generated images before every D
forward, in the D step and in the G step alike, so D never sees unaugmented images and cannot
memorise the few thousand training images, while G's gradient flows through the transform
(Zhao et al. 2020 sec. 3, fig. 4: augmenting reals only makes G learn the augmented
distribution). Each image draws its own parameters from the global RNG (the rank's noise stream,
which a checkpoint restores). Images are [B, C, H, W] in [-1, 1]; 0 is mid-grey, the value the
paper fills with.
"""

from __future__ import annotations

import torch

POLICIES = ("color", "translation", "cutout")


def _color(x: torch.Tensor) -> torch.Tensor:
    """Brightness in [-0.5, 0.5), saturation in [0, 2), contrast in [0.5, 1.5): sec. 3 of the paper's
    appendix; saturation is the identity on one channel."""
    b = x.shape[0]
    x = x + (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + grey
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its side in each direction, filling with 0."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1), device=x.device)
    rows = torch.arange(h, device=x.device) + sh + dy  # [B, H] rows of the padded image
    cols = torch.arange(w, device=x.device) + sw + dx  # [B, W]
    padded = torch.nn.functional.pad(x, (sw, sw, sh, sh))
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Set one square of ``ratio`` of the side, at a random centre, to 0 in each image."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - ch % 2), (b, 1), device=x.device) - ch // 2
    left = torch.randint(0, w + (1 - cw % 2), (b, 1), device=x.device) - cw // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside_y = (ys >= top) & (ys < top + ch)  # [B, H]
    inside_x = (xs >= left) & (xs < left + cw)  # [B, W]
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


_TRANSFORMS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Apply the transforms named in ``policy`` (from POLICIES), in the order given; () is the identity."""
    for name in policy:
        x = _TRANSFORMS[name](x)
    return x
