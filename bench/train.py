"""Ray Train overhead and DDP scaling, measured side by side in one run.

    python bench/train.py [--family gan] [--num-steps 240] [--log-every-steps 40]

(a) Ray Train with 1 worker vs a plain single-process PyTorch loop: same task object, same
    loader, same steps, 1 torch thread each. Throughput is taken from the in-loop windows after
    the first (warm-up) one, so Ray's start-up (cluster, worker group, process group) is
    excluded from the ratio and reported on its own.
(b) Ray Train with 2 workers vs 1 worker, 1 thread each: images/s (global batch doubles).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from genmodels.config import PrepareParams, parse_params
from genmodels.data.loader import ShardLoader
from genmodels.data.shards import prepare_shards
from genmodels.families import FAMILIES, get_family
from genmodels.train.ddp import Precision
from genmodels.train.run import train


def plain_loop(params, family: str, shards: Path, num_steps: int, window: int) -> list[float]:
    """The same step function without Ray: images/s per window of `window` steps."""
    torch.set_num_threads(1)
    torch.manual_seed(params.train.seed)
    task = get_family(family).build_task(params.train, image_size=28, channels=1, device=torch.device("cpu"), world_size=1,
                                         precision=Precision())
    loader = ShardLoader(shards, "train", batch_size_per_worker=params.train.batch_size_per_worker, seed=params.train.seed)
    rates, step, start = [], 0, time.perf_counter()
    while step < num_steps:
        loader.set_epoch(step // len(loader))
        for images, _ in loader:
            task.train_step(images, step)
            step += 1
            if step % window == 0:
                now = time.perf_counter()
                rates.append(window * params.train.batch_size_per_worker / (now - start))
                start = now
            if step == num_steps:
                break
    return rates


def ray_run(params, family: str, shards: Path, work: Path, name: str) -> tuple[list[float], float]:
    """Ray Train run: (images/s per log window, wall seconds of fit incl. start-up)."""
    from mlflow import MlflowClient

    summary = train(params, family, shards=shards, models_dir=work / name / "models", metrics_dir=work / name / "metrics",
                    project_dir=work)
    history = MlflowClient(f"sqlite:///{work / 'mlruns.db'}").get_metric_history(summary["mlflow_run_id"], "train/img_per_s")
    return [m.value for m in sorted(history, key=lambda m: m.step)], summary["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="gan")
    parser.add_argument("--num-steps", type=int, default=240)
    parser.add_argument("--log-every-steps", type=int, default=40)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    work = Path(tempfile.mkdtemp(prefix="genmodels-bench-train-"))
    shards = work / "shards"
    prepare_shards(PrepareParams(source="mnist5k"), shards)

    def params(num_workers: int):
        return parse_params({"train": {
            "num_workers": num_workers, "log_every_steps": args.log_every_steps, "sample_every_steps": 10**9,
            "checkpoint_every_steps": 10**9, "eval_every_steps": 0, args.family: {"num_steps": args.num_steps},
        }})

    steady = lambda rates: statistics.mean(rates[1:])  # noqa: E731  (first window = warm-up)
    plain = plain_loop(params(1), args.family, shards, args.num_steps, args.log_every_steps)
    one, wall_one = ray_run(params(1), args.family, shards, work, "one")
    two, wall_two = ray_run(params(2), args.family, shards, work, "two")
    batch = params(1).train.batch_size_per_worker
    loop_one = args.num_steps * batch / steady(one)
    loop_two = args.num_steps * 2 * batch / steady(two)
    print(f"\n{args.family}, {args.num_steps} steps, batch {batch} per worker, 1 thread per process, {os.cpu_count()} cores")
    print(f"  plain PyTorch loop, 1 process     {steady(plain):8.0f} img/s   windows: {[round(r) for r in plain]}")
    print(f"  Ray Train, 1 worker               {steady(one):8.0f} img/s   windows: {[round(r) for r in one]}")
    print(f"  Ray Train, 2 workers              {steady(two):8.0f} img/s   windows: {[round(r) for r in two]}")
    print(f"  Ray start-up + teardown (fit wall - loop time): 1 worker {wall_one - loop_one:.1f} s, 2 workers {wall_two - loop_two:.1f} s")
    print("\nratios (same run):")
    print(f"  (a) time per step, Ray 1 worker / plain loop = {steady(plain) / steady(one):.3f}x  (target <= 1.05)")
    print(f"  (b) img/s, Ray 2 workers / Ray 1 worker      = {steady(two) / steady(one):.2f}x  (target >= 1.7)")


if __name__ == "__main__":
    main()
