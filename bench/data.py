"""Shard loader vs a plain PyTorch `Dataset` over one PNG per file, side by side in one run.

    python bench/data.py [--epochs 3] [--batch-size 128] [--num-workers 2] [--no-ray-data]

Same images (the mnist5k train split, identical PNG bytes), same batch size, same loader
workers, same float [-1, 1] output, torch at 1 thread per process as in training. Settings:
(a) local disk, (b) served over HTTP by a server on 127.0.0.1 (object-storage-like: one
request per file vs one per shard), (c) epochs after the first from decoded memory. Also
measured, to justify our reader: the `webdataset` library's own pipeline and Ray Data's
`read_webdataset`. Prints images/s per row and the ratios the foundation issue asks for.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from genmodels.config import PrepareParams
from genmodels.data.loader import ShardLoader
from genmodels.data.shards import iter_samples, load_manifest, prepare_shards, read_shard
from genmodels.data.transforms import to_float


class PngFolder(Dataset):
    """The baseline a user writes first: one file (or URL) per image, decoded in __getitem__."""

    def __init__(self, items: list[tuple[str, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        where, label = self.items[index]
        if where.startswith("http://"):
            with urllib.request.urlopen(where) as response:
                source = io.BytesIO(response.read())
        else:
            source = where
        pixels = np.array(Image.open(source))  # writable: torch.from_numpy warns on read-only arrays
        return torch.from_numpy(pixels).unsqueeze(0), label


def folder_epoch(dataset: PngFolder, batch_size: int, num_workers: int) -> int:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers)
    return sum(len(to_float(images)) for images, _ in loader)


def shard_epoch(loader: ShardLoader, epoch: int) -> int:
    loader.set_epoch(epoch)
    return sum(len(images) for images, _ in loader)


def wds_epoch(urls: list[str], batch_size: int, num_workers: int) -> int:
    import webdataset as wds

    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
        .shuffle(1000)
        .decode("l8")
        .to_tuple("png", "cls")
        .batched(batch_size, partial=False)
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=num_workers)
    return sum(len(to_float(torch.as_tensor(np.asarray(images)).unsqueeze(1))) for images, _ in loader)


def timed(fn, epochs: int) -> tuple[float, list[float]]:
    """Images/s of each epoch; returns (median of all epochs, per-epoch list)."""
    rates = []
    for epoch in range(epochs):
        start = time.perf_counter()
        count = fn(epoch)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), rates


def serve(directory: Path) -> tuple[subprocess.Popen, str]:
    """A threaded static file server in its own process, like an object store's front end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", (
            "import functools, http.server, sys\n"
            "class Quiet(http.server.SimpleHTTPRequestHandler):\n"
            "    def log_message(self, *args): pass\n"
            "h = functools.partial(Quiet, directory=sys.argv[1])\n"
            "s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), h)\n"
            "print(s.server_address[1], flush=True)\n"
            "s.serve_forever()\n"
        ), str(directory)],
        stdout=subprocess.PIPE, text=True,
    )
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--no-ray-data", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="genmodels-bench-"))
    manifest = prepare_shards(PrepareParams(source="mnist5k"), work / "shards")
    folder = work / "png"
    items = []
    for shard in manifest.split("train").shards:
        for key, png, label in iter_samples(read_shard(manifest, shard), shard.name):
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            (folder / str(label) / f"{key}.png").write_bytes(png)
            items.append((f"{label}/{key}.png", label))
    server, url = serve(work)
    b, w, e = args.batch_size, args.num_workers, args.epochs
    shard_urls = [f"{url}/shards/{s.name}" for s in manifest.split("train").shards]
    rows: dict[str, float] = {}

    def run(name: str, fn) -> None:
        rows[name], rates = timed(fn, e)
        print(f"{name:<44} {rows[name]:>10,.0f} img/s   (epochs: {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)

    local_files = PngFolder([(str(folder / rel), label) for rel, label in items])
    http_files = PngFolder([(f"{url}/png/{rel}", label) for rel, label in items])
    stream_local = ShardLoader(work / "shards", "train", batch_size_per_worker=b, num_workers=w, cache=False)
    stream_http = ShardLoader(f"{url}/shards", "train", batch_size_per_worker=b, num_workers=w, cache=False)
    print(f"mnist5k train: {len(items)} images 28x28x1, batch {b}, {w} loader workers, {e} epochs, "
          f"{os.cpu_count()} cores, torch {torch.__version__}\n")
    run("(a) folder, one PNG per file, local", lambda ep: folder_epoch(local_files, b, w))
    run("(a) shards, ShardLoader streaming, local", lambda ep: shard_epoch(stream_local, ep))
    run("    shards, webdataset library, local", lambda ep: wds_epoch([str(work / "shards" / s.name) for s in manifest.split("train").shards], b, w))
    run("(b) folder, one PNG per file, HTTP", lambda ep: folder_epoch(http_files, b, w))
    run("(b) shards, ShardLoader streaming, HTTP", lambda ep: shard_epoch(stream_http, ep))
    run("    shards, webdataset library, HTTP", lambda ep: wds_epoch(shard_urls, b, w))
    cached = ShardLoader(work / "shards", "train", batch_size_per_worker=b, num_workers=w, cache=True)
    first = timed(lambda ep: shard_epoch(cached, ep), 1)[0]
    print(f"{'(c) shards, in memory, first epoch (decode)':<44} {first:>10,.0f} img/s")
    run("(c) shards, in memory, later epochs", lambda ep: shard_epoch(cached, ep + 1))
    if not args.no_ray_data:
        run_ray_data(manifest, work, b, e, rows)
    server.terminate()

    print("\nratios (same run, same images, batch and workers):")
    print(f"  (a) local disk:   shards / folder = {rows['(a) shards, ShardLoader streaming, local'] / rows['(a) folder, one PNG per file, local']:.2f}x  (target >= 1)")
    print(f"  (b) HTTP:         shards / folder = {rows['(b) shards, ShardLoader streaming, HTTP'] / rows['(b) folder, one PNG per file, HTTP']:.1f}x  (target >= 5)")
    print(f"  (c) in memory:    later epochs / local folder = {rows['(c) shards, in memory, later epochs'] / rows['(a) folder, one PNG per file, local']:.0f}x  (target >= 20)")
    print(f"  reader choice:    ShardLoader / webdataset library, local = "
          f"{rows['(a) shards, ShardLoader streaming, local'] / rows['    shards, webdataset library, local']:.2f}x")
    if "    shards, Ray Data read_webdataset, local" in rows:
        print(f"                    ShardLoader / Ray Data, local = "
              f"{rows['(a) shards, ShardLoader streaming, local'] / rows['    shards, Ray Data read_webdataset, local']:.2f}x")


def run_ray_data(manifest, work: Path, batch_size: int, epochs: int, rows: dict[str, float]) -> None:
    """Ray Data's reader, iterated on the driver (start-up of Ray itself excluded)."""
    import logging

    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        paths = [str(work / "shards" / s.name) for s in manifest.split("train").shards]

        def epoch(_):
            dataset = ray.data.read_webdataset(paths, decoder=None, suffixes=["png", "cls"])

            def decode(batch):
                pngs = batch["png"]
                images = np.stack([np.asarray(Image.open(io.BytesIO(p), formats=("PNG",))) for p in pngs])
                return {"image": images[:, None], "label": np.array([int(c) for c in batch["cls"]])}

            count = 0
            for batch in dataset.map_batches(decode, batch_size=batch_size).iter_torch_batches(batch_size=batch_size, drop_last=True):
                count += len(to_float(batch["image"]))
            return count

        name = "    shards, Ray Data read_webdataset, local"
        rows[name], rates = timed(epoch, epochs)
        print(f"{name:<44} {rows[name]:>10,.0f} img/s   (epochs: {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
    except Exception as err:  # a bench row, not a failure of the product: say why it is missing
        print(f"    Ray Data row skipped: {type(err).__name__}: {err}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
