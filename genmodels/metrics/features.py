"""Feature extractors for FID/KID/PRDC: the pipeline's own domain classifier (offline default)
and Inception-v3 from torch-fidelity (standard FID; optional extra, weights from a file).

    extractor = load_extractor("domain", featurizer_dir="models/featurizer")
    features = extract_features(extractor, images)          # images float [-1, 1], [N, C, H, W]

Every extractor has a `name`, a `weights_sha256` and a `resize_rule`: they enter each metric's
protocol signature, so numbers from different feature spaces are never compared.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class DomainClassifier(nn.Module):
    """A small CNN trained on the pipeline's own shards; its penultimate layer is the feature
    space of the offline FID (as in the "domain-specific FID" practice for MNIST-like data,
    where ImageNet Inception features are a poor fit and unavailable offline)."""

    def __init__(self, *, channels: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            # A 4x4 map, not global pooling: digits are told apart by where strokes are.
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(16 * 4 * width, feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@dataclass(frozen=True)
class Extractor:
    name: str
    weights_sha256: str
    resize_rule: str
    dim: int
    features: Callable[[torch.Tensor], torch.Tensor]
    """images float [-1, 1] [N, C, H, W] -> [N, dim]"""
    probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None
    """images -> class probabilities [N, K], for an Inception-Score-style score; None if absent."""


def load_extractor(kind: str, *, featurizer_dir: str | Path = "models/featurizer", inception_weights: str = "",
                   device: torch.device | str = "cpu") -> Extractor:
    if kind == "domain":
        return _domain_extractor(Path(featurizer_dir), torch.device(device))
    if kind == "inception":
        return _inception_extractor(inception_weights, torch.device(device))
    raise ValueError(f'evaluate.extractor: expected "domain" or "inception", got {kind!r}')


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to the 256 grey levels that real images (8-bit PNG shards) have,
    so generated and real images reach the feature extractor in the same form."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def featurizer_files(directory: str | Path) -> dict[str, bytes]:
    """The domain classifier as bytes ({"weights.pt", "config.json"}): what a Ray worker gets in
    its job instead of a path, which on a cluster would name the driver's disk."""
    directory = Path(directory)
    weights, config_path = directory / "weights.pt", directory / "config.json"
    if not weights.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no trained domain classifier (weights.pt, config.json); run `dvc repro featurizer` "
                                "or `genmodels featurizer` first")
    return {"weights.pt": weights.read_bytes(), "config.json": config_path.read_bytes()}


def _domain_extractor(directory: Path, device: torch.device) -> Extractor:
    return domain_extractor(featurizer_files(directory), device)


def domain_extractor(files: dict[str, bytes], device: torch.device | str = "cpu") -> Extractor:
    """The domain classifier's feature space, from `featurizer_files` (no file is opened)."""
    config = json.loads(files["config.json"])
    model = DomainClassifier(channels=config["channels"], num_classes=config["num_classes"], width=config["width"],
                             feature_dim=config["feature_dim"])
    model.load_state_dict(torch.load(io.BytesIO(files["weights.pt"]), map_location="cpu", weights_only=True))
    model.to(device).eval()

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return model.features(quantize_8bit(images.to(device))).double().cpu()

    @torch.no_grad()
    def probabilities(images: torch.Tensor) -> torch.Tensor:
        return F.softmax(model(quantize_8bit(images.to(device))).double(), dim=1).cpu()

    return Extractor(name=f"domain-cnn-{config['image_size']}px", weights_sha256=hashlib.sha256(files["weights.pt"]).hexdigest(),
                     resize_rule="none (native image size)", dim=config["feature_dim"], features=features,
                     probabilities=probabilities)


def _inception_extractor(weights: str, device: torch.device) -> Extractor:
    """torch-fidelity's Inception-v3 (the TF-FID port). Nothing is downloaded: the weights come
    from `evaluate.inception_weights` or the torch hub cache."""
    candidates = [Path(weights)] if weights else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"standard FID needs the Inception-v3 weights file {INCEPTION_WEIGHTS_FILE}; none at "
            f"{', '.join(str(p) for p in candidates)}. Copy it there (or set evaluate.inception_weights to its path); "
            "it is never downloaded at run time"
        )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError(
            f"standard FID needs the optional extra: pip install 'genmodels[inception]' (torch-fidelity, which imports "
            f"torchvision: install the torchvision build that matches your torch) ({err})"
        ) from None
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).to(device).eval()

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if u8.shape[1] == 1:
            u8 = u8.repeat(1, 3, 1, 1)
        return model(u8.to(device))[0].double().cpu()

    return Extractor(name="inception-v3-compat", weights_sha256=_file_sha256(path),
                     resize_rule="grey->RGB, bilinear to 299 (TF1-compatible, inside torch-fidelity)", dim=2048, features=features)


def extract_features(extractor: Extractor, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([extractor.features(chunk) for chunk in images.split(batch_size)])


def train_domain_classifier(train_loader, val_loader, *, channels: int, num_classes: int, num_epochs: int, lr: float,
                            seed: int, width: int = 32, feature_dim: int = 128,
                            on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> tuple[DomainClassifier, float]:
    """Plain single-process training (a few seconds per epoch on mnist5k); returns (model, val
    accuracy). `on_epoch(epochs_done, {"loss": train loss, "val_acc": accuracy})` after each epoch."""
    torch.manual_seed(seed)
    model = DomainClassifier(channels=channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=num_epochs * len(train_loader))
    accuracy = 0.0
    for epoch in range(num_epochs):
        model.train()
        train_loader.set_epoch(epoch)
        losses = []
        for images, labels in train_loader:
            # Random shifts of up to 2 px (per group of 8 images): 4.5k digits overfit without them.
            images = torch.cat([torch.roll(group, shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))
                                for group in images.split(8)])
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
        accuracy = _accuracy(model, val_loader)  # draws no random numbers: the next epoch's shifts are unchanged
        if on_epoch is not None:
            on_epoch(epoch + 1, {"loss": torch.stack(losses).mean().item(), "val_acc": accuracy})
    return model, accuracy


@torch.no_grad()
def _accuracy(model: DomainClassifier, val_loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in val_loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / total
