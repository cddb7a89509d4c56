"""The `featurizer` stage: train the domain classifier on the shards, publish it with its accuracy.

    from genmodels.stages.featurizer import train_featurizer
    summary = train_featurizer(params.featurizer, "data/shards", "models/featurizer", "metrics/featurizer.json")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genmodels.config import FeaturizerParams
from genmodels.data.loader import ShardLoader
from genmodels.data.shards import SPLITS, Manifest, iter_samples, load_manifest, read_shard
from genmodels.files import file_sha256, replace_dir, staging_dir, write_text
from genmodels.metrics.features import train_domain_classifier
from genmodels.progress import Progress


def train_featurizer(params: FeaturizerParams, shards: str | Path, out_dir: str | Path, metrics_path: str | Path) -> dict:
    manifest = load_manifest(shards)
    if not manifest.classes:
        raise ValueError(f"{manifest.location}: source {manifest.source!r} has no class labels (no sub-directories), "
                         "so no domain classifier can be trained; use evaluate.extractor: inception")
    unlabelled = _num_unlabelled(manifest)
    if unlabelled:  # label -1 would crash the cross-entropy with an index error
        raise ValueError(f"{manifest.location}: {unlabelled} image(s) have no class label (files at the top level of "
                         f"{manifest.source!r}), so the domain classifier cannot be trained on them; move them into a "
                         "class sub-directory, or use evaluate.extractor: inception")
    num_val = manifest.split("val").num_samples
    if num_val == 0:
        raise ValueError(f"{manifest.location}: the val split is empty; set prepare.val_fraction > 0 to measure the featurizer")
    train = ShardLoader(manifest, "train", batch_size_per_worker=params.batch_size, seed=params.seed)
    val = ShardLoader(manifest, "val", batch_size_per_worker=num_val, shuffle=False)
    with Progress("featurizer", params.num_epochs, unit="epoch") as progress:
        progress.update(0, start=True)
        model, accuracy = train_domain_classifier(train, val, channels=manifest.channels, num_classes=len(manifest.classes),
                                                  num_epochs=params.num_epochs, lr=params.lr, seed=params.seed,
                                                  width=params.width, feature_dim=params.feature_dim, on_epoch=progress.update)
    if accuracy < params.min_val_accuracy:
        raise RuntimeError(f"featurizer: val accuracy {accuracy:.4f} < featurizer.min_val_accuracy {params.min_val_accuracy}; "
                           "train longer (featurizer.num_epochs) or lower the bar")
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    torch.save(model.state_dict(), tmp / "weights.pt")
    config = {"channels": manifest.channels, "num_classes": len(manifest.classes), "classes": manifest.classes,
              "image_size": manifest.image_size, "width": params.width, "feature_dim": params.feature_dim,
              "val_accuracy": accuracy, "num_val": num_val}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    summary = {"val_accuracy": accuracy, "num_val": num_val, "weights_sha256": file_sha256(tmp / "weights.pt")}
    replace_dir(tmp, out_dir)
    write_text(Path(metrics_path), json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _num_unlabelled(manifest: Manifest) -> int:
    """Samples with label -1, counted from the shards' label members (no image is decoded)."""
    return sum(label < 0 for split in SPLITS for shard in manifest.split(split).shards
               for _, _, label in iter_samples(read_shard(manifest, shard), shard.name))
