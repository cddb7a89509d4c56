"""Concurrent logging load on the tracking server: SQLite vs PostgreSQL, side by side in one run.

    python bench/tracking_load.py [--repeats 3] [--workers 1]

Both servers (`mlflow server` on 127.0.0.1, `--workers` uvicorn workers; PostgreSQL a throwaway
cluster from Debian's packages, `make postgres`) run at the same time; each repeat sends the
load to one and then the other, in turns first. The load is the one tests/integration/test_tracking_load.py
checks: 8 processes x 1,000 metric points through RunLogger (125 logged steps x 8 GAN keys, one
request per step), released together. Every point is read back; a lost or doubled one fails.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.integration.* (not an installed package)

from tests.integration.tracking_load import (  # noqa: E402
    BACKENDS, NUM_CLIENTS, POINTS_PER_RUN, missing_or_extra_points, run_load, tracking_server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of each server")
    args = parser.parse_args()

    walls: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
    with tempfile.TemporaryDirectory(prefix="tracking-load-") as tmp, contextlib.ExitStack() as servers:
        urls = {backend: servers.enter_context(tracking_server(backend, Path(tmp) / backend, workers=args.workers))
                for backend in BACKENDS}
        for repeat in range(args.repeats):
            for backend in BACKENDS if repeat % 2 == 0 else BACKENDS[::-1]:  # neither always goes first
                url = urls[backend]
                result = run_load(url, label=f"{backend}-{repeat}")
                problems = missing_or_extra_points(url, result.run_ids)
                if problems:
                    print(f"{backend}: points lost or doubled:\n" + "\n".join(problems), file=sys.stderr)
                    return 1
                walls[backend].append(result.wall_s)
                print(f"{backend} repeat {repeat + 1}: {result.points} points in {result.wall_s:.2f} s "
                      f"({result.points_per_s:,.0f} points/s), none lost", flush=True)

    points = NUM_CLIENTS * POINTS_PER_RUN
    rate = {backend: points / statistics.median(wall) for backend, wall in walls.items()}
    print(f"\n{NUM_CLIENTS} concurrent runs x {POINTS_PER_RUN:,} points, server --workers {args.workers}, "
          f"median of {args.repeats}:\n")
    print("| backend | wall s (median) | wall s (all) | points/s |")
    print("|---|---:|---:|---:|")
    for backend, wall in walls.items():
        print(f"| {backend} | {statistics.median(wall):.2f} | {', '.join(f'{w:.2f}' for w in wall)} | {rate[backend]:,.0f} |")
    print(f"\npostgresql / sqlite: {rate['postgresql'] / rate['sqlite']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
