"""What a model family is to the rest of the pipeline: one `Family` object (as torchtitan's train
specs), looked up by name in `genmodels.families.FAMILIES`. The loop, the driver, the stages and
the CLI ask it, never "GAN or VAE?".
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel
from torch import nn

from genmodels.config import EvaluateParams, TrainParams
from genmodels.data.shards import Manifest
from genmodels.train.ddp import Precision

NUM_GRID_SAMPLES = 64


class Task(Protocol):
    """One family's training state and step, as the Ray Train loop drives it."""

    device: torch.device

    def state(self) -> dict[str, object]:
        """Everything a resume needs, by name (one bundle: see `train/checkpoint.py`); the EMA model is "ema"."""

    def train_step(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on this rank's batch; scalar tensors to average and log."""

    def refresh_ema(self) -> None:
        """Give the EMA model statistics that fit its own weights (every rank, same step)."""

    def sample_grid_images(self) -> dict[str, torch.Tensor]:
        """Named image batches in [-1, 1] for the MLflow sample grids (rank 0)."""


class PeriodicEval(Protocol):
    """Evaluation during training, spread over the ranks (every rank calls it at the same step)."""

    def __call__(self, step: int) -> dict[str, float]: ...


class Family:
    """A model family: how it is built, trained, exported, sampled and judged."""

    name: ClassVar[str]
    metric: ClassVar[str]
    """The periodic-eval key that tuning and promotion optimise, as reported to Ray and MLflow."""
    mode: ClassVar[Literal["min", "max"]]
    curve_keys: ClassVar[tuple[str, ...]]
    """Training metrics that make up `metrics/train_<family>_curve.csv` (DVC plots)."""
    exported: ClassVar[dict[str, str]]
    """weights.pt key -> `Task.state()` key of what `models/<family>/weights.pt` holds."""
    generator_key: ClassVar[str]
    """The weights.pt key of the model that generates images (built by `build_generator`)."""
    gate_metric: ClassVar[str]
    """The evaluate-stage key (metrics/eval_<family>.json) that promotion gates on."""
    gate_mode: ClassVar[Literal["min", "max"]]
    truncation: ClassVar[bool] = False
    """Whether generation takes a truncation threshold (latent draws resampled beyond it)."""

    def params(self, train: TrainParams) -> BaseModel:
        """This family's typed section of `train` (`train.<name>`)."""
        return getattr(train, self.name)

    def generator_spec(self, params: BaseModel, *, image_size: int, channels: int) -> dict:
        """{"builder": a `genmodels.models.GENERATORS` name, "kwargs": its keyword arguments}: how
        the generator is rebuilt, here and inside the registered MLflow model."""
        raise NotImplementedError

    def build_generator(self, params: BaseModel, *, image_size: int, channels: int) -> nn.Module:
        from genmodels.models import build_generator

        spec = self.generator_spec(params, image_size=image_size, channels=channels)
        return build_generator(spec["builder"], **spec["kwargs"])

    def build_task(self, train: TrainParams, *, image_size: int, channels: int, device: torch.device, world_size: int,
                   precision: Precision) -> Task:
        raise NotImplementedError

    def generate(self, model: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """Latent noise [N, latent_dim] -> images [N, C, H, W] in [-1, 1]."""
        return model.generate(z)

    def latent_dim(self, params: BaseModel) -> int:
        return params.latent_dim

    def needs_featurizer(self, train: TrainParams) -> bool:
        """Whether periodic evaluation needs the domain featurizer and reference statistics."""
        return False

    def attach_data(self, job, task: Task, *, rank: int) -> None:
        """Every rank, once, before training: give the task the data it needs besides the training
        batches (e.g. images for the EMA's statistics, val images for the grids on rank 0)."""

    def periodic_eval(self, job, task: Task, *, rank: int, world_size: int) -> PeriodicEval:
        raise NotImplementedError

    def offline_metrics(self, model: nn.Module, manifest: Manifest, params: EvaluateParams,
                        image_metrics: Callable[[torch.Tensor, str], dict]) -> dict:
        """Family-specific numbers of the evaluate stage beyond the sample metrics, on the shards of
        `manifest` (`image_metrics(images, prefix)` scores any image batch in the stage's feature space)."""
        return {}
