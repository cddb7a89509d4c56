"""The training loader over prepared shards: split by rank and by loader worker, equal batches.

    loader = ShardLoader("data/shards", "train", rank=rank, world_size=world_size,
                         batch_size_per_worker=64, num_workers=2, seed=0)
    for epoch in range(num_epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:        # float32 [B, C, H, W] in [-1, 1], int64 [B]
            ...

Every rank gets exactly `len(loader)` = num_samples // (world_size * batch_size_per_worker)
batches per epoch, whatever the number of shards: DDP steps in lockstep, so a rank that ran
out early would leave the others waiting forever in all-reduce. How, in each mode:

* streaming (datasets larger than `cache_max_bytes`): each epoch the shard list is shuffled
  from (seed, epoch) and laid end to end; rank r takes the r-th contiguous slice of
  `len(loader) * batch_size_per_worker` samples and its loader workers split that slice by
  whole batches. Slices are cut by sample, not by shard, so one shard may be read by several
  ranks/workers (each keeps its own range): fewer shards than ranks x workers never hangs and
  never resamples. A shuffle buffer mixes samples inside each worker's slice.
* in memory (the split fits in `cache_max_bytes` decoded, as `mnist5k` does): the first epoch
  decodes every shard once (in the loader workers) into one uint8 tensor; each epoch is then a
  global permutation from (seed, epoch) cut into equal rank slices (DistributedSampler
  semantics), served by tensor indexing with no per-sample Python at all.

The manifest is checked first (shards present, sizes right) and every shard is sha256-checked
when read, so a missing or corrupt shard is an error naming it, never a hang.
"""

from __future__ import annotations

import io
import itertools
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from genmodels.data.shards import Manifest, ShardError, ShardInfo, check_shards, iter_samples, load_manifest, read_shard
from genmodels.data.transforms import to_float

Segment = tuple[int, int, int]  # (shard index, first sample, end sample) within one shard


def plan_epoch(
    shard_sizes: list[int], *, rank: int, world_size: int, batch_size: int, num_workers: int,
    seed: int, epoch: int, shuffle: bool,
) -> list[list[Segment]]:
    """Per loader worker of `rank`, the shard segments it reads this epoch (whole batches each)."""
    num_batches = sum(shard_sizes) // (world_size * batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(len(shard_sizes)) if shuffle else range(len(shard_sizes))
    starts = np.cumsum([0] + [shard_sizes[i] for i in order])
    base, extra = divmod(num_batches, num_workers)
    first = rank * num_batches * batch_size
    plans = []
    for worker in range(num_workers):
        count = (base + (worker < extra)) * batch_size
        lo, hi, segments = first, first + count, []
        for position, shard in enumerate(order):
            begin, end = max(lo, starts[position]), min(hi, starts[position + 1])
            if begin < end:
                segments.append((int(shard), int(begin - starts[position]), int(end - starts[position])))
        plans.append(segments)
        first = hi
    return plans


class ShardLoader:
    def __init__(
        self,
        manifest: Manifest | str,
        split: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size_per_worker: int,
        num_workers: int = 0,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        cache: bool | None = None,
        cache_max_bytes: int = 1 << 29,
        shuffle_buffer: int = 2048,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size_per_worker < 1 or num_workers < 0:
            raise ValueError(f"batch_size_per_worker must be >= 1 and num_workers >= 0, got {batch_size_per_worker}, {num_workers}")
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self.shards = self.manifest.split(split).shards
        check_shards(self.manifest, split)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size, self.num_workers, self.seed, self.epoch = batch_size_per_worker, num_workers, seed, epoch
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.num_samples = sum(s.num_samples for s in self.shards)
        self.num_batches = self.num_samples // (world_size * batch_size_per_worker)
        if self.num_batches == 0:
            raise ValueError(
                f"{self.manifest.location}: split {split!r} has {self.num_samples} samples, fewer than "
                f"world_size x batch_size_per_worker = {world_size} x {batch_size_per_worker}; lower the batch size"
            )
        size, channels = self.manifest.image_size, self.manifest.channels
        self.shape = (channels, size, size)
        self.cached = cache if cache is not None else self.num_samples * channels * size * size <= cache_max_bytes
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cached:
            yield from self._iter_memory()
            return
        plans = plan_epoch(
            [s.num_samples for s in self.shards], rank=self.rank, world_size=self.world_size,
            batch_size=self.batch_size, num_workers=max(1, self.num_workers), seed=self.seed,
            epoch=self.epoch, shuffle=self.shuffle,
        )
        stream = _SegmentStream(self, plans)
        for images, labels in self._loader(stream):
            yield to_float(images), labels

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        # An own generator: a DataLoader iterator otherwise draws its base seed from torch's global
        # RNG, and a training run resumed from a checkpoint would then draw different noise.
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0]))
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, generator=generator,
                          prefetch_factor=4 if self.num_workers else None)

    def _iter_memory(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._images is None:
            self._images = torch.empty((self.num_samples, *self.shape), dtype=torch.uint8)
            self._labels = torch.empty(self.num_samples, dtype=torch.int64)
            offsets = np.cumsum([0] + [s.num_samples for s in self.shards])
            plans = [[(i, 0, s.num_samples)] for i, s in enumerate(self.shards)]
            for index, images, labels in self._loader(_WholeShards(self, plans)):
                self._images[offsets[index] : offsets[index + 1]] = images
                self._labels[offsets[index] : offsets[index + 1]] = labels
        per_rank = self.num_batches * self.batch_size
        if self.shuffle:
            order = torch.from_numpy(np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples))
        else:
            order = torch.arange(self.num_samples)
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        for batch in mine.split(self.batch_size):
            yield to_float(self._images[batch]), self._labels[batch]


