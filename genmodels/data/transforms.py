"""Image conversions shared by `prepare` (PIL, once per image) and the loaders (tensors, per batch)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> 8-bit `L` (channels=1) or `RGB` (channels=3).

    16-bit and 32-bit grey are rescaled (Pillow's own convert clips them to 255, turning most
    images white); alpha is composited over black, the background of the embedded digit sets;
    palette, CMYK, bilevel and YCbCr go through Pillow's RGB conversion; EXIF orientation is
    applied so camera photos are upright.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_DEPTH_MODES:
        # float32 in place: 4 bytes a pixel, one array (at prepare.max_image_pixels, 128 MiB where
        # float64 and its temporaries took 768); the same uint8 values, since v / 257 is never within
        # float32's error of a rounding boundary.
        values = np.array(img, dtype=np.float32)
        values *= 255.0 / 65535.0 if img.mode != "F" else 1.0
        values += 0.5
        img = Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img.convert("L" if channels == 1 else "RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` (bicubic, antialiased when shrinking), then center-crop."""
    width, height = img.size
    if (width, height) == (size, size):
        return img
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] in [0, 255] -> float32 in [-1, 1] (the range tanh generators emit)."""
    return images_u8.to(torch.float32).div_(127.5).sub_(1.0)


def image_grid(images: torch.Tensor, *, num_columns: int = 8, padding: int = 2) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one uint8 HxWxC (C=3) or HxW (C=1) picture, row-major."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    count, channels, height, width = images.shape
    num_columns = min(num_columns, count)
    rows = -(-count // num_columns)
    grid = torch.zeros((channels, rows * (height + padding) + padding, num_columns * (width + padding) + padding), dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // num_columns) * (height + padding), padding + (i % num_columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = image
    out = grid.permute(1, 2, 0).numpy()
    return out[..., 0] if channels == 1 else out
