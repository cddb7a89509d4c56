"""WebDataset shards: write them (`prepare`), describe them (`manifest.json`), read them back.

A sample is two tar members sharing a key: `KEY.png` (8-bit L or RGB), `KEY.cls` (ASCII
integer label, -1 when the source has no classes). Shards are plain USTAR tars with fixed
mtime/owner/mode, written in a fixed order, so the same input gives byte-identical shards.

    from genmodels.data.shards import prepare_shards
    manifest = prepare_shards(params.prepare, "data/shards")
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Literal

import webdataset as wds
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from genmodels.config import PrepareParams
from genmodels.data.sources import BadImage, Record, open_source
from genmodels.data.transforms import resize_center_crop, to_channels
from genmodels.files import file_sha256, free_space, out_of_space, replace_dir, size_text, staging_dir

SCHEMA_VERSION = 1
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"


class ShardError(RuntimeError):
    """A shard is missing, corrupt or not what the manifest says; the message names it."""


class PrepareError(RuntimeError):
    """`prepare` refused to publish shards (e.g. `on_bad_image: fail` with rejected inputs)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardInfo(_Frozen):
    name: str
    num_samples: int
    num_bytes: int
    sha256: str


class SplitInfo(_Frozen):
    num_samples: int
    shards: list[ShardInfo]


class Rejection(_Frozen):
    key: str
    reason: str


class Manifest(_Frozen):
    schema_version: Literal[1]
    source: str
    source_kind: str
    source_fingerprint: str
    image_size: int
    channels: int
    classes: list[str]
    params: dict
    splits: dict[str, SplitInfo]
    rejected: list[Rejection]
    location: str = ""
    """Where the shards live (directory or URL prefix); set by `load_manifest`, never written."""

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ShardError(f"{self.location}/{MANIFEST_NAME}: no split {name!r} (have {sorted(self.splits)})")
        return self.splits[name]

    def shard_url(self, shard: ShardInfo) -> str:
        return f"{self.location.rstrip('/')}/{shard.name}"


