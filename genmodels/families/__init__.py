"""The family registry: every model family the pipeline trains, by name.

    family = get_family("gan")
    task = family.build_task(params.train, image_size=28, channels=1, device=device, world_size=2, precision=Precision())
    exported = load_exported("models/gan")     # the generator, rebuilt from its typed config

A third family is one new file here (its `Family` subclass with task, generator, metric and
mode; see gan.py and vae.py) plus one line below, and its params section in `config.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from genmodels.families.base import Family
from genmodels.files import file_sha256
from genmodels.families.gan import GAN
from genmodels.families.vae import VAE

FAMILIES: dict[str, Family] = {family.name: family for family in (GAN, VAE)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


@dataclass(frozen=True)
class Exported:
    family: Family
    model: nn.Module
    """The generator, in eval mode."""
    params: BaseModel
    """Its typed family params (`train.<family>` as trained)."""
    config: dict
    """config.json as written by the train stage."""
    weights_path: Path


def load_exported(model_dir: str | Path) -> Exported:
    """A trained model directory (`models/<family>/`), rebuilt by the family's own builder from
    its typed params."""
    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / "config.json", model_dir / "weights.pt"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no trained model (config.json, weights.pt); run `genmodels train` first")
    config = json.loads(config_path.read_text())
    expected = config.get("weights_sha256")
    if expected is not None and file_sha256(weights_path) != expected:
        raise ValueError(f"{weights_path} is not the file {config_path} names (sha256 {expected[:12]}...): an export "
                         f"cut short, or a file replaced by hand; train again")
    family = get_family(config["family"])
    params = family.params(_train_params(config, family))
    model = family.build_generator(params, image_size=config["image_size"], channels=config["channels"])
    weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(weights[family.generator_key])
    return Exported(family=family, model=model.eval(), params=params, config=config, weights_path=weights_path)


def _train_params(config: dict, family: Family):
    from genmodels.config import parse_params

    return parse_params({"train": {family.name: config[family.name]}}, source=f"config.json of {family.name}").train