class _SegmentStream(IterableDataset):
    """Runs in each loader worker: reads its segments, shuffles, decodes whole uint8 batches."""

    def __init__(self, loader: ShardLoader, plans: list[list[Segment]]):
        self.manifest, self.shards, self.shape = loader.manifest, loader.shards, loader.shape
        self.batch_size, self.plans = loader.batch_size, plans
        self.shuffle, self.shuffle_buffer = loader.shuffle, loader.shuffle_buffer
        self.rng_seed = (loader.seed, loader.epoch, loader.rank)

    def _worker(self) -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    def _samples(self, segments: list[Segment]) -> Iterator[tuple[str, str, bytes, int]]:
        for index, begin, end in segments:
            shard = self.shards[index]
            data = read_shard(self.manifest, shard)
            for key, png, label in itertools.islice(iter_samples(data, shard.name), begin, end):
                yield shard.name, key, png, label

    def __iter__(self):
        worker = self._worker()
        workers = [worker] if get_worker_info() is not None else range(len(self.plans))
        for w in workers:
            samples = self._samples(self.plans[w])
            if self.shuffle:
                samples = _buffer_shuffle(samples, self.shuffle_buffer, np.random.default_rng([*self.rng_seed, w]))
            for chunk in iter(lambda: list(itertools.islice(samples, self.batch_size)), []):
                yield decode_batch(chunk, self.shape)


class _WholeShards(_SegmentStream):
    """Cache fill: worker w decodes shards w, w+W, ... and returns each whole, tagged by index."""

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for plan in self.plans[worker::num_workers]:
            images, labels = decode_batch(list(self._samples(plan)), self.shape)
            yield plan[0][0], images, labels


def decode_batch(chunk: list[tuple[str, str, bytes, int]], shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    channels, height, width = shape
    images = np.empty((len(chunk), height, width, channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i, (shard, key, png, _) in enumerate(chunk):
        img = Image.open(io.BytesIO(png), formats=("PNG",))  # skipping format sniffing: ~10% faster
        if img.size != (width, height) or img.mode != mode:
            raise ShardError(f"shard {shard}: sample {key} is {img.mode} {img.size}, manifest says {mode} {width}x{height}")
        images[i] = np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(height, width, channels)
    labels = torch.tensor([label for *_, label in chunk], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def read_split(manifest: Manifest | str, split: str, *, limit: int | None = None, batch_size: int = 1000
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of a split in manifest order (no shuffle, no drop): evaluation's reader.
    Yields float [-1, 1] image batches and labels; stops after `limit` samples if given."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    check_shards(manifest, split)
    shape = (manifest.channels, manifest.image_size, manifest.image_size)
    samples = (
        (shard.name, key, png, label)
        for shard in manifest.split(split).shards
        for key, png, label in iter_samples(read_shard(manifest, shard), shard.name)
    )
    samples = itertools.islice(samples, limit)
    for chunk in iter(lambda: list(itertools.islice(samples, batch_size)), []):
        images, labels = decode_batch(chunk, shape)
        yield to_float(images), labels


def read_images(manifest: Manifest | str, split: str, *, limit: int | None = None) -> torch.Tensor:
    """A whole split (its first `limit` samples) as one float [-1, 1] tensor [N, C, H, W]; N may be 0."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    batches = [images for images, _ in read_split(manifest, split, limit=limit, batch_size=500)]
    size = manifest.image_size
    return torch.cat(batches) if batches else torch.empty(0, manifest.channels, size, size)
