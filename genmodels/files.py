"""Publishing outputs whole or not at all: write beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator


def staging_dir(target: Path) -> Path:
    """An empty directory on the target's filesystem (so the final rename is atomic). What a
    killed writer (SIGKILL, OOM, power loss) left beside `target` is cleaned up first: a partial
    output can be as large as the real one, on the disk the new one needs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner()}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the published directory should read like any other
    return tmp


def _owner() -> str:
    """pid@host in the names of staging directories: whoever finds one later can tell whether its
    writer is still alive."""
    return f"{os.getpid()}@{socket.gethostname()}"


def recover_interrupted(target: Path) -> list[Path]:
    """Finish what writers that died left beside `target`: their `.NAME.tmp-*` staging directories
    are deleted, and a `.NAME.old-*` one (killed between the two renames of `replace_dir`) gives
    `target` back when `target` is missing. Only directories of processes of this host that no
    longer exist are touched: a live writer's, or another host's on a shared disk, are not.
    Returns the directories deleted."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)@(.+)-[^-]+")
    removed = []
    for path in sorted(target.parent.glob(f".{target.name}.*-*")):
        match = pattern.fullmatch(path.name)
        if not (match and path.is_dir() and match[3] == socket.gethostname() and not _alive(int(match[2]))):
            continue
        if match[1] == "old" and (path / target.name).is_dir() and not target.exists():
            os.rename(path / target.name, target)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie has exited: its parent (gone too, when a whole process group was killed) has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS)
        return True


def replace_dir(tmp: Path, target: Path) -> None:
    """Replace `target` by `tmp` with two renames on one filesystem (no half-written state)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_owner()}-", dir=target.parent))
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
    f = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with f:  # closing flushes: a full disk can fail there too
            f.write(data)
    except BaseException:
        os.unlink(f.name)
        raise
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def out_of_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def free_space(path: Path) -> str:
    """"976 kB free of 1.0 MB" on the filesystem holding `path` (its nearest existing ancestor)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    usage = shutil.disk_usage(path)
    return f"{size_text(usage.free)} free of {size_text(usage.total)}"


def size_text(num_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes / 1e3:.0f} kB"


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


class RunLocked(RuntimeError):
    """Another driver holds the run name; the message says who and where."""


@contextlib.contextmanager
def run_lock(storage: str, name: str, what: str) -> Iterator[Path | None]:
    """Hold `<storage>/<name>.lock` while a run or sweep of that name goes on: a second driver
    with the same name is refused at once instead of writing into the same checkpoints.

    An flock, which the kernel drops when its holder dies, SIGKILL included: a crashed driver
    leaves the file, never a stale lock. Linux's NFS client maps it onto NFS byte-range locks, so
    it holds across the hosts of a shared filesystem (NFSv4, or v3 with lockd). Object stores
    (s3://, gs://) have no locks: there nothing is held (docs/RELIABILITY.md)."""
    if "://" in storage and not storage.startswith("file://"):
        yield None
        return
    path = Path(storage.removeprefix("file://")) / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLocked(f"{what} {name!r} is already running ({holder}; lock {path}): wait for it to end, "
                            "or pick another name") from None
        f.truncate(0)
        f.write(f"pid {_owner()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
