"""Pure tests of the shard format, the split rule and the per-rank plan (no files)."""

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from genmodels.data.loader import plan_epoch
from genmodels.data.shards import ShardError, iter_samples, split_of
from genmodels.data.sources import BadImage, decode_image


def _tar(samples) -> bytes:
    stream = io.BytesIO()
    writer = wds.TarWriter(stream, mtime=0, encoder=False)
    for key, png, label in samples:
        writer.write({"__key__": key, "png": png, "cls": str(label).encode()})
    writer.close()
    return stream.getvalue()


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (4, 4), value).save(out, "PNG")
    return out.getvalue()


def test_iter_samples_reads_back_what_tarwriter_wrote():
    samples = [(f"k{i:03d}", _png(i), i % 3 - 1) for i in range(5)]
    assert list(iter_samples(_tar(samples), "t.tar")) == samples


def test_iter_samples_agrees_with_tarfile_on_member_bytes():
    data = _tar([("a", _png(7), 3)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        png = tar.extractfile("a.png").read()
    assert list(iter_samples(data, "t.tar")) == [("a", png, 3)]


@pytest.mark.parametrize("cut", [100, 600, 1500])
def test_truncated_shard_is_a_shard_error_naming_it(cut):
    data = _tar([("a", _png(1), 0), ("b", _png(2), 1)])
    with pytest.raises(ShardError, match="t.tar.*truncated"):
        list(iter_samples(data[:cut], "t.tar"))


def test_sample_missing_a_member_is_named():
    stream = io.BytesIO()
    writer = wds.TarWriter(stream, mtime=0, encoder=False)
    writer.write({"__key__": "lonely", "png": _png(1)})
    writer.close()
    with pytest.raises(ShardError, match="sample 'lonely' has members \\['png'\\]"):
        list(iter_samples(stream.getvalue(), "t.tar"))


@pytest.mark.parametrize(("fmt", "name"), [(tarfile.GNU_FORMAT, "a.png"), (tarfile.PAX_FORMAT, "x" * 120 + ".png")])
def test_foreign_tar_flavours_are_refused_not_misread(fmt, name):
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ShardError, match="not a plain USTAR file"):
        list(iter_samples(stream.getvalue(), "t.tar"))


def test_split_is_stable_when_records_are_added():
    keys = [f"img/{i}.png" for i in range(2000)]
    before = {k: split_of(k, 0, 0.1)[0] for k in keys}
    after = {k: split_of(k, 0, 0.1)[0] for k in keys + [f"new/{i}.png" for i in range(500)]}
    assert all(after[k] == before[k] for k in keys)
    assert 150 < Counter(before.values())["val"] < 250
    assert {k: split_of(k, 1, 0.1)[0] for k in keys} != before  # the seed matters


@pytest.mark.parametrize(
    ("shard_sizes", "world_size", "num_workers", "batch"),
    [([100] * 10, 2, 2, 8), ([1000], 2, 2, 16), ([7, 300, 13, 1], 3, 4, 5), ([50, 50], 4, 3, 2), ([5], 1, 8, 1)],
)
def test_plan_gives_every_rank_the_same_whole_batches_and_no_sample_twice(shard_sizes, world_size, num_workers, batch):
    num_batches = sum(shard_sizes) // (world_size * batch)
    seen = []
    for rank in range(world_size):
        plans = plan_epoch(shard_sizes, rank=rank, world_size=world_size, batch_size=batch,
                           num_workers=num_workers, seed=3, epoch=1, shuffle=True)
        assert len(plans) == num_workers
        per_worker = [sum(end - begin for _, begin, end in plan) for plan in plans]
        assert all(n % batch == 0 for n in per_worker)
        assert sum(per_worker) == num_batches * batch
        seen += [(shard, i) for plan in plans for shard, begin, end in plan for i in range(begin, end)]
        assert all(0 <= b < e <= shard_sizes[s] for plan in plans for s, b, e in plan)
    assert len(seen) == len(set(seen)) == world_size * num_batches * batch


def test_plan_is_deterministic_and_changes_with_epoch():
    args = dict(rank=0, world_size=2, batch_size=4, num_workers=2, seed=0, shuffle=True)
    sizes = [10] * 20
    assert plan_epoch(sizes, epoch=0, **args) == plan_epoch(sizes, epoch=0, **args)
    assert plan_epoch(sizes, epoch=0, **args) != plan_epoch(sizes, epoch=1, **args)


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty file"), (b"hello, not an image", "not an image Pillow can identify")],
)
def test_decode_image_rejects_with_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(data, max_image_pixels=1 << 20)


def test_decode_image_guards_pixel_count_before_decoding():
    out = io.BytesIO()
    Image.new("L", (300, 300)).save(out, "PNG")
    with pytest.raises(BadImage, match="300x300 = 90000 pixels, more than prepare.max_image_pixels=1000"):
        decode_image(out.getvalue(), max_image_pixels=1000)
    assert decode_image(out.getvalue(), max_image_pixels=90000).size == (300, 300)


def test_decode_image_rejects_truncated_jpeg():
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(out, "JPEG")
    with pytest.raises(BadImage, match="truncated"):
        decode_image(out.getvalue()[: len(out.getvalue()) // 2], max_image_pixels=1 << 20)
