"""The training driver: resolve config, data, MLflow run and Ray resources, fit, export.

    from genmodels.train.run import train
    summary = train(params, "gan", shards="data/shards", models_dir="models", metrics_dir="metrics")

Outputs: `models/<family>/` (weights.pt: final weights as torch state dicts, EMA generator for
GANs; config.json: the resolved config; mlflow.json: the run to attach evaluation/registry to),
`metrics/train_<family>.json` and `metrics/train_<family>_curve.csv` (DVC metrics and plots).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import torch

from genmodels.cluster import ensure_ray, preflight
from genmodels.config import Params
from genmodels.data.shards import load_manifest, manifest_sha256
from genmodels.files import replace_dir, staging_dir, write_text
from genmodels.train.checkpoint import read_exported
from genmodels.train.loop import TrainJob, code_digest, train_loop_per_worker

CURVES = {"gan": ["train/loss_d", "train/loss_g", "train/d_real", "train/d_fake"], "vae": ["train/loss", "train/elbo", "train/kl", "train/recon_nll"]}
EXPORTED = {"gan": {"generator": "ema", "discriminator": "discriminator"}, "vae": {"vae": "ema"}}


class TrainError(RuntimeError):
    """Training failed; the message carries the worker's own error, not Ray's wrapping."""


def _periodic_eval_inputs(params: Params, family: str, manifest, featurizer_dir: Path) -> dict:
    """Featurizer and reference statistics for the periodic GAN FID, computed once here (cached)."""
    if family != "gan" or not params.train.eval_every_steps:
        return {}
    from genmodels.metrics.evaluate import reference
    from genmodels.metrics.features import load_extractor

    try:
        extractor = load_extractor("domain", featurizer_dir=featurizer_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; or set train.eval_every_steps: 0 to train without periodic FID") from None
    stats, _, digest = reference(extractor, manifest, params.evaluate)
    path = Path(params.evaluate.cache_dir).resolve() / f"train-reference-{digest[:24]}.pt"
    if not path.exists():
        stats.save(path)
    return {"featurizer_dir": str(featurizer_dir.resolve()), "eval_reference": str(path)}


def _storage_uri(storage_path: str, project_dir: Path) -> str:
    if "://" in storage_path:
        return storage_path
    return str((project_dir / storage_path).resolve())  # Ray needs absolute paths; workers chdir elsewhere


def train(params: Params, family: str, *, shards: str | Path = "data/shards", models_dir: str | Path = "models",
          metrics_dir: str | Path = "metrics", project_dir: str | Path = ".", featurizer_dir: str | Path = "models/featurizer") -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from genmodels.tracking import finish_run, git_tags, metric_history, open_run, resolve_tracking, runtime_tags

    project_dir = Path(project_dir).resolve()
    tp = params.train
    shards = str(shards) if "://" in str(shards) else str(Path(shards).resolve())
    manifest = load_manifest(shards)
    manifest_sha = manifest_sha256(manifest)
    tracking = resolve_tracking(project_dir)
    draft = TrainJob(family=family, params=tp, shards=shards, manifest_sha256=manifest_sha, image_size=manifest.image_size,
                     channels=manifest.channels, code_sha256=code_digest(), tracking_uri=tracking.uri, run_id="-", fault=os.environ.get("GENMODELS_FAULT", ""))
    run_name = tp.run_name or draft.default_run_name()
    storage = _storage_uri(tp.storage_path, project_dir)

    eval_inputs = _periodic_eval_inputs(params, family, manifest, Path(featurizer_dir))  # fails before Ray starts
    ensure_ray()
    preflight(num_workers=tp.num_workers, cpus_per_worker=tp.cpus_per_worker, use_gpu=tp.use_gpu)
    tags = {**git_tags(project_dir), **runtime_tags(), "data.manifest_sha256": manifest_sha, "data.source": manifest.source,
            "ray.world_size": str(tp.num_workers), "ray.run_name": run_name, "genmodels.family": family}
    resolved = {"family": family, "train": tp.model_dump(exclude={"gan", "vae"}), family: draft.family_params.model_dump(),
                "data": {"shards": shards, "manifest_sha256": manifest_sha, "image_size": manifest.image_size,
                         "channels": manifest.channels, "num_train": manifest.split("train").num_samples}}
    run_id, resumed = open_run(tracking, experiment=tp.experiment, run_key=f"{storage}/{run_name}", run_name=run_name,
                               params=resolved, tags=tags)
    job = draft.model_copy(update={"run_id": run_id, **eval_inputs})
    resources = {"CPU": tp.cpus_per_worker, **({"GPU": 1} if tp.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=tp.num_workers, use_gpu=tp.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage, failure_config=FailureConfig(max_failures=tp.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tp.num_checkpoints_kept)),
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        finish_run(tracking.uri, run_id, "FAILED")
        failures = getattr(err, "worker_failures", None) or {}
        first = next(iter(failures.values()), None)
        raise TrainError(f"train {family}: run {run_name!r} failed: {first!r}" if first else f"train {family}: {err}") from None
    wall_s = time.perf_counter() - start

    with result.checkpoint.as_directory() as directory:
        bundle = read_exported(Path(directory))
    objects = bundle["objects"]
    weights = {name: objects[source] for name, source in EXPORTED[family].items()}
    target = Path(models_dir) / family
    tmp = staging_dir(target)
    torch.save(weights, tmp / "weights.pt")
    config = {**resolved, "run_name": run_name, "storage": storage, "image_size": manifest.image_size, "channels": manifest.channels}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "mlflow.json").write_text(json.dumps({"tracking_uri": tracking.uri, "run_id": run_id, "experiment": tp.experiment}, indent=2) + "\n")
    replace_dir(tmp, target)

    final = {k.removeprefix("train/"): v for k, v in (result.metrics or {}).items()}
    summary = {"family": family, "step": bundle["step"], "world_size": tp.num_workers, "wall_s": round(wall_s, 2),
               "resumed": resumed, "mlflow_run_id": run_id, **final}
    write_text(Path(metrics_dir) / f"train_{family}.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    rows = metric_history(tracking.uri, run_id, CURVES[family])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", *[k.removeprefix("train/") for k in CURVES[family]]])
    writer.writeheader()
    for row in rows:
        writer.writerow({k.removeprefix("train/"): v for k, v in row.items()})
    write_text(Path(metrics_dir) / f"train_{family}_curve.csv", buffer.getvalue())
    finish_run(tracking.uri, run_id, "FINISHED")
    return summary
