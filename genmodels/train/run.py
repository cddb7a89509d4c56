"""The training driver: resolve, open the MLflow run, fit on Ray, export, write metrics.

    from genmodels.train.run import train
    summary = train(params, "gan", shards="data/shards", models_dir="models", metrics_dir="metrics")

Outputs: `models/<family>/` (weights.pt: the family's exported state dicts, e.g. the EMA
generator for GANs; config.json: the resolved config; mlflow.json: the run to attach
evaluation/registry to), `metrics/train_<family>.json` and `metrics/train_<family>_curve.csv`
(DVC metrics and plots).

Every exit ends the MLflow run: FINISHED, FAILED (an error, a digest mismatch, a failed export)
or KILLED (SIGINT or SIGTERM: the Ray run is aborted, a started export is finished whole, and
`Interrupted` is raised; the CLI exits 130 or 143). An MLflow server unreachable for longer than
`train.tracking_outage_s` stops training cleanly at a checkpoint, which keeps the metrics not yet
logged (TrainError; rerun to resume); shorter outages are absorbed (`genmodels.tracking.RunLogger`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import torch

from genmodels.cluster import check_shared, ensure_ray, preflight
from genmodels.config import Params, TrainParams
from genmodels.data.shards import Manifest, load_manifest, manifest_sha256, verify_shards
from genmodels.families import FAMILIES, Family, get_family
from genmodels.files import file_sha256, free_space, out_of_space, run_lock, write_bytes, write_text
from genmodels.progress import Progress, channel, follow, send, train_display, train_logging
from genmodels.progress import verbose as progress_verbose
from genmodels.train.chaos import Chaos
from genmodels.train.checkpoint import StartFrom, read_exported
from genmodels.train.loop import TrainJob, code_digest, tracking_stop_error, train_loop_per_worker


class TrainError(RuntimeError):
    """Training failed; the message carries the worker's own error, not Ray's wrapping."""


class Interrupted(BaseException):
    """The driver received SIGINT or SIGTERM. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` swallows it on its way out; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


@dataclass(frozen=True)
class _Resolved:
    """What `train` decided before anything ran: the job for the workers and the run's names."""

    job: TrainJob
    run_name: str
    storage: str
    config: dict
    """The resolved config: MLflow params, and models/<family>/config.json."""
    manifest: Manifest


def train(params: Params, family: str, *, shards: str | Path = "data/shards", models_dir: str | Path = "models",
          metrics_dir: str | Path = "metrics", project_dir: str | Path = ".", featurizer_dir: str | Path = "models/featurizer") -> dict:
    from genmodels.tracking import finish_run, resolve_tracking

    spec = get_family(family)
    project_dir = Path(project_dir).resolve()
    tracking = resolve_tracking(project_dir)
    resolved = _resolve(params, spec, shards, project_dir, tracking.uri, Path(featurizer_dir))  # fails before Ray starts
    with run_lock(resolved.storage, resolved.run_name, f"train {family}: run"):  # before Ray starts: refused at once
        ensure_ray()
        with _DriverSignals() as signals:  # after ray.init, whose core worker installs a SIGTERM handler of its own
            preflight(num_workers=params.train.num_workers, cpus_per_worker=params.train.cpus_per_worker, use_gpu=params.train.use_gpu)
            check_shared({"train.storage_path": resolved.storage, "shards": resolved.job.shards, "tracking store": tracking.uri,
                          "tracking artifacts": tracking.artifact_location,
                          "GENMODELS_CHAOS marker": resolved.job.chaos.marker if resolved.job.chaos else None})
            job = None
            try:
                job, resumed = _open_run(resolved, tracking, project_dir)
                tp = job.params
                print(f"train {family}: run {resolved.run_name!r} ({'resumed' if resumed else 'new'}), {tp.num_workers} worker(s), "
                      f"{spec.params(tp).num_steps} steps; MLflow run {job.run_id} in {tracking.uri}", flush=True)
                result, wall_s = _fit(job, resolved, signals)
                signals.deferred = True  # a signal now lets the export finish whole, then counts
                step = _export(spec, result, resolved, job, Path(models_dir))
                summary = _write_metrics(spec, result, job, step=step, wall_s=wall_s, resumed=resumed, metrics_dir=Path(metrics_dir))
                if signals.received:
                    raise KeyboardInterrupt
            except BaseException as err:
                signals.deferred = True
                killed = bool(signals.received) or isinstance(err, KeyboardInterrupt)
                if job is not None:
                    _end_run(job, "KILLED" if killed else "FAILED")
                if killed:
                    raise Interrupted(signals.received[0] if signals.received else signal.SIGINT) from None
                raise
            finish_run(job.tracking_uri, job.run_id, "FINISHED", outage_s=job.params.tracking_outage_s)
    return summary


def _end_run(job: TrainJob, status: str) -> None:
    """Mark the MLflow run FAILED or KILLED: one try, and a warning if the server does not take
    it, so that the error on its way out is the one reported (after an outage past the bound,
    waiting out another one here would only delay it). A rerun sets the run RUNNING again anyway."""
    from genmodels.tracking import TrackingError, finish_run

    try:
        finish_run(job.tracking_uri, job.run_id, status, outage_s=0)
    except Exception as err:  # noqa: BLE001 - the training error matters more
        said = str(err) if isinstance(err, TrackingError) else f"marking run {job.run_id} {status}: {err}"
        print(f"train {job.family}: warning: {said}", file=sys.stderr, flush=True)


def _resolve(params: Params, spec: Family, shards: str | Path, project_dir: Path, tracking_uri: str, featurizer_dir: Path) -> _Resolved:
    tp = params.train
    shards = str(shards) if "://" in str(shards) else str(Path(shards).resolve())
    manifest = load_manifest(shards)
    verify_shards(manifest)
    manifest_sha = manifest_sha256(manifest)
    job = TrainJob(family=spec.name, params=tp, shards=shards, manifest_sha256=manifest_sha, image_size=manifest.image_size,
                   channels=manifest.channels, code_sha256=code_digest(), tracking_uri=tracking_uri, run_id="-",
                   chaos=Chaos.from_env(), **_periodic_eval_inputs(params, spec, manifest, featurizer_dir))
    config = run_config(job, {"shards": shards, "manifest_sha256": manifest_sha, "image_size": manifest.image_size,
                              "channels": manifest.channels, "num_train": manifest.split("train").num_samples})
    return _Resolved(job=job, run_name=tp.run_name or job.default_run_name(), storage=_storage_uri(tp.storage_path, project_dir),
                     config=config, manifest=manifest)


def run_config(job: TrainJob, data: dict) -> dict:
    """The resolved config of a run: its MLflow params, and models/<family>/config.json."""
    return {"family": job.family, "train": job.params.model_dump(exclude=set(FAMILIES)), job.family: job.family_params.model_dump(),
            "data": data}


def _periodic_eval_inputs(params: Params, spec: Family, manifest: Manifest, featurizer_dir: Path) -> dict:
    """Featurizer and reference statistics for a periodic FID, computed once here (cached), as
    bytes in the job: a worker on another node cannot open the driver's files."""
    if not spec.needs_featurizer(params.train):
        return {}
    from genmodels.metrics.features import domain_extractor, featurizer_files
    from genmodels.metrics.protocol import reference_stats

    try:
        files = featurizer_files(featurizer_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; or set train.eval_every_steps: 0 to train without periodic FID") from None
    reference = reference_stats(domain_extractor(files), manifest, params.evaluate)
    return {"featurizer": files, "eval_reference": reference.stats.to_bytes()}


def _storage_uri(storage_path: str, project_dir: Path) -> str:
    if "://" in storage_path:
        return storage_path
    return str((project_dir / storage_path).resolve())  # Ray needs absolute paths; workers chdir elsewhere


def _open_run(resolved: _Resolved, tracking, project_dir: Path) -> tuple[TrainJob, bool]:
    from genmodels.tracking import git_tags, open_run, runtime_tags

    job, tp = resolved.job, resolved.job.params
    tags = {**git_tags(project_dir), **runtime_tags(), "data.manifest_sha256": job.manifest_sha256,
            "data.source": resolved.manifest.source, "ray.world_size": str(tp.num_workers), "ray.run_name": resolved.run_name,
            "genmodels.family": job.family}
    run_id, resumed = open_run(tracking, experiment=tp.experiment, run_key=f"{resolved.storage}/{resolved.run_name}",
                               run_name=resolved.run_name, params=resolved.config, tags=tags)
    return job.model_copy(update={"run_id": run_id}), resumed


def _fit(job: TrainJob, resolved: _Resolved, signals: _DriverSignals):
    from ray.train import TrainingFailedError

    spec = get_family(job.family)
    start = time.perf_counter()
    queue = channel()
    try:
        with follow(queue, Progress(f"train {job.family}", spec.params(job.params).num_steps),
                    train_display(spec.curve_keys, spec.metric)):
            trainer = make_trainer(job, name=resolved.run_name, storage=resolved.storage, trainer_class=_trainer_class(signals),
                                   progress=queue)
            result = trainer.fit()
    except TrainingFailedError as err:
        if signals.received:
            raise  # aborted by a signal: `train` reports the signal, not the abort
        raise TrainError(f"train {job.family}: run {resolved.run_name!r} failed: {worker_error(err)}"
                         f"{_out_of_space_hint(err, resolved.storage, resolved.run_name)}") from None
    finally:
        signals.abort = None
    if signals.received:  # an abort can also end fit() without an error
        raise KeyboardInterrupt
    stopped = tracking_stop_error(result.metrics or {}, job)
    if stopped:
        raise TrainError(f"train {job.family}: run {resolved.run_name!r} stopped: {stopped}")
    return result, time.perf_counter() - start


def make_trainer(job: TrainJob, *, name: str, storage: str, trainer_class=None, callbacks: list | tuple = (),
                 start_from: StartFrom | None = None, tune_gate=None, progress=None, verbose: bool | None = None):
    """The Ray Train run of `job`, named `name` under `storage` (the same name resumes from its latest
    checkpoint); `genmodels train` and every Tune trial build theirs here. A trial also passes the
    checkpoint it starts from and the queue that holds rank 0 after each report until Tune has
    taken it (`genmodels.tune.trial`); `genmodels train` the queue its progress display reads
    (`genmodels.progress`). Ray Train's own INFO lines show only when `verbose` (default:
    GENMODELS_VERBOSE)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    tp = job.params
    os.environ.update(ray_train_timeouts(tp))  # read by fit(), which hands them to Train's controller and workers
    verbose = progress_verbose() if verbose is None else verbose
    callbacks = [*callbacks, _worker_failures(progress, f"train {job.family}")]
    resources = {"CPU": tp.cpus_per_worker, **({"GPU": 1} if tp.use_gpu else {})}
    return (trainer_class or _trainer_without_ray_data())(
        train_loop_per_worker,
        train_loop_config={"job": job, "start_from": start_from, "tune_gate": tune_gate, "progress": progress,
                           "verbose": verbose},
        torch_config=TorchConfig(timeout_s=math.ceil(tp.collective_timeout_s)),
        scaling_config=ScalingConfig(num_workers=tp.num_workers, use_gpu=tp.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=tp.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tp.num_checkpoints_kept), callbacks=list(callbacks),
                             logging_config=train_logging(verbose)),
    )


def ray_train_timeouts(tp: TrainParams) -> dict[str, str]:
    """Ray Train's timeouts, from `train.*_timeout_s`: Train reads them from the environment of the
    process that calls fit(), and passes them on to its controller and workers."""
    return {"RAY_TRAIN_COLLECTIVE_TIMEOUT_S": str(tp.collective_timeout_s),
            "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": str(tp.worker_health_timeout_s),
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(tp.worker_start_timeout_s)}


def _worker_failures(progress, title: str):
    """A Train callback (it runs in Train's controller) that says which rank failed and why: Train
    logs a failure it retries (`train.max_failures`) at INFO only, which is not shown when quiet.
    To the progress display when there is one, else to the controller's stderr, which Ray streams
    to the driver."""
    from ray.train import UserCallback

    class WorkerFailures(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank, err in sorted(worker_exceptions.items()):
                text = f"{title}: rank {rank} failed: {repr(err)[:2000]}"
                if progress is None:
                    print(text, file=sys.stderr, flush=True)
                else:
                    send(progress, {"say": text})

    return WorkerFailures()


def worker_error(err: Exception) -> str:
    """The first worker's own exception from a TrainingFailedError, else the error itself."""
    failures = getattr(err, "worker_failures", None) or {}
    first = next(iter(failures.values()), None)
    return repr(first) if first is not None else str(err)


def _out_of_space_hint(err: Exception, storage: str, run_name: str) -> str:
    """Where checkpoints go and what is free there, when a worker or the controller ran out of
    disk space: Ray's error (pyarrow's "Error writing bytes to file") names neither the file nor
    the filesystem. The controller writes its record of the checkpoints in place, so a full disk
    at that moment can leave it cut short, and the rerun would fail to read it: say so, and how out."""
    by_controller = out_of_space(getattr(err, "controller_failure", None))
    workers = (getattr(err, "worker_failures", None) or {}).values()
    if not (by_controller or any(out_of_space(e) for e in workers)):
        return ""
    where = storage if "://" in storage else f"{storage} ({free_space(Path(storage))})"
    hint = (f"\nout of disk space; checkpoints go to train.storage_path {where}. The complete checkpoints there "
            "are kept and a partial one is never resumed from: free space, keep fewer (train.num_checkpoints_kept) "
            "or move train.storage_path, then rerun with the same run name to resume")
    if by_controller:
        hint += (f". Ray Train's record of those checkpoints, {storage}/{run_name}/checkpoint_manager_snapshot.json, "
                 "was being written when the disk filled: if the rerun cannot load it, delete it (the run then "
                 "starts again from step 0) or choose another train.run_name")
    return hint


def _export(spec: Family, result, resolved: _Resolved, job: TrainJob, models_dir: Path) -> int:
    """models/<family>/{weights.pt, mlflow.json, config.json} from the final checkpoint, after
    checking that every rank agreed. Files, not a directory swap: the register stage owns
    models/<family>/registered.json beside them (DVC outputs may not overlap). config.json goes
    last and names the weights' sha256, so an export cut short between two files is refused on load."""
    with result.checkpoint.as_directory() as directory:
        bundle = read_exported(Path(directory))
    weights = {name: bundle["objects"][source] for name, source in spec.exported.items()}
    target = models_dir / spec.name
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    write_bytes(target / "weights.pt", buffer.getvalue())
    mlflow = {"tracking_uri": job.tracking_uri, "run_id": job.run_id, "experiment": job.params.experiment}
    write_text(target / "mlflow.json", json.dumps(mlflow, indent=2) + "\n")
    config = {**resolved.config, "run_name": resolved.run_name, "storage": resolved.storage,
              "image_size": job.image_size, "channels": job.channels, "weights_sha256": file_sha256(target / "weights.pt")}
    write_text(target / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return bundle["step"]


def _write_metrics(spec: Family, result, job: TrainJob, *, step: int, wall_s: float, resumed: bool, metrics_dir: Path) -> dict:
    """metrics/train_<family>.json (the last reported numbers) and the loss curves as CSV."""
    from genmodels.tracking import metric_history

    final = {k.removeprefix("train/"): v for k, v in (result.metrics or {}).items()}
    summary = {"family": spec.name, "step": step, "world_size": job.params.num_workers, "wall_s": round(wall_s, 2),
               "resumed": resumed, "mlflow_run_id": job.run_id, **final}
    write_text(metrics_dir / f"train_{spec.name}.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", *[k.removeprefix("train/") for k in spec.curve_keys]])
    writer.writeheader()
    for row in metric_history(job.tracking_uri, job.run_id, list(spec.curve_keys), outage_s=job.params.tracking_outage_s):
        writer.writerow({k.removeprefix("train/"): v for k, v in row.items()})
    write_text(metrics_dir / f"train_{spec.name}_curve.csv", buffer.getvalue())
    return summary


class _DriverSignals:
    """SIGINT and SIGTERM on the driver while training, as a context: each is recorded in
    `received`, aborts the Ray Train run when one is going (`abort`), and raises
    KeyboardInterrupt in the main thread unless `deferred`. SIGTERM's default action would end
    Python without running a single `finally` (the MLflow run would stay RUNNING, a local Ray
    would be orphaned); KeyboardInterrupt, not an exception of our own, because that is what
    Ray's blocking `ray.get` lets through from a signal handler. The previous handlers come back
    on exit."""

    def __init__(self):
        self.received: list[int] = []
        self.deferred = False
        self.abort: Callable[[], object] | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        if self.abort is not None:
            with contextlib.suppress(Exception):  # the controller may be gone already
                self.abort()
        if not self.deferred:
            raise KeyboardInterrupt

    def __enter__(self) -> _DriverSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, action in self._previous.items():
            signal.signal(signum, action)


def _trainer_without_ray_data():
    """TorchTrainer less its Ray Data callback. genmodels reads its WebDataset shards in the
    workers and passes Train no `datasets`, yet Train V2 starts a DatasetManager actor for every
    worker group regardless: a process (about 2 CPU-seconds) that serves nothing. Ray is pinned to
    2.60, whose `_create_default_callbacks` this overrides; test_train checks no DatasetManager starts."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer


def _trainer_class(signals: _DriverSignals):
    class Trainer(_trainer_without_ray_data()):
        def _register_sigint_handler(self, controller):
            """Train V2 would install its own SIGINT handler here for the duration of `fit()`
            (data_parallel_trainer.py): it aborts the run, then calls sys.exit(0), which cannot
            be told from a clean end, and stays installed afterwards. Keep ours, and give it
            the same graceful abort, for SIGTERM too."""
            signals.abort = lambda: ray.get(controller.abort.remote())

    return Trainer
