"""The shard loader on real shards: per-rank split with world_size=2, loader workers, HTTP, corruption."""

import functools
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from genmodels.config import PrepareParams
from genmodels.data.loader import ShardLoader
from genmodels.data.shards import ShardError, load_manifest, prepare_shards


def _epoch(loader: ShardLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _fingerprints(batches) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for images, _ in batches for image in images]


@pytest.mark.parametrize("cache", [False, True], ids=["streaming", "in-memory"])
def test_two_ranks_get_equal_disjoint_batches(mnist_shards, cache):
    manifest = load_manifest(mnist_shards)
    batch = 50
    loaders = [
        ShardLoader(manifest, "train", rank=rank, world_size=2, batch_size_per_worker=batch, num_workers=2, seed=7, cache=cache)
        for rank in range(2)
    ]
    num_train = manifest.split("train").num_samples
    per_rank = [_epoch(loader, 0) for loader in loaders]
    assert [len(b) for b in per_rank] == [len(loaders[0])] * 2 == [num_train // (2 * batch)] * 2
    for batches in per_rank:
        for images, labels in batches:
            assert images.shape == (batch, 1, 28, 28) and images.dtype == torch.float32
            assert images.min() >= -1.0 and images.max() <= 1.0 and images.max() > 0.9
            assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9
    seen = [set(_fingerprints(b)) for b in per_rank]
    assert not (seen[0] & seen[1])
    assert len(seen[0] | seen[1]) >= 0.99 * 2 * len(loaders[0]) * batch  # a few MNIST digits are duplicates
    again = [_epoch(loader, 0) for loader in loaders]
    assert _fingerprints(again[0]) == _fingerprints(per_rank[0])  # same seed and epoch: same order
    assert _fingerprints(_epoch(loaders[0], 1)) != _fingerprints(per_rank[0])  # next epoch reshuffles


def test_fewer_shards_than_ranks_times_workers_still_balances(tmp_path):
    out = tmp_path / "one_shard"
    prepare_shards(PrepareParams(source="digits", image_size=8, max_samples_per_shard=10_000, val_fraction=0.0), out)
    manifest = load_manifest(out)
    assert len(manifest.split("train").shards) == 1
    counts, seen = [], []
    for rank in range(2):
        loader = ShardLoader(manifest, "train", rank=rank, world_size=2, batch_size_per_worker=64, num_workers=2, cache=False)
        batches = list(loader)
        counts.append(len(batches))
        seen.append(set(_fingerprints(batches)))
    assert counts == [1797 // 128] * 2
    assert len(seen[0] & seen[1]) <= 5  # disjoint samples; load_digits has a few identical images


def test_http_served_shards_read_like_local_ones(mnist_shards):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(mnist_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = ShardLoader(url, "val", batch_size_per_worker=100, num_workers=2, shuffle=False, cache=False)
        local = ShardLoader(mnist_shards, "val", batch_size_per_worker=100, num_workers=2, shuffle=False, cache=False)
        assert remote.manifest.location == url
        assert _fingerprints(list(remote)) == _fingerprints(list(local))
        with pytest.raises(ShardError, match=f"manifest {url}/nowhere/manifest.json is missing"):
            ShardLoader(f"{url}/nowhere", "val", batch_size_per_worker=1)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def shards_copy(mnist_shards, tmp_path):
    dest = tmp_path / "shards"
    shutil.copytree(mnist_shards, dest)
    return dest


def test_missing_shard_is_named_at_construction(shards_copy):
    (shards_copy / "train-000002.tar").unlink()
    with pytest.raises(ShardError, match="shard .*train-000002.tar is missing"):
        ShardLoader(shards_copy, "train", batch_size_per_worker=8)


def test_truncated_shard_is_named_at_construction(shards_copy):
    path = shards_copy / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ShardError, match="shard .*train-000001.tar is 5000 bytes, manifest says .*truncated"):
        ShardLoader(shards_copy, "train", batch_size_per_worker=8)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupted_shard_is_named_when_read(shards_copy, num_workers):
    path = shards_copy / "val-000000.tar"
    data = bytearray(path.read_bytes())
    data[3000] ^= 0xFF  # same size, different content: only the sha256 can tell
    path.write_bytes(bytes(data))
    loader = ShardLoader(shards_copy, "val", batch_size_per_worker=8, num_workers=num_workers, cache=False)
    with pytest.raises(ShardError, match="shard .*val-000000.tar: content does not match the manifest"):
        list(loader)


def test_batch_larger_than_split_is_refused_with_numbers(mnist_shards):
    with pytest.raises(ValueError, match="split 'val' has \\d+ samples, fewer than world_size x batch_size_per_worker = 2 x 4000"):
        ShardLoader(mnist_shards, "val", world_size=2, rank=1, batch_size_per_worker=4000)


def test_s3_shards_read_like_local_ones_from_an_s3_compatible_server(mnist_shards, tmp_path, monkeypatch):
    """moto's S3 server on 127.0.0.1 stands in for S3 or MinIO; the shards are uploaded with pyarrow."""
    import pyarrow.fs

    from tests.integration.mlflow_server import _free_port

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        s3 = _until_connected(lambda: pyarrow.fs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}",
                                                               region="us-east-1", allow_bucket_creation=True))
        s3.create_dir("shards")
        pyarrow.fs.copy_files(str(mnist_shards), "shards/mnist", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=s3)
        remote = ShardLoader("s3://shards/mnist", "val", batch_size_per_worker=100, num_workers=2, shuffle=False, cache=False)
        local = ShardLoader(mnist_shards, "val", batch_size_per_worker=100, num_workers=2, shuffle=False, cache=False)
        assert _fingerprints(list(remote)) == _fingerprints(list(local))
        with pytest.raises(ShardError, match="manifest s3://shards/nowhere/manifest.json is missing"):
            ShardLoader("s3://shards/nowhere", "val", batch_size_per_worker=1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _until_connected(make, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        filesystem = make()
        try:
            filesystem.get_file_info("shards")  # any request: is the server up?
            return filesystem
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)  # the server is starting: nothing to wait on but its port