def split_of(key: str, seed: int, val_fraction: float) -> tuple[str, str]:
    """(split, order key) from a hash of (seed, key): a record never changes split when other
    records are added or removed, so val stays disjoint from train across dataset versions."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()
    split = "val" if int(digest[:16], 16) < val_fraction * 2**64 else "train"
    return split, digest[16:]


def prepare_shards(params: PrepareParams, out_dir: str | Path, *, progress: bool | None = None) -> Manifest:
    """Read the source, write shards + manifest into a temp dir, then swap it in for `out_dir`.

    Nothing under `out_dir` changes until every shard is written and checked: a bad source, a
    crash or an `on_bad_image: fail` leaves the previous shards as they were.
    """
    out_dir = Path(out_dir)
    source = open_source(params.source, max_image_pixels=params.max_image_pixels, max_file_bytes=params.max_file_bytes)
    by_split: dict[str, list[tuple[str, Record]]] = {s: [] for s in SPLITS}
    for record in source.records:
        split, order = split_of(record.key, params.seed, params.val_fraction)
        by_split[split].append((order, record))
    if progress is None:
        progress = sys.stderr.isatty() and not os.environ.get("CI")

    tmp = staging_dir(out_dir)
    try:
        rejected: list[Rejection] = []
        splits = {}
        with tqdm(total=len(source.records), desc="prepare", unit="img", disable=not progress) as bar:
            for split in SPLITS:
                ordered = [record for _, record in sorted(by_split[split], key=lambda pair: pair[0])]
                splits[split] = _write_split(tmp, split, ordered, source, params, rejected, bar)
        if splits["train"].num_samples == 0:
            raise PrepareError(f"prepare: no usable training images in {params.source!r}")
        if rejected and params.on_bad_image == "fail":
            listing = "\n".join(f"  {r.key}: {r.reason}" for r in rejected[:20])
            raise PrepareError(
                f"prepare: {len(rejected)} input(s) rejected and prepare.on_bad_image is 'fail' "
                f"(set it to 'skip' to drop them); previous shards left untouched:\n{listing}"
            )
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            source=params.source,
            source_kind=source.kind,
            source_fingerprint=source.fingerprint(),
            image_size=params.image_size,
            channels=params.channels,
            classes=source.classes,
            params=params.model_dump(),
            splits=splits,
            rejected=rejected,
        )
        text = json.dumps(manifest.model_dump(exclude={"location"}), indent=2, sort_keys=True) + "\n"
        (tmp / MANIFEST_NAME).write_text(text)
        replace_dir(tmp, out_dir)
    except BaseException as err:
        written = sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if out_of_space(err):  # a write error names no file: say where, and how much was needed
            raise PrepareError(
                f"prepare: {err.strerror} on the filesystem of {out_dir} after writing {size_text(written)} of new "
                f"shards ({free_space(out_dir)} now); previous shards left untouched (new shards are written beside "
                "them, then swapped in): free space there, or prepare elsewhere with --out"
            ) from err
        raise
    return manifest.model_copy(update={"location": str(out_dir)})


def _write_split(tmp, split, records, source, params, rejected, bar) -> SplitInfo:
    def encoded() -> Iterator[tuple[bytes, int]]:
        for record in records:
            bar.update(1)
            try:
                img = resize_center_crop(to_channels(source.load(record), params.channels), params.image_size)
            except BadImage as err:
                rejected.append(Rejection(key=record.key, reason=str(err)))
                continue
            png = io.BytesIO()
            img.save(png, format="PNG")
            yield png.getvalue(), record.label

    samples, shards, offset = encoded(), [], 0
    for chunk in iter(lambda: list(itertools.islice(samples, params.max_samples_per_shard)), []):
        path = tmp / f"{split}-{len(shards):06d}.tar"
        with open(path, "wb") as stream:
            # Short ASCII names and an integer mtime: tarfile writes plain USTAR headers (no pax
            # records), the only flavour `iter_samples` accepts.
            writer = wds.TarWriter(stream, user="genmodels", group="genmodels", mode=0o444, mtime=0, encoder=False)
            try:
                for i, (png, label) in enumerate(chunk):
                    writer.write({"__key__": f"{split}-{offset + i:08d}", "png": png, "cls": str(label).encode()})
            except BaseException:
                # Close tarfile's buffered stream now (it fails again on a full disk): left to its
                # __del__, it would write to the closed file and print a stray traceback.
                with contextlib.suppress(OSError, ValueError):
                    writer.close()
                raise
            writer.close()
        shards.append(ShardInfo(name=path.name, num_samples=len(chunk), num_bytes=path.stat().st_size, sha256=file_sha256(path)))
        offset += len(chunk)
    return SplitInfo(num_samples=offset, shards=shards)


# --- reading ---------------------------------------------------------------------------------


def load_manifest(location: str | Path) -> Manifest:
    """Load `manifest.json` from a shard directory, the manifest file itself, or an http(s):// or
    s3:// (gs://) URL."""
    location = str(location)
    if location.endswith(MANIFEST_NAME):
        location = location[: -len(MANIFEST_NAME)].rstrip("/") or "."
    url = f"{location.rstrip('/')}/{MANIFEST_NAME}"
    try:
        manifest = Manifest.model_validate_json(read_bytes(url, what="manifest"))
    except ValueError as err:
        raise ShardError(f"{url}: not a genmodels shard manifest ({err.__class__.__name__}): {err}") from None
    return manifest.model_copy(update={"location": location})


def manifest_sha256(manifest: Manifest) -> str:
    """sha256 of the manifest file as stored: the identity of a prepared dataset."""
    return hashlib.sha256(read_bytes(f"{manifest.location.rstrip('/')}/{MANIFEST_NAME}", what="manifest")).hexdigest()


def check_shards(manifest: Manifest, split: str) -> None:
    """Cheap up-front check of local shards (present, expected size) so a missing or truncated
    shard fails at start-up naming the shard, not mid-epoch; contents are hashed on every read."""
    if _is_url(manifest.location):
        return
    for shard in manifest.split(split).shards:
        path = Path(manifest.shard_url(shard))
        if not path.is_file():
            raise ShardError(f"shard {path} is missing (listed in {manifest.location}/{MANIFEST_NAME}); re-run prepare")
        size = path.stat().st_size
        if size != shard.num_bytes:
            raise ShardError(
                f"shard {path} is {size} bytes, manifest says {shard.num_bytes}: truncated or replaced; re-run prepare"
            )


