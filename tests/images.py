"""Builders of small on-disk image folders for tests, good and deliberately bad."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def digit_like(seed: int, size: int = 20) -> np.ndarray:
    """A random bright stroke on black: distinct per seed, cheap to make."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), dtype=np.uint8)
    r = rng.integers(2, size - 2, size=(6, 2))
    for y, x in r:
        img[max(0, y - 2) : y + 2, max(0, x - 2) : x + 2] = rng.integers(128, 256)
    return img


def write_good_folder(root: Path, per_class: int = 6, classes=("cat", "dog")) -> list[str]:
    paths = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{name}/img.{i:03d}.png"  # dots in names: keys must not inherit them
            Image.fromarray(digit_like(100 * c + i)).save(root / rel)
            paths.append(rel)
    return paths


def write_bad_folder(root: Path) -> dict[str, str]:
    """Inputs prepare must convert (value 'convert') or reject (value: a word of the reason)."""
    cases = {}
    bad = root / "bad"
    bad.mkdir(parents=True, exist_ok=True)

    (bad / "empty.png").write_bytes(b"")
    cases["bad/empty.png"] = "empty"
    (bad / "notes.png").write_text("this is a text file, not a PNG\n")
    cases["bad/notes.png"] = "identify"
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (bad / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    cases["bad/truncated.jpg"] = "truncated"
    # 8192 x 8192 = 67 M pixels claimed by a ~100 kB file: over the default 32 M pixel guard.
    Image.new("L", (8192, 8192)).save(bad / "bomb.png", optimize=True)
    cases["bad/bomb.png"] = "decompression bomb"

    Image.fromarray(digit_like(1)).convert("P").save(bad / "palette.png")
    pal = Image.fromarray(digit_like(2)).convert("P")
    pal.info["transparency"] = 0
    pal.save(bad / "palette_transparent.png", transparency=0)
    Image.fromarray(np.stack([digit_like(3)] * 3, -1)).convert("CMYK").save(bad / "cmyk.jpg")
    Image.fromarray(digit_like(4).astype(np.uint16) * 257).save(bad / "sixteen_bit.png")
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, digit_like(5)
    Image.fromarray(rgba, "RGBA").save(bad / "alpha.png")
    Image.fromarray(digit_like(6)).convert("1").save(bad / "bilevel.png")
    for name in ("palette.png", "palette_transparent.png", "cmyk.jpg", "sixteen_bit.png", "alpha.png", "bilevel.png"):
        cases[f"bad/{name}"] = "convert"
    return cases


def write_unsafe_folder(root: Path, outside: Path) -> dict[str, str]:
    """Links, special files and a big file under `root/odd`, for `prepare.max_file_bytes=2048`:
    each key maps to 'read' (accepted) or a word of the rejection reason. `outside` gets an image
    that a link from `root` points to and that must never be read."""
    cases = {}
    odd = root / "odd"
    odd.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)

    Image.fromarray(digit_like(7)).save(odd / "plain.png")
    cases["odd/plain.png"] = "read"
    (odd / "linked.png").symlink_to("plain.png")  # a link inside the folder is fine
    cases["odd/linked.png"] = "read"

    Image.fromarray(digit_like(8)).save(outside / "secret.png")  # a valid image: only the link is wrong
    (odd / "outside.png").symlink_to(outside / "secret.png")
    cases["odd/outside.png"] = "outside the source folder"
    (odd / "zero.png").symlink_to("/dev/zero")  # endless: reading it never finishes
    cases["odd/zero.png"] = "outside the source folder"
    os.mkfifo(odd / "pipe.png")  # opening it for reading blocks until a writer comes
    cases["odd/pipe.png"] = "not a regular file (FIFO)"
    png = io.BytesIO()
    Image.fromarray(digit_like(9)).save(png, "PNG")
    (odd / "big.png").write_bytes(png.getvalue().ljust(3000, b"\0"))  # Pillow would decode it
    cases["odd/big.png"] = "more than prepare.max_file_bytes=2048"
    (odd / "gone.png").symlink_to("missing.png")
    cases["odd/gone.png"] = "dangling symlink"
    (odd / "loop.png").symlink_to("loop.png")
    cases["odd/loop.png"] = "symbolic links"
    (odd / "ancestor").symlink_to(root, target_is_directory=True)  # followed, it would loop
    cases["odd/ancestor"] = "symlinked directory"
    return cases
