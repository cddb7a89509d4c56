"""The Ray Train worker function: same code on 1 CPU worker here and N GPU workers on a cluster.

The loop knows a family only through its task object (`GANTask`, `VAETask`): `train_step`,
`state`, `sample_grid_images`. Every rank calls `ray.train.report` at the same steps (it is a
barrier); only rank 0 talks to MLflow.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Literal

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from genmodels.config import TrainParams
from genmodels.data.loader import ShardLoader
from genmodels.data.transforms import image_grid
from genmodels.train.checkpoint import bundle_dir, load_bundle
from genmodels.train.gan import GANTask
from genmodels.train.vae import VAETask

TASKS = {"gan": GANTask, "vae": VAETask}
PROGRESS_METRIC = "train/epoch"  # logged at every log step: its last step tells a restart what MLflow already has
# Keys that change how a run is operated, not what it computes: a resumed run may change them
# (num_steps included: raising it extends a finished run from its last checkpoint).
OPERATIONAL_KEYS = {"num_steps", "max_failures", "num_checkpoints_kept", "log_every_steps", "sample_every_steps",
                    "checkpoint_every_steps", "storage_path", "run_name", "experiment", "loader_workers",
                    "eval_every_steps", "eval_num_samples"}


class TrainJob(BaseModel):
    """Everything a worker needs, built once by the driver and handed to Ray as is."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    family: Literal["gan", "vae"]
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
    featurizer_dir: str = ""
    eval_reference: str = ""
    """FeatureStats file of the reference split in the featurizer's space (periodic GAN FID)."""
    fault: str = ""
    """Chaos hook for tests, `raise|kill:RANK:STEP:MARKER_FILE` (from GENMODELS_FAULT): the first
    time RANK reaches STEP it raises or SIGKILLs itself; the marker makes it one-shot."""

    @property
    def family_params(self):
        return getattr(self.params, self.family)

    def identity(self) -> dict:
        """What must match for a checkpoint to be resumed: data, family, and the params it uses."""
        common = self.params.model_dump(exclude=OPERATIONAL_KEYS | {"gan", "vae"})
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
    params, family = job.params, job.family_params
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(params.threads_per_worker)
    device = ray.train.torch.get_device()
    if params.amp != "none" and device.type != "cuda" and rank == 0:
        warnings.warn(f"train.amp={params.amp!r} is ignored on {device.type}: mixed precision runs on CUDA only", stacklevel=1)

    torch.manual_seed(params.seed)  # identical initial weights on every rank
    task = TASKS[job.family](params, image_size=job.image_size, channels=job.channels, device=device, world_size=world_size)
    torch.manual_seed(params.seed * 100_003 + rank + 1)  # then one noise stream per rank
    loader = ShardLoader(job.shards, "train", rank=rank, world_size=world_size, batch_size_per_worker=params.batch_size_per_worker,
                         num_workers=params.loader_workers, seed=params.seed)
    step = 0
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            step = load_bundle(Path(directory), task.state(), rank=rank, config=job.identity())["step"]
    logger = _rank_zero_logger(job, task) if rank == 0 else None
    evaluator = PeriodicEval(job, task, rank=rank, world_size=world_size) if params.eval_every_steps else None

    steps_per_epoch, batch = len(loader), params.batch_size_per_worker
    sums, count, window_start, window_step = None, 0, time.perf_counter(), step
    reported: dict[str, float] = {}
    while step < family.num_steps:
        epoch, consumed = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        for images, _ in itertools.islice(loader, consumed, None):
            metrics = task.train_step(images.to(device, non_blocking=True), step)
            step += 1
            values = torch.stack([v.float() for v in metrics.values()])
            sums, count = (values if sums is None else sums + values), count + 1
            _maybe_fault(job.fault, rank, step)
            if step % params.log_every_steps == 0 or step == family.num_steps:
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
            if logger and (step % params.sample_every_steps == 0 or step == family.num_steps):
                for key, images_out in task.sample_grid_images().items():
                    logger.log_image(key, image_grid(images_out), step)
            done = step == family.num_steps
            if evaluator and (step % params.eval_every_steps == 0 or done):
                evaluated = evaluator(step)
                reported.update(evaluated)
                if logger:
                    logger.log_metrics(evaluated, step)
            if step % params.checkpoint_every_steps == 0 or done:
                with bundle_dir(task.state(), rank=rank, step=step, epoch=epoch, config=job.identity(), run_id=job.run_id) as d:
                    ray.train.report({"step": step, **reported}, checkpoint=ray.train.Checkpoint.from_directory(d),
                                     checkpoint_dir_name=f"step_{step:08d}")
            elif evaluator and step % params.eval_every_steps == 0:
                ray.train.report({"step": step, **reported})  # Tune sees every evaluation, checkpoint or not
            if step >= family.num_steps:
                break
    return {"step": step}


