"""The Ray Train worker function: same code on 1 CPU worker here and N GPU workers on a cluster.

The loop knows a family only through its spec (`genmodels.families`) and the task it builds:
`train_step`, `state`, `refresh_ema`, `sample_grid_images`. Every rank calls `ray.train.report`
at the same steps (it is a barrier); only rank 0 talks to MLflow.

Exact resume: everything that may draw from the global RNG (building the task, the periodic
evaluator's featurizer, the rank-0 logger) is built before the per-rank noise seed is set and
before a checkpoint restores the RNG, so a resumed run draws exactly the noise an uninterrupted
one would.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import uuid
import warnings
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, field_validator

from genmodels.config import TrainParams
from genmodels.data.loader import ShardLoader
from genmodels.data.transforms import image_grid
from genmodels.families import FAMILIES, get_family
from genmodels.progress import quiet_train_worker, send
from genmodels.train.chaos import Chaos
from genmodels.train.checkpoint import StartFrom, bundle_dir, load_latest, weights_digest
from genmodels.train.ddp import Precision

TUNE_GATE_KEY = "genmodels/gate"  # a Tune trial's report token (genmodels.tune.trial takes it out before Tune sees the result)
OUTAGE_KEY, UNSENT_KEY = "tracking/unreachable_s", "tracking/unsent_points"  # reported to Ray when training stops for MLflow
PROGRESS_METRIC = "train/epoch"  # logged at every log step: its last step tells a restart what MLflow already has
# Keys that change how a run is operated, not what it computes: a resumed run may change them
# (num_steps included: raising it extends a finished run from its last checkpoint).
OPERATIONAL_KEYS = {"num_steps", "max_failures", "num_checkpoints_kept", "log_every_steps", "sample_every_steps",
                    "checkpoint_every_steps", "storage_path", "run_name", "experiment", "loader_workers",
                    "eval_every_steps", "eval_num_samples", "cpus_per_worker", "threads_per_worker",
                    "collective_timeout_s", "worker_health_timeout_s", "worker_start_timeout_s", "tracking_outage_s"}


class TrainJob(BaseModel):
    """Everything a worker needs, built once by the driver and handed to Ray as is."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    family: str
    params: TrainParams
    shards: str
    manifest_sha256: str
    image_size: int
    channels: int
    code_sha256: str = ""
    """Digest of the genmodels sources: part of the default run name, so a code change trains
    afresh instead of "resuming" a finished run; not part of `identity`, so an explicit
    `train.run_name` can still resume across a bug fix."""
    tracking_uri: str
    run_id: str
    featurizer: dict[str, bytes] = Field(default_factory=dict, repr=False)
    """The domain classifier's files (`metrics.features.featurizer_files`), for the periodic GAN
    FID: they travel with the job (Ray's object store), never as a path on the driver's disk."""
    eval_reference: bytes = Field(default=b"", repr=False)
    """FeatureStats of the reference split in the featurizer's space (`FeatureStats.to_bytes`)."""
    chaos: Chaos | None = None
    """Fault injection (`genmodels.train.chaos`), None unless GENMODELS_CHAOS is set."""

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str) -> str:
        get_family(name)
        return name

    @property
    def family_params(self):
        return get_family(self.family).params(self.params)

    def identity(self) -> dict:
        """What must match for a checkpoint to be resumed: data, family, and the params it uses."""
        common = self.params.model_dump(exclude=OPERATIONAL_KEYS | set(FAMILIES))
        family = self.family_params.model_dump(exclude=OPERATIONAL_KEYS)
        return {"family": self.family, "data": self.manifest_sha256, "train": common, self.family: family}

    def default_run_name(self) -> str:
        digest = hashlib.sha256(json.dumps([self.identity(), self.code_sha256], sort_keys=True).encode()).hexdigest()
        return f"{self.family}-{digest[:10]}"


