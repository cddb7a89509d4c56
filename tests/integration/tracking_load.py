"""Concurrent logging load against a real tracking server, shared by
tests/integration/test_tracking_load.py and bench/tracking_load.py.

    with tracking_server("postgresql", tmp_path) as url:
        result = run_load(url, label="postgresql")     # LoadResult: run ids, points, wall_s
        assert not missing_or_extra_points(url, result.run_ids)

NUM_CLIENTS processes (each with its own connections to the server) each open a run and log
POINTS_PER_RUN metric points through RunLogger, the way rank 0 logs a GAN's training
curves: one log_batch per logged step carrying all KEYS. They start logging together, behind a
barrier; the wall time runs from its release to the last client's report.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.integration.mlflow_server import start_mlflow_server
from tests.integration.postgres_server import start_postgres

BACKENDS = ("sqlite", "postgresql")
NUM_CLIENTS = 8
POINTS_PER_RUN = 1000
# What genmodels.train.loop logs for a GAN at every logged step (train/<train_step's keys>, img/s, epoch).
KEYS = ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake", "train/grad_norm_d", "train/grad_norm_g",
        "train/img_per_s", "train/epoch")
STEPS = POINTS_PER_RUN // len(KEYS)  # 125 steps x 8 keys: one request per step, as shipped
EXPERIMENT = "tracking-load"
CLIENT_TIMEOUT_S = 300.0
assert STEPS * len(KEYS) == POINTS_PER_RUN


@contextlib.contextmanager
def tracking_server(backend: str, root: Path, workers: int = 1) -> Iterator[str]:
    """A `mlflow server` on 127.0.0.1 over an sqlite file in `root`, or over a fresh PostgreSQL cluster."""
    if backend == "sqlite":
        with start_mlflow_server(root, workers=workers) as url:
            yield url
    elif backend == "postgresql":
        with start_postgres() as database, start_mlflow_server(root, backend_store_uri=database, workers=workers) as url:
            yield url
    else:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def value(client: int, step: int, key_index: int) -> float:
    """The value client `client` logs for KEYS[key_index] at `step`: distinct, exact in float64."""
    return client * 1e6 + step * 10.0 + key_index + 0.5


@dataclass(frozen=True)
class LoadResult:
    run_ids: dict[int, str]  # client index -> MLflow run id
    points: int
    wall_s: float

    @property
    def points_per_s(self) -> float:
        return self.points / self.wall_s


def run_load(url: str, label: str, *, num_clients: int = NUM_CLIENTS, steps: int = STEPS) -> LoadResult:
    """Run the clients and wait for every one; raises with the clients' tracebacks if any failed.

    A spawned launcher imports MLflow once and forks the clients from its single thread: eight
    interpreters each importing MLflow would cost ~15 s of the two cores before any point is logged.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    launcher = context.Process(target=_launch, args=(url, label, num_clients, steps, results))
    launcher.start()
    try:
        outcome = results.get(timeout=CLIENT_TIMEOUT_S * 2)
        launcher.join(timeout=30)
    finally:
        if launcher.is_alive():
            launcher.kill()
            launcher.join()
    if isinstance(outcome, str):
        raise AssertionError(outcome)
    assert launcher.exitcode == 0, f"launcher exited with {launcher.exitcode}"
    return outcome


def _launch(url: str, label: str, num_clients: int, steps: int, results) -> None:
    try:
        results.put(_fork_clients(url, label, num_clients, steps))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails with it
        results.put(traceback.format_exc())


def _fork_clients(url: str, label: str, num_clients: int, steps: int) -> LoadResult:
    for module in ("genmodels.tracking", "mlflow.tracking.client", "mlflow.entities"):
        importlib.import_module(module)  # once here, inherited by every client

    context = multiprocessing.get_context("fork")
    barrier, reports = context.Barrier(num_clients + 1), context.Queue()
    clients = [context.Process(target=_client, args=(url, f"{label}-{i}", i, steps, barrier, reports))
               for i in range(num_clients)]
    for process in clients:
        process.start()
    try:
        try:
            barrier.wait(timeout=CLIENT_TIMEOUT_S)  # every client has opened its run
        except threading.BrokenBarrierError:
            raise AssertionError("a client failed before logging:\n" + "\n".join(_failures(reports, 10.0))) from None
        start = time.monotonic()
        run_ids, failures = {}, []
        for _ in clients:
            index, run_id, error = reports.get(timeout=CLIENT_TIMEOUT_S)
            run_ids[index] = run_id
            if error:
                failures.append(f"client {index}: {error}")
        wall_s = time.monotonic() - start
        assert not failures, "\n".join(failures)
        for process in clients:
            process.join(timeout=30)
            assert process.exitcode == 0, f"client exited with {process.exitcode}"
        return LoadResult(run_ids=run_ids, points=num_clients * steps * len(KEYS), wall_s=wall_s)
    finally:
        for process in clients:
            if process.is_alive():
                process.kill()
                process.join()


def _failures(reports, timeout_s: float) -> list[str]:
    failures = []
    with contextlib.suppress(queue.Empty):
        while True:
            index, _, error = reports.get(timeout=timeout_s)
            failures.append(f"client {index}: {error}")
    return failures


def _client(url: str, run_key: str, index: int, steps: int, barrier, reports) -> None:
    run_id, error = None, None
    try:
        from genmodels.tracking import RunLogger, Tracking, open_run

        run_id, _ = open_run(Tracking(uri=url, artifact_location=None), experiment=EXPERIMENT, run_key=run_key,
                             run_name=run_key, params={"client": index}, tags={})
        logger = RunLogger(url, run_id)
        barrier.wait(timeout=CLIENT_TIMEOUT_S)
        for step in range(1, steps + 1):
            logger.log_metrics({key: value(index, step, k) for k, key in enumerate(KEYS)}, step)
    except threading.BrokenBarrierError:
        error = "stopped: another client failed before the barrier"
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails with it
        error = traceback.format_exc()
        barrier.abort()
    reports.put((index, run_id, error))


def missing_or_extra_points(url: str, run_ids: dict[int, str], steps: int = STEPS) -> list[str]:
    """One line per (run, key) whose history is not exactly steps 1..steps with the client's values."""
    from mlflow import MlflowClient

    client, problems = MlflowClient(tracking_uri=url), []
    for index, run_id in sorted(run_ids.items()):
        for k, key in enumerate(KEYS):
            got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            want = [(step, value(index, step, k)) for step in range(1, steps + 1)]
            if got != want:
                lost, extra = sorted(set(want) - set(got)), len(got) - len(set(got))
                problems.append(f"client {index} run {run_id} {key}: {len(got)} points for {len(want)}; "
                                f"missing {lost[:5]}{'...' if len(lost) > 5 else ''}; duplicates {extra}; "
                                f"unexpected {sorted(set(got) - set(want))[:5]}")
    return problems
