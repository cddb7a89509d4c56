"""The `evaluate` stage: FID (+ bootstrap spread), KID, precision/recall/density/coverage and an
Inception-Score-style score for GANs; ELBO and IWAE (nats per image) plus FID of samples and of
reconstructions for VAEs. Every record carries its protocol signature.

    from genmodels.metrics.evaluate import evaluate
    record = evaluate(params, "gan", models_dir="models", shards="data/shards",
                      featurizer_dir="models/featurizer", metrics_dir="metrics")

Reference statistics are cached under `evaluate.cache_dir`, keyed by everything that defines
them (extractor + weights, data manifest, split, sample cap).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from genmodels.config import EvaluateParams, Params
from genmodels.data.loader import read_split
from genmodels.data.shards import Manifest, load_manifest, manifest_sha256
from genmodels.data.transforms import image_grid
from genmodels.files import write_text
from genmodels.metrics.features import Extractor, extract_features, load_extractor
from genmodels.metrics.fid import FeatureStats, bootstrap_fid, fid_from_stats
from genmodels.metrics.kid import kernel_inception_distance
from genmodels.metrics.likelihood import binarize, elbo_per_image, iwae_bound
from genmodels.metrics.prdc import prdc
from genmodels.models import build_gan, build_vae

SIGNATURE_KEYS = ("extractor", "extractor_sha256", "reference_sha256", "num_real", "num_generated", "image_size", "resize_rule")


class SignatureMismatch(ValueError):
    """Two metric records were computed under different protocols and must not be compared."""


def check_comparable(a: dict, b: dict) -> None:
    """Raise unless records `a` and `b` (each with a "signature") were measured the same way."""
    differing = [k for k in SIGNATURE_KEYS if a["signature"].get(k) != b["signature"].get(k)]
    if differing:
        detail = "; ".join(f"{k}: {a['signature'].get(k)!r} vs {b['signature'].get(k)!r}" for k in differing)
        raise SignatureMismatch(f"metrics measured under different protocols cannot be compared ({detail})")


def reference(extractor: Extractor, manifest: Manifest, params: EvaluateParams) -> tuple[FeatureStats, torch.Tensor, str]:
    """(stats, features for KID/PRDC, sha256 of the stats) of the reference split, from the cache when present."""
    key = hashlib.sha256(json.dumps([extractor.name, extractor.weights_sha256, manifest_sha256(manifest), params.reference_split,
                                     params.reference_max_samples]).encode()).hexdigest()[:24]
    path = Path(params.cache_dir) / f"reference-{key}.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        stats, features = FeatureStats.from_dict(cached["stats"]), cached["features"]
    else:
        features = torch.cat([extractor.features(images) for images, _ in
                              read_split(manifest, params.reference_split, limit=params.reference_max_samples, batch_size=500)])
        stats = FeatureStats.from_features(features)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"stats": stats.to_dict(), "features": features}, tmp)
        tmp.replace(path)
    digest = hashlib.sha256(stats.sum.numpy().tobytes() + stats.sum_outer.numpy().tobytes()).hexdigest()
    return stats, features, digest


def image_metrics(extractor: Extractor, images: torch.Tensor, ref_stats: FeatureStats, ref_features: torch.Tensor,
                  params: EvaluateParams, prefix: str) -> dict[str, float]:
    features = extract_features(extractor, images)
    fid = fid_from_stats(ref_stats, FeatureStats.from_features(features))
    _, fid_std = bootstrap_fid(features, ref_stats, num_resamples=params.bootstrap_resamples, seed=params.seed)
    out = {f"{prefix}fid": fid, f"{prefix}fid_bootstrap_std": fid_std}
    kid, kid_std = kernel_inception_distance(ref_features, features, num_subsets=params.kid_num_subsets,
                                             subset_size=params.kid_subset_size, seed=params.seed)
    out.update({f"{prefix}kid": kid, f"{prefix}kid_std": kid_std})
    out.update({f"{prefix}{k}": v for k, v in prdc(ref_features, features, k=params.prdc_k).items()})
    if extractor.probabilities is not None:
        out[f"{prefix}classifier_score"] = classifier_score(torch.cat([extractor.probabilities(c) for c in images.split(500)]))
    return out


def classifier_score(probabilities: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))): the Inception Score formula (Salimans et al. 2016) in the
    domain classifier's label space; 1 = one class or uniform guesses, max = number of classes."""
    p_y = probabilities.mean(0, keepdim=True)
    kl = (probabilities * (probabilities.clamp_min(1e-12).log() - p_y.clamp_min(1e-12).log())).sum(1)
    return float(kl.mean().exp())