def verify_shards(manifest: Manifest) -> None:
    """Every local shard present and byte for byte the one the manifest lists (size, then sha256),
    so that a truncated, corrupted or substituted shard stops a run before it starts, naming the
    shard, instead of mid-epoch. Reads every shard once (about a second per GB); shards behind a
    URL are hashed as the workers read them (`read_shard`)."""
    if _is_url(manifest.location):
        return
    for split in manifest.splits:
        check_shards(manifest, split)
        for shard in manifest.split(split).shards:
            path = Path(manifest.shard_url(shard))
            if file_sha256(path) != shard.sha256:
                raise ShardError(f"shard {path}: sha256 differs from {manifest.location}/{MANIFEST_NAME} (same size: corrupted, "
                                 "or substituted by another prepare run's); re-run prepare")


def read_shard(manifest: Manifest, shard: ShardInfo) -> bytes:
    """Whole shard bytes, verified against the manifest's sha256 before any sample is used."""
    url = manifest.shard_url(shard)
    data = read_bytes(url, what="shard")
    if len(data) != shard.num_bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ShardError(
            f"shard {url}: content does not match the manifest ({len(data)} bytes, expected {shard.num_bytes}; "
            "sha256 differs): corrupt, truncated or from another prepare run; re-run prepare"
        )
    return data


def read_bytes(url: str, *, what: str) -> bytes:
    try:
        if url.startswith(OBJECT_STORE_SCHEMES):
            return _read_object(url)
        if _is_url(url):
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read()
        return Path(url).read_bytes()
    except (FileNotFoundError, urllib.error.HTTPError) as err:
        raise ShardError(f"{what} {url} is missing ({err})") from None
    except (OSError, urllib.error.URLError) as err:
        raise ShardError(f"{what} {url} could not be read: {err}") from None


OBJECT_STORE_SCHEMES = ("s3://", "gs://")


def _read_object(url: str) -> bytes:
    """An object of S3 (or GCS) through pyarrow's filesystems, which Ray already ships: credentials,
    region and endpoint from the usual variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_ENDPOINT_URL for S3-compatible stores such as MinIO)."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://", *OBJECT_STORE_SCHEMES))


def iter_samples(data: bytes, name: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, png bytes, label) from a shard written by `prepare`.

    Parses USTAR headers directly: ~10x faster than `tarfile` for small members (it builds a
    TarInfo per member), which is what makes shards beat a PNG folder on local disk.
    """
    view = memoryview(data)
    pos, key, fields = 0, None, {}
    while pos + 512 <= len(data):
        header = data[pos : pos + 512]
        if header.count(0) == 512:
            if key is not None:
                yield _sample(name, key, fields)
            return
        if header[257:263] != b"ustar\0" or header[156:157] not in (b"0", b"\0"):
            raise ShardError(f"shard {name}: member at byte {pos} is not a plain USTAR file; not written by prepare")
        member = header[:100].rstrip(b"\0").decode()
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        start, pos = pos + 512, pos + 512 + (size + 511) // 512 * 512
        if start + size > len(data):
            raise ShardError(f"shard {name}: truncated inside member {member!r}")
        member_key, _, ext = member.partition(".")
        if member_key != key:
            if key is not None:
                yield _sample(name, key, fields)
            key, fields = member_key, {}
        fields[ext] = view[start : start + size]
    raise ShardError(f"shard {name}: truncated (no end-of-archive marker)")


def _sample(name: str, key: str, fields: dict) -> tuple[str, bytes, int]:
    if "png" not in fields or "cls" not in fields:
        raise ShardError(f"shard {name}: sample {key!r} has members {sorted(fields)}, expected cls and png")
    return key, bytes(fields["png"]), int(bytes(fields["cls"]))
