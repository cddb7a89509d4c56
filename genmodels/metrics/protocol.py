"""The evaluation protocol: reference statistics, the sample metrics of a batch of images, and the
signature that says when two metric records may be compared.

    reference = reference_stats(extractor, manifest, params.evaluate)       # cached on disk
    metrics = image_metrics(extractor, images, reference, params.evaluate, prefix="")
    signature = protocol_signature(extractor, reference, params.evaluate, num_generated=5000, ...)
    check_comparable(record_a, record_b)                                   # raises SignatureMismatch

Reference statistics are cached under `evaluate.cache_dir`, keyed by everything that defines
them (extractor + weights, data manifest, split, sample cap).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from genmodels.config import EvaluateParams
from genmodels.data.loader import read_split
from genmodels.data.shards import Manifest, manifest_sha256
from genmodels.metrics.features import Extractor, extract_features
from genmodels.metrics.fid import FeatureStats, bootstrap_fid, fid_from_stats, save_atomic
from genmodels.metrics.kid import kernel_inception_distance
from genmodels.metrics.prdc import equal_size, prdc

# What must be equal for two records to be comparable (every key of the signature).
SIGNATURE_KEYS = ("extractor", "extractor_sha256", "reference_sha256", "reference_split", "num_real", "num_generated",
                  "image_size", "resize_rule", "prdc_k", "prdc_num_samples", "kid_subset_size", "kid_num_subsets",
                  "bootstrap_resamples", "iwae_num_samples", "recon_num_generated", "seed")


class SignatureMismatch(ValueError):
    """Two metric records were computed under different protocols and must not be compared."""


@dataclass(frozen=True)
class Reference:
    stats: FeatureStats
    features: torch.Tensor
    """The reference features themselves, for KID and PRDC."""
    sha256: str


def reference_stats(extractor: Extractor, manifest: Manifest, params: EvaluateParams) -> Reference:
    """Features and statistics of the reference split, from the cache when present."""
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
        save_atomic({"stats": stats.to_dict(), "features": features}, path)
    digest = hashlib.sha256(stats.sum.numpy().tobytes() + stats.sum_outer.numpy().tobytes()).hexdigest()
    return Reference(stats=stats, features=features, sha256=digest)


def image_metrics(extractor: Extractor, images: torch.Tensor, reference: Reference, params: EvaluateParams,
                  prefix: str = "") -> dict[str, float]:
    """FID (+ bootstrap std), KID (+ std), precision/recall/density/coverage and, where the
    extractor classifies, the classifier score of `images` ([-1, 1]) against the reference."""
    features = extract_features(extractor, images)
    fid = fid_from_stats(reference.stats, FeatureStats.from_features(features))
    _, fid_std = bootstrap_fid(features, reference.stats, num_resamples=params.bootstrap_resamples, seed=params.seed)
    out = {f"{prefix}fid": fid, f"{prefix}fid_bootstrap_std": fid_std}
    kid, kid_std = kernel_inception_distance(reference.features, features, num_subsets=params.kid_num_subsets,
                                             subset_size=params.kid_subset_size, seed=params.seed)
    out.update({f"{prefix}kid": kid, f"{prefix}kid_std": kid_std})
    # k-NN radii depend on the sample size: PRDC compares equal numbers of real and generated points.
    real, fake = equal_size(reference.features, features, seed=params.seed)
    out.update({f"{prefix}{k}": v for k, v in prdc(real, fake, k=params.prdc_k).items()})
    if extractor.probabilities is not None:
        out[f"{prefix}classifier_score"] = classifier_score(torch.cat([extractor.probabilities(c) for c in images.split(500)]))
    return out


def classifier_score(probabilities: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))): the Inception Score formula (Salimans et al. 2016) in the
    domain classifier's label space; 1 = one class or uniform guesses, max = number of classes."""
    p_y = probabilities.mean(0, keepdim=True)
    kl = (probabilities * (probabilities.clamp_min(1e-12).log() - p_y.clamp_min(1e-12).log())).sum(1)
    return float(kl.mean().exp())


def protocol_signature(extractor: Extractor, reference: Reference, params: EvaluateParams, *, num_generated: int,
                       image_size: int, iwae_num_samples: int | None = None, recon_num_generated: int | None = None) -> dict:
    """Everything that defines how the numbers of one record were measured."""
    num_real = int(reference.stats.num_samples)
    return {"extractor": extractor.name, "extractor_sha256": extractor.weights_sha256, "reference_sha256": reference.sha256,
            "reference_split": params.reference_split, "num_real": num_real, "num_generated": num_generated,
            "image_size": image_size, "resize_rule": extractor.resize_rule, "prdc_k": params.prdc_k,
            "prdc_num_samples": min(num_real, num_generated), "kid_subset_size": params.kid_subset_size,
            "kid_num_subsets": params.kid_num_subsets, "bootstrap_resamples": params.bootstrap_resamples,
            "iwae_num_samples": iwae_num_samples, "recon_num_generated": recon_num_generated, "seed": params.seed}


def signature_sha256(signature: dict) -> str:
    """The protocol's identity: two records compare when their signatures' digests are equal."""
    return hashlib.sha256(json.dumps({k: signature.get(k) for k in SIGNATURE_KEYS}, sort_keys=True).encode()).hexdigest()


def check_comparable(a: dict, b: dict) -> None:
    """Raise unless records `a` and `b` (each with a "signature") were measured the same way."""
    differing = [k for k in SIGNATURE_KEYS if a["signature"].get(k) != b["signature"].get(k)]
    if differing:
        detail = "; ".join(f"{k}: {a['signature'].get(k)!r} vs {b['signature'].get(k)!r}" for k in differing)
        raise SignatureMismatch(f"metrics measured under different protocols cannot be compared ({detail})")
