"""Publishing outputs whole or not at all: write beside the target, then rename over it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def staging_dir(target: Path) -> Path:
    """An empty directory on the target's filesystem (so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the published directory should read like any other
    return tmp


def replace_dir(tmp: Path, target: Path) -> None:
    """Replace `target` by `tmp` with two renames on one filesystem (no half-written state)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """`path` holds `data` whole, or keeps what it held (a temporary file beside it, renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            f.write(data)
        except BaseException:
            os.unlink(f.name)
            raise
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, None when there is no such file (a stage that has not run yet)."""
    return json.loads(path.read_text()) if path.is_file() else None
