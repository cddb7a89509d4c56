"""The `evaluate` stage: sample metrics of the trained generator (FID + bootstrap spread, KID,
precision/recall/density/coverage, classifier score) plus the family's own numbers (VAE: ELBO
and IWAE in nats per image, and the sample metrics of reconstructions), each record with its
protocol signature; the same numbers go to the MLflow run that trained the model.

    from genmodels.stages.evaluate import evaluate
    record = evaluate(params, "gan", models_dir="models", shards="data/shards",
                      featurizer_dir="models/featurizer", metrics_dir="metrics")
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch

from genmodels.config import Params
from genmodels.data.shards import load_manifest
from genmodels.data.transforms import image_grid
from genmodels.families import Family, load_exported
from genmodels.files import write_text
from genmodels.metrics.features import load_extractor
from genmodels.metrics.protocol import image_metrics, protocol_signature, reference_stats
from genmodels.progress import Progress
from genmodels.report import write_report

GENERATE_BATCH_SIZE = 500


@torch.no_grad()
def generate(family: Family, model, num_samples: int, latent_dim: int, seed: int) -> torch.Tensor:
    """`num_samples` images in [-1, 1] from z ~ N(0, I) drawn with a private generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num_samples, GENERATE_BATCH_SIZE):
        z = torch.randn(min(GENERATE_BATCH_SIZE, num_samples - start), latent_dim, generator=generator)
        chunks.append(family.generate(model, z))
    return torch.cat(chunks)


def evaluate(params: Params, family: str, *, models_dir: str | Path = "models", shards: str | Path = "data/shards",
             featurizer_dir: str | Path = "models/featurizer", metrics_dir: str | Path = "metrics") -> dict:
    ep = params.evaluate
    model_dir = Path(models_dir) / family
    exported = load_exported(model_dir)
    spec, model = exported.family, exported.model
    manifest = load_manifest(shards)
    with Progress(f"evaluate {family}", 4, unit="part", eta=False) as progress:
        progress.update(0, start=True)
        extractor = load_extractor(ep.extractor, featurizer_dir=featurizer_dir, inception_weights=ep.inception_weights)
        reference = reference_stats(extractor, manifest, ep)
        progress.update(1, note=f"reference features of {ep.reference_split}")
        samples = generate(spec, model, ep.num_samples, spec.latent_dim(exported.params), ep.seed)
        progress.update(2, note=f"{ep.num_samples} samples")
        metrics = image_metrics(extractor, samples, reference, ep)
        progress.update(3, {"fid": metrics["fid"]}, note="sample metrics")
        metrics.update(spec.offline_metrics(model, manifest, ep,
                                            lambda images, prefix: image_metrics(extractor, images, reference, ep, prefix)))
        progress.update(4, {k: metrics[k] for k in ("elbo", "iwae") if k in metrics}, note=f"{family} metrics")
    featurizer_config = Path(featurizer_dir) / "config.json"
    if ep.extractor == "domain" and featurizer_config.is_file():
        metrics["featurizer_val_accuracy"] = json.loads(featurizer_config.read_text())["val_accuracy"]
    signature = protocol_signature(extractor, reference, ep, num_generated=ep.num_samples, image_size=manifest.image_size,
                                   iwae_num_samples=metrics.get("iwae_num_samples"),
                                   recon_num_generated=metrics.get("num_val") if "recon_fid" in metrics else None)
    # The weights measured: the register stage refuses a record of other weights.
    record = {"family": family, **metrics, "signature": signature, "weights_sha256": exported.config.get("weights_sha256")}
    write_text(Path(metrics_dir) / f"eval_{family}.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    logger = _log_to_training_run(model_dir, metrics, signature, samples[:64])
    with tempfile.TemporaryDirectory(prefix="genmodels-report-") as tmp:  # the page of every family trained so far
        try:
            write_report(params, Path(tmp) / "report.html", models_dir=models_dir, shards=shards, metrics_dir=metrics_dir)
        except Exception as err:  # noqa: BLE001 - the page is a view: another family's broken export must not fail this stage
            warnings.warn(f"evaluate {family}: report.html not logged: {err}", stacklevel=1)
        else:
            logger.log_artifact(Path(tmp) / "report.html")
    return record


def _log_to_training_run(model_dir: Path, metrics: dict, signature: dict, samples: torch.Tensor):
    """Same numbers, the signature and a final sample grid, on the MLflow run that trained the model;
    returns its logger."""
    from genmodels.tracking import RunLogger, last_logged_step

    run = json.loads((model_dir / "mlflow.json").read_text())
    step = last_logged_step(run["tracking_uri"], run["run_id"], "train/epoch")
    logger = RunLogger(run["tracking_uri"], run["run_id"], resume_after_step=-1)  # step may be 0: never drop
    # "evaluate/", not "eval/": the periodic in-training FID already owns eval/fid at the last step.
    logger.log_metrics({f"evaluate/{k}": float(v) for k, v in metrics.items()}, step)
    logger.set_tags({f"eval.signature.{k}": str(v) for k, v in signature.items()})
    logger.log_image("eval_samples", image_grid(samples), step)
    return logger