class PeriodicEval:
    """Evaluation during training, spread over the DDP ranks: each rank generates (GAN) or scores
    (VAE) its share, and sums are all-reduced, so N ranks do 1/N of the work each."""

    def __init__(self, job: TrainJob, task, *, rank: int, world_size: int):
        self.job, self.task, self.rank, self.world_size = job, task, rank, world_size
        params = job.params
        if job.family == "gan":
            from genmodels.metrics.features import load_extractor
            from genmodels.metrics.fid import FeatureStats

            self.extractor = load_extractor("domain", featurizer_dir=job.featurizer_dir, device=task.device)
            self.reference = FeatureStats.load(job.eval_reference)
            self.num_local = params.eval_num_samples // world_size + (rank < params.eval_num_samples % world_size)
        else:
            from genmodels.data.loader import read_split
            from genmodels.metrics.likelihood import binarize

            images = torch.cat([x for x, _ in read_split(job.shards, "val")])[rank::world_size]
            if job.params.vae.likelihood == "bernoulli":  # the evaluate stage's rule: dynamic binarisation, fixed seed
                images = binarize(images, torch.Generator().manual_seed(params.seed))
            self.val_images = images.to(task.device)

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        generator = torch.Generator(device=self.task.device).manual_seed(self.job.params.seed * 1_000_003 + self.rank)
        if self.job.family == "gan":
            from genmodels.metrics.fid import FeatureStats, fid_from_stats

            stats = FeatureStats.zeros(self.reference.dim, device=self.task.device)
            for start in range(0, self.num_local, 500):
                z = torch.randn(min(500, self.num_local - start), self.job.params.gan.latent_dim, generator=generator,
                                device=self.task.device)
                stats.update(self.extractor.features(self.task.ema(z).clamp(-1, 1)).to(self.task.device))
            stats.all_reduce_()
            return {"eval/fid": fid_from_stats(self.reference, stats.to("cpu")), "eval/num_generated": float(stats.num_samples)}
        from genmodels.metrics.likelihood import elbo_per_image

        elbo = torch.cat([elbo_per_image(self.task.ema, chunk, generator) for chunk in self.val_images.split(250)])
        totals = torch.stack([elbo.sum().double(), torch.tensor(float(len(elbo)), dtype=torch.float64, device=elbo.device)])
        if self.world_size > 1:
            dist.all_reduce(totals)
        return {"eval/elbo": float(totals[0] / totals[1]), "eval/num_val": float(totals[1])}


def _rank_zero_logger(job: TrainJob, task):
    from genmodels.tracking import RunLogger, last_logged_step

    if job.family == "vae":  # a fixed batch of val images for the reconstruction grid
        val = ShardLoader(job.shards, "val", batch_size_per_worker=32, shuffle=False, cache=False)
        task.recon_batch = next(iter(val))[0].to(task.device)
    return RunLogger(job.tracking_uri, job.run_id, resume_after_step=last_logged_step(job.tracking_uri, job.run_id, PROGRESS_METRIC))


def _maybe_fault(spec: str, rank: int, step: int) -> None:
    if not spec:
        return
    action, fault_rank, fault_step, marker = spec.split(":", 3)
    if rank != int(fault_rank) or step != int(fault_step) or os.path.exists(marker):
        return
    Path(marker).write_text(f"{action} at step {step}\n")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"GENMODELS_FAULT: injected failure on rank {rank} at step {step}")