@torch.no_grad()
def generate(family: str, model, num_samples: int, latent_dim: int, seed: int, batch_size: int = 500) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num_samples, batch_size):
        z = torch.randn(min(batch_size, num_samples - start), latent_dim, generator=generator)
        chunks.append(model(z) if family == "gan" else model.to_image(model.decode(z)))
    return torch.cat(chunks).clamp(-1, 1)


def load_model(family: str, model_dir: Path):
    config = json.loads((model_dir / "config.json").read_text())
    weights = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=True)
    spec = config[family]
    if family == "gan":
        model, _ = build_gan(spec["preset"], image_size=config["image_size"], channels=config["channels"], latent_dim=spec["latent_dim"],
                             width=spec["width"], spectral_norm=spec["spectral_norm"], d_norm=spec["d_norm"])
        model.load_state_dict(weights["generator"])
    else:
        model = build_vae(spec["preset"], image_size=config["image_size"], channels=config["channels"], latent_dim=spec["latent_dim"],
                          width=spec["width"], likelihood=spec["likelihood"])
        model.load_state_dict(weights["vae"])
    return model.eval(), config


def evaluate(params: Params, family: str, *, models_dir: str | Path = "models", shards: str | Path = "data/shards",
             featurizer_dir: str | Path = "models/featurizer", metrics_dir: str | Path = "metrics") -> dict:
    ep = params.evaluate
    model_dir = Path(models_dir) / family
    model, config = load_model(family, model_dir)
    manifest = load_manifest(shards)
    extractor = load_extractor(ep.extractor, featurizer_dir=featurizer_dir, inception_weights=ep.inception_weights)
    ref_stats, ref_features, ref_sha = reference(extractor, manifest, ep)
    samples = generate(family, model, ep.num_samples, config[family]["latent_dim"], ep.seed)
    metrics = image_metrics(extractor, samples, ref_stats, ref_features, ep, prefix="")
    if family == "vae":
        val = torch.cat([images for images, _ in read_split(manifest, "val", batch_size=500)])
        with torch.no_grad():
            metrics.update(image_metrics(extractor, torch.cat([model.reconstruct(c) for c in val.split(500)]),
                                         ref_stats, ref_features, ep, prefix="recon_"))
            metrics.update(likelihoods(model, val, ep))
    featurizer_config = Path(featurizer_dir) / "config.json"
    if ep.extractor == "domain" and featurizer_config.is_file():
        metrics["featurizer_val_accuracy"] = json.loads(featurizer_config.read_text())["val_accuracy"]
    signature = {"extractor": extractor.name, "extractor_sha256": extractor.weights_sha256, "reference_sha256": ref_sha,
                 "reference_split": ep.reference_split, "num_real": int(ref_stats.num_samples), "num_generated": ep.num_samples,
                 "image_size": manifest.image_size, "resize_rule": extractor.resize_rule}
    record = {"family": family, **metrics, "signature": signature}
    write_text(Path(metrics_dir) / f"eval_{family}.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    _log_to_training_run(model_dir, metrics, signature, samples[:64])
    return record


def likelihoods(model, images: torch.Tensor, params: EvaluateParams) -> dict[str, float]:
    """Val ELBO and IWAE in nats per image. Bernoulli decoders are scored on stochastically
    binarised images (pixel = 1 with probability of its grey level, fixed seed), the standard
    rule that makes the Bernoulli likelihood a proper density; Gaussian decoders on the images."""
    generator = torch.Generator().manual_seed(params.seed)
    if model.likelihood == "bernoulli":
        images = binarize(images, generator)
    elbo, iwae = [], []
    with torch.no_grad():
        for chunk in images.split(100):
            elbo.append(elbo_per_image(model, chunk, generator))
            iwae.append(iwae_bound(model, chunk, num_samples=params.iwae_num_samples, generator=generator))
    return {"elbo": float(torch.cat(elbo).mean()), "iwae": float(torch.cat(iwae).mean()),
            "iwae_num_samples": params.iwae_num_samples, "num_val": len(images)}


def _log_to_training_run(model_dir: Path, metrics: dict, signature: dict, samples: torch.Tensor) -> None:
    """Same numbers, the signature and a final sample grid, on the MLflow run that trained the model."""
    from genmodels.tracking import RunLogger, last_logged_step

    run = json.loads((model_dir / "mlflow.json").read_text())
    step = last_logged_step(run["tracking_uri"], run["run_id"], "train/epoch")
    logger = RunLogger(run["tracking_uri"], run["run_id"], resume_after_step=-1)  # step may be 0: never drop
    # "evaluate/", not "eval/": the periodic in-training FID already owns eval/fid at the last step.
    logger.log_metrics({f"evaluate/{k}": float(v) for k, v in metrics.items()}, step)
    logger.set_tags({f"eval.signature.{k}": str(v) for k, v in signature.items()})
    logger.log_image("eval_samples", image_grid(samples), step)