def code_digest() -> str:
    """sha256 over every .py file of the installed genmodels package (path + content)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def train_loop_per_worker(config: dict) -> dict:
    job: TrainJob = config["job"]
    if not config.get("verbose"):
        quiet_train_worker()
    params, family = job.params, get_family(job.family)
    num_steps = family.params(params).num_steps
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(params.threads_per_worker)
    device = ray.train.torch.get_device()
    if params.amp != "none" and device.type != "cuda" and rank == 0:
        warnings.warn(f"train.amp={params.amp!r} is ignored on {device.type}: mixed precision runs on CUDA only", stacklevel=1)

    torch.manual_seed(params.seed)  # identical initial weights on every rank
    task = family.build_task(params, image_size=job.image_size, channels=job.channels, device=device, world_size=world_size,
                             precision=Precision.for_run(params.amp, device))
    family.attach_data(job, task, rank=rank)
    evaluator = family.periodic_eval(job, task, rank=rank, world_size=world_size) if params.eval_every_steps else None
    logger = _rank_zero_logger(job) if rank == 0 else None
    torch.manual_seed(params.seed * 100_003 + rank + 1)  # then one noise stream per rank
    loader = ShardLoader(job.shards, "train", rank=rank, world_size=world_size, batch_size_per_worker=params.batch_size_per_worker,
                         num_workers=params.loader_workers, seed=params.seed)
    start_from: StartFrom | None = config.get("start_from")
    gate = config.get("tune_gate")
    progress = config.get("progress") if rank == 0 else None  # `genmodels.progress.channel` to the driver

    attempt, reports = uuid.uuid4().hex, itertools.count()

    def report(metrics: dict, **kwargs) -> None:
        """`ray.train.report`; in a Tune trial rank 0 then waits until Tune has taken this very result
        (it may stop or pause the trial there; the other ranks wait in DDP's all-reduce). Tokens
        tell it from the acknowledgement of a report made before a worker-group restart."""
        token = f"{attempt}:{next(reports)}"
        ray.train.report({**metrics, TUNE_GATE_KEY: token} if gate is not None else metrics, **kwargs)
        while gate is not None and rank == 0 and gate.get(block=True) != token:
            pass

    own = ray.train.get_checkpoint()  # this run's own latest: a restart or a rerun of the same name
    if own is None and start_from is not None:
        restored = start_from.load(task.state(), rank=rank, config=job.identity())
        if logger:
            logger.set_tags({f"genmodels.start.{restored['step']}.from": start_from.label,
                             f"genmodels.start.{restored['step']}.weights_sha256": weights_digest(task.state())})
    else:
        restored = load_latest(own, task.state(), rank=rank, config=job.identity())
        if logger and own is not None:  # a restart after a failure, or a rerun of the same name
            logger.set_tags({f"genmodels.resumed_from.{restored['step']}": own.path})
            logger.resend(restored["unsent_metrics"])  # what an outage kept from MLflow, before any newer point
    step = restored["step"]
    if progress is not None:
        send(progress, {"step": step, "start": True})
    if step >= num_steps and restored["metrics"]:
        # a finished run rerun (a sweep restored after it ended) reports its result again, once MLflow has every point
        report({**restored["metrics"], **_tracking_stop(logger, final=True, world_size=world_size, device=device)})

    steps_per_epoch, batch = len(loader), params.batch_size_per_worker
    sums, count, window_start, window_step = None, 0, time.perf_counter(), step
    reported: dict[str, float] = {}
    while step < num_steps:
        epoch, consumed = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        for images, _ in itertools.islice(loader, consumed, None):
            metrics = task.train_step(images.to(device, non_blocking=True), step)
            step += 1
            values = torch.stack([v.float() for v in metrics.values()])
            sums, count = (values if sums is None else sums + values), count + 1
            if job.chaos:
                job.chaos.at_step(rank, step)
            done = step == num_steps
            logged = step % params.log_every_steps == 0 or done
            if logged:
                means = sums / count
                if world_size > 1:
                    dist.all_reduce(means)  # every rank's batches, not rank 0's alone
                    means /= world_size
                elapsed = time.perf_counter() - window_start
                reported = {f"train/{k}": v for k, v in zip(metrics, means.tolist())}
                reported["train/img_per_s"] = world_size * batch * (step - window_step) / elapsed
                reported[PROGRESS_METRIC] = step / steps_per_epoch
                if logger:
                    logger.log_metrics(reported, step)
                sums, count, window_start, window_step = None, 0, time.perf_counter(), step
            sample = step % params.sample_every_steps == 0 or done
            evaluate = evaluator is not None and (step % params.eval_every_steps == 0 or done)
            checkpoint = step % params.checkpoint_every_steps == 0 or done
            if sample or evaluate or checkpoint:
                task.refresh_ema()  # every rank: the EMA's statistics are part of the checkpoint digest
            if logger and sample:
                for key, images_out in task.sample_grid_images().items():
                    logger.log_image(key, image_grid(images_out), step)
            if evaluate:
                evaluated = evaluator(step)
                reported.update(evaluated)
                if logger:
                    logger.log_metrics(evaluated, step)
            if progress is not None and (logged or evaluate):
                send(progress, {"step": step, **reported})
            if checkpoint:
                metrics = {"step": step, **reported}
                stop = _tracking_stop(logger, final=done, world_size=world_size, device=device)
                with bundle_dir(task.state(), rank=rank, step=step, epoch=epoch, config=job.identity(), run_id=job.run_id,
                                metrics=metrics, unsent_metrics=logger.unsent if logger else ()) as d:
                    if job.chaos:
                        job.chaos.in_checkpoint(rank, step, d)
                    report({**metrics, **stop}, checkpoint=ray.train.Checkpoint.from_directory(d),
                           checkpoint_dir_name=f"step_{step:08d}")
                if stop:
                    return {"step": step}  # every rank: a clean end, which the driver turns into an error
            elif evaluate:
                report({"step": step, **reported})  # Tune sees every evaluation, checkpoint or not
            if step >= num_steps:
                break
    return {"step": step}


def _rank_zero_logger(job: TrainJob):
    from genmodels.tracking import RunLogger, last_logged_step

    # One try (under the tracking module's HTTP settings), no waiting: the other ranks would wait
    # meanwhile in their first collective. A worker group (re)started during an outage fails here.
    done = last_logged_step(job.tracking_uri, job.run_id, PROGRESS_METRIC, outage_s=0)
    return RunLogger(job.tracking_uri, job.run_id, resume_after_step=done, outage_s=job.params.tracking_outage_s)


def _tracking_stop(logger, *, final: bool, world_size: int, device: torch.device) -> dict[str, float]:
    """At a checkpoint step: {} to go on, or {OUTAGE_KEY, UNSENT_KEY} when the tracking server has
    been unreachable past `train.tracking_outage_s`, the same on every rank. Rank 0 decides (its
    logger tries to send what waits) and broadcasts. Every rank then ends cleanly after saving
    the checkpoint: a failure would make Ray restart the workers (`max_failures`) into the same
    outage. At the end of training rank 0 keeps trying, one probe interval per round, so that no
    rank waits in one collective for longer than that (`train.collective_timeout_s`)."""
    states = ("go", "wait", "stop")
    while True:
        verdict = torch.zeros(3, device=device)  # state, seconds unreachable, unsent points
        if logger is not None:
            state = logger.settle(final=final)
            verdict = torch.tensor([states.index(state), logger.down_s, len(logger.unsent)], device=device)
        if world_size > 1:
            dist.broadcast(verdict, src=0)
        if states[int(verdict[0])] != "wait":
            break
    if states[int(verdict[0])] == "go":
        return {}
    return {OUTAGE_KEY: float(verdict[1]), UNSENT_KEY: int(verdict[2])}


def tracking_stop_error(metrics: dict, job: TrainJob) -> str | None:
    """Why a run that returned cleanly stopped for the tracking server (`_tracking_stop`), from its
    last report; None when it did not."""
    if OUTAGE_KEY not in metrics:
        return None
    from genmodels.tracking import MAX_UNSENT_POINTS

    return (f"MLflow tracking server {job.tracking_uri} unreachable for {metrics[OUTAGE_KEY]:.0f} s with "
            f"{metrics[UNSENT_KEY]:,} metric points unsent (bounds: train.tracking_outage_s={job.params.tracking_outage_s:g} s, "
            f"{MAX_UNSENT_POINTS:,} points); the last checkpoint, at step {int(metrics['step'])}, is kept with those "
            "points: once the server is back, rerun with the same run name to resume from it and send them")
