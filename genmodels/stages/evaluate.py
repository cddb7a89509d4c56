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

import numpy as np
import torch

from genmodels.config import Params
from genmodels.data.shards import load_manifest
from genmodels.data.transforms import image_grid
from genmodels.families import Family, load_exported
from genmodels.files import write_text
from genmodels.metrics.coverage import class_coverage, memorisation
from genmodels.metrics.features import extract_features, load_extractor
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
    with Progress(f"evaluate {family}", 5, unit="part", eta=False) as progress:
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
        checks, pictures = _sample_checks(extractor, samples, reference, manifest, ep, featurizer_dir=Path(featurizer_dir))
        class_share = checks.pop("class_share", None)  # 2 x classes numbers: MLflow's, not a DVC metric each
        metrics.update(checks)
        progress.update(5, {k: checks[k] for k in ("classes_under_half_share", "memorised_fraction") if k in checks},
                        note="class coverage, memorisation")
    featurizer_config = Path(featurizer_dir) / "config.json"
    if ep.extractor == "domain" and featurizer_config.is_file():
        metrics["featurizer_val_accuracy"] = json.loads(featurizer_config.read_text())["val_accuracy"]
    signature = protocol_signature(extractor, reference, ep, num_generated=ep.num_samples, image_size=manifest.image_size,
                                   iwae_num_samples=metrics.get("iwae_num_samples"),
                                   recon_num_generated=metrics.get("num_val") if "recon_fid" in metrics else None)
    # The weights measured: the register stage refuses a record of other weights.
    record = {"family": family, **metrics, "signature": signature, "weights_sha256": exported.config.get("weights_sha256")}
    write_text(Path(metrics_dir) / f"eval_{family}.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    logger = _log_to_training_run(model_dir, metrics, signature, {"eval_samples": image_grid(samples[:64]), **pictures})
    with tempfile.TemporaryDirectory(prefix="genmodels-report-") as tmp:  # the page of every family trained so far
        if class_share is not None:
            write_text(Path(tmp) / "eval_class_share.json", json.dumps(class_share, indent=2) + "\n")
            logger.log_artifact(Path(tmp) / "eval_class_share.json")
        try:
            write_report(params, Path(tmp) / "report.html", models_dir=models_dir, shards=shards, metrics_dir=metrics_dir)
        except Exception as err:  # noqa: BLE001 - the page is a view: another family's broken export must not fail this stage
            warnings.warn(f"evaluate {family}: report.html not logged: {err}", stacklevel=1)
        else:
            logger.log_artifact(Path(tmp) / "report.html")
    return record


def _sample_checks(extractor, samples: torch.Tensor, reference, manifest, ep, *, featurizer_dir: Path) -> tuple[dict, dict]:
    """Class coverage and the memorisation check of the samples (`genmodels.metrics.coverage`), as
    numbers for the record, and the pictures that show them: samples beside real images, and the
    closest (sample, training image) pairs. Copies are searched among the training images of the
    reference set (the first `evaluate.reference_max_samples`; `memorisation_num_train` says how
    many). Classes come from the domain classifier, also when FID uses Inception features."""
    from genmodels.data.loader import read_images, read_split

    batches = list(read_split(manifest, "train", limit=ep.reference_max_samples, batch_size=500))
    train = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    val = read_images(manifest, "val", limit=ep.reference_max_samples)
    numbers, pictures = {}, {"eval_samples_vs_real": _side_by_side(image_grid(samples[:32]), image_grid(train[:32]))}
    classifier = extractor
    if classifier.probabilities is None and (featurizer_dir / "config.json").is_file():
        classifier = load_extractor("domain", featurizer_dir=featurizer_dir)
    if classifier.probabilities is None or not manifest.classes or not bool((labels >= 0).any()):
        warnings.warn("evaluate: no class coverage: it needs the domain classifier (models/featurizer) and labelled "
                      "images", stacklevel=1)
    else:
        classes = torch.cat([classifier.probabilities(chunk).argmax(1) for chunk in samples.split(500)])
        coverage = class_coverage(classes, labels[labels >= 0], len(manifest.classes))
        numbers.update({k: coverage[k] for k in ("classes_under_half_share", "class_share_tv")})
        numbers["class_share"] = {"samples": dict(zip(manifest.classes, coverage["sample_class_share"])),
                                  "real": dict(zip(manifest.classes, coverage["real_class_share"]))}
    if not len(val):
        warnings.warn("evaluate: no memorisation check: it needs a val split (prepare.val_fraction > 0)", stacklevel=1)
    else:
        # The reference features are the train split's, in this order, when it is the reference.
        train_features = reference.features if ep.reference_split == "train" else extract_features(extractor, train)
        memo = memorisation(extract_features(extractor, samples), train_features, extract_features(extractor, val))
        numbers.update({k: memo[k] for k in ("memorised_fraction", "memorisation_threshold")})
        numbers["memorisation_num_train"] = len(train_features)
        pairs = [(samples[i], train[j]) for i, j, _ in memo["closest_pairs"]]
        pictures["eval_closest_to_train"] = image_grid(torch.stack([a for a, _ in pairs] + [b for _, b in pairs]),
                                                       num_columns=len(pairs))  # samples above, their nearest below
    return numbers, pictures


def _side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    height = max(left.shape[0], right.shape[0])
    pad = [(0, height - left.shape[0]), (0, 0)] + [(0, 0)] * (left.ndim - 2)
    left = np.pad(left, pad)
    right = np.pad(right, [(0, height - right.shape[0]), (0, 0)] + [(0, 0)] * (right.ndim - 2))
    spacer = np.full((height, gap, *left.shape[2:]), 255, dtype=left.dtype)
    return np.concatenate([left, spacer, right], axis=1)


def _log_to_training_run(model_dir: Path, metrics: dict, signature: dict, pictures: dict[str, np.ndarray]):
    """Same numbers, the signature and the pictures (a final sample grid, samples beside real
    images, the closest pairs), on the MLflow run that trained the model; returns its logger."""
    from genmodels.tracking import RunLogger, last_logged_step

    run = json.loads((model_dir / "mlflow.json").read_text())
    step = last_logged_step(run["tracking_uri"], run["run_id"], "train/epoch")
    logger = RunLogger(run["tracking_uri"], run["run_id"], resume_after_step=-1)  # step may be 0: never drop
    # "evaluate/", not "eval/": the periodic in-training FID already owns eval/fid at the last step.
    logger.log_metrics({f"evaluate/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step)
    logger.set_tags({f"eval.signature.{k}": str(v) for k, v in signature.items()})
    for key, picture in pictures.items():
        logger.log_image(key, picture, step)
    return logger
