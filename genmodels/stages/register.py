"""The `register` stage: the trained generator as an MLflow pyfunc model on its training run, a new
version of `genmodels-<family>` with its lineage and evaluation in tags, the alias `candidate`
on it, and `champion` too when the family has none yet.

    from genmodels.stages.register import register
    record = register(params, "gan", models_dir="models", metrics_dir="metrics")
    # models/gan/registered.json: {"name": "genmodels-gan", "version": "3", "uri": "models:/genmodels-gan/3", ...}

The model is logged from code (`genmodels/tracking/generator_model.py`) with the weights (a
state dict, read back with weights_only=True) and generator.json as artifacts, and a copy of
`genmodels/models` as `code_paths`, under a package name of its own
(`genmodels_models_<hash of its sources>`): MLflow only prepends code paths to sys.path, so a
copy named `genmodels` would be shadowed by an installed one, and two versions with different
network code load side by side.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import shutil
import tempfile
from pathlib import Path

import torch

from genmodels.config import Params
from genmodels.families import Family, load_exported
from genmodels.files import file_sha256, write_text
from genmodels.metrics.protocol import SIGNATURE_KEYS, signature_sha256

GENERATOR_CODE = Path(__file__).resolve().parents[1] / "tracking" / "generator_model.py"
MODELS_PACKAGE = Path(__file__).resolve().parents[1] / "models"
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow")
TAG_VALUE_MAX_CHARS = 5000  # SQL stores' limit on a model version tag value


class RegisterError(ValueError):
    """An input of the register stage is missing or does not belong to the trained model."""


def register(params: Params, family: str, *, models_dir: str | Path = "models", metrics_dir: str | Path = "metrics",
             project_dir: str | Path = ".", say=print) -> dict:
    import mlflow
    from mlflow import MlflowClient

    from genmodels.tracking import resolve_tracking
    from genmodels.tracking.registry import CANDIDATE, CHAMPION, aliases, move_alias, promotion_lock, who

    model_dir, project_dir = Path(models_dir) / family, Path(project_dir)
    exported = load_exported(model_dir)
    spec = exported.family
    if "weights_sha256" not in exported.config:
        raise RegisterError(f"{model_dir / 'config.json'} names no weights_sha256: the model predates it; train again")
    record = _eval_record(Path(metrics_dir) / f"eval_{family}.json", exported.config)
    run = json.loads((model_dir / "mlflow.json").read_text())
    current_store = resolve_tracking(project_dir).uri
    if run["tracking_uri"] != current_store:
        raise RegisterError(f"{model_dir / 'mlflow.json'}: the model was trained against tracking store {run['tracking_uri']}, "
                            f"not the current one ({current_store}); train again against this store "
                            f"(dvc repro -f -s train@{family}, then evaluate and register)")
    client = MlflowClient(run["tracking_uri"])
    training = _training_run(client, run, model_dir)
    name = params.registry.name(family)
    tags = version_tags(spec, exported, record, training.data.tags, project_dir)

    mlflow.set_tracking_uri(run["tracking_uri"])
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, code = _bundle(spec, exported, Path(tmp))
        # Model.log takes the run id: the finished training run is not reopened (its status and end time stay)
        info = mlflow.models.Model.log(
            None, name="generator", flavor=mlflow.pyfunc, flavor_name="pyfunc.ModelFromCode", run_id=run["run_id"],
            python_model=str(GENERATOR_CODE), artifacts=artifacts, code_paths=[str(code)],
            signature=_signature(spec, exported.config), input_example=_input_example(), pip_requirements=_pins(),
        )
    version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)
    client.update_model_version(name, version, description=_description(spec, exported, record))
    moved = None
    with promotion_lock(client, name, on_wait=say):
        current = aliases(client, name)
        if int(current.get(CANDIDATE, 0)) < int(version):  # a register that finished after a later one leaves it
            client.set_registered_model_alias(name, CANDIDATE, version)
        if CHAMPION not in current:
            moved = move_alias(client, name, CHAMPION, version, entry={
                "action": "first-champion", "from_version": None, "metric": spec.gate_metric,
                "to_metric": record.get(spec.gate_metric), "from_metric": None, **who(project_dir)})
    out = {"name": name, "version": str(version), "uri": f"models:/{name}/{version}", "model_uri": info.model_uri,
           "tracking_uri": run["tracking_uri"], "run_id": run["run_id"], "weights_sha256": exported.config["weights_sha256"],
           "aliases": sorted(alias for alias, v in aliases(client, name).items() if v == str(version))}
    write_text(model_dir / "registered.json", json.dumps(out, indent=2) + "\n")
    say(f"register {family}: {name} version {version} ({', '.join(out['aliases'])})"
        + ("; first champion of this registered model" if moved else ""))
    return out


def _eval_record(path: Path, config: dict) -> dict:
    if not path.is_file():
        raise RegisterError(f"{path}: no evaluation of this model; run `genmodels evaluate` first")
    record = json.loads(path.read_text())
    if record.get("weights_sha256") != config.get("weights_sha256"):
        raise RegisterError(f"{path} was measured on other weights (sha256 {str(record.get('weights_sha256'))[:12]}, the "
                            f"model's is {str(config.get('weights_sha256'))[:12]}); run `genmodels evaluate` again")
    return record


def _training_run(client, run: dict, model_dir: Path):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run["run_id"])
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegisterError(f"{model_dir / 'mlflow.json'}: training run {run['run_id']} is not in the tracking store "
                            f"{run['tracking_uri']} ({err.error_code}); train again against this store") from None


def version_tags(spec: Family, exported, record: dict, run_tags: dict, project_dir: Path) -> dict[str, str]:
    """Lineage, evaluation and protocol of a version: what promotion and a reader need."""
    config = exported.config
    signature = record["signature"]
    tags = {
        "family": spec.name, "gate.metric": spec.gate_metric, "gate.mode": spec.mode,
        "git.commit": run_tags.get("git.commit", "unknown"), "git.dirty": run_tags.get("git.dirty", "unknown"),
        "data.manifest_sha256": config["data"]["manifest_sha256"], "train.weights_sha256": config["weights_sha256"],
        "dvc.train_stage": _dvc_train_stage(project_dir, spec.name, exported),
        "config": json.dumps({k: v for k, v in config.items() if k not in ("data",)}, sort_keys=True),
        "eval.signature_sha256": signature_sha256(signature),
        **{f"eval.{k}": repr(float(v)) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        **{f"eval.signature.{k}": json.dumps(signature.get(k)) for k in SIGNATURE_KEYS},
    }
    if "featurizer_val_accuracy" in record:
        tags["featurizer.val_accuracy"] = repr(float(record["featurizer_val_accuracy"]))
    too_long = [k for k, v in tags.items() if len(v) > TAG_VALUE_MAX_CHARS]
    if too_long:
        raise RegisterError(f"model version tags {too_long} exceed {TAG_VALUE_MAX_CHARS} characters")
    return tags


def _dvc_train_stage(project_dir: Path, family: str, exported) -> str:
    """sha256 of dvc.lock's `train@<family>` entry (command, deps, params, outs) when its weights.pt
    is the one registered; "stale" when dvc.lock records other weights (trained outside `dvc
    repro`), "absent" without one."""
    import yaml

    lock = project_dir / "dvc.lock"
    entry = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(f"train@{family}") if lock.is_file() else None
    if not entry:
        return "absent"
    weights = next((o for o in entry.get("outs", []) if o.get("path", "").endswith("/weights.pt")), {})
    md5 = hashlib.md5(exported.weights_path.read_bytes()).hexdigest()
    if weights.get("md5") != md5:
        return "stale"
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def _bundle(spec: Family, exported, tmp: Path) -> tuple[dict[str, str], Path]:
    """(artifacts, code package directory) of the registered model."""
    sources = sorted(MODELS_PACKAGE.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources)).hexdigest()
    package = tmp / f"genmodels_models_{digest[:12]}"
    package.mkdir()
    for source in sources:
        shutil.copy2(source, package / source.name)
    buffer = io.BytesIO()
    torch.save(exported.model.state_dict(), buffer)
    (tmp / "weights.pt").write_bytes(buffer.getvalue())
    config = exported.config
    generator = {**spec.generator_spec(exported.params, image_size=config["image_size"], channels=config["channels"]),
                 "package": package.name, "family": spec.name, "latent_dim": spec.latent_dim(exported.params),
                 "truncation": spec.truncation, "image_size": config["image_size"], "channels": config["channels"],
                 "weights_sha256": file_sha256(tmp / "weights.pt")}
    (tmp / "generator.json").write_text(json.dumps(generator, indent=2, sort_keys=True) + "\n")
    return {"weights": str(tmp / "weights.pt"), "generator": str(tmp / "generator.json")}, package


def _signature(spec: Family, config: dict):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    # truncation is in every family's schema: MLflow would silently drop an undeclared column, and
    # a generator without truncation (spec.truncation False) should refuse it, not ignore it.
    columns = [ColSpec("long", "num_images"), ColSpec("long", "seed"), ColSpec("double", "truncation", required=False)]
    size, channels = config["image_size"], config["channels"]
    return ModelSignature(inputs=Schema(columns), outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, size, size, channels))]),
                          params=ParamSchema([ParamSpec("format", "string", "raw")]))


def _input_example():
    import pandas as pd

    return pd.DataFrame([{"num_images": 2, "seed": 0}, {"num_images": 1, "seed": 1}])


def _pins() -> list[str]:
    """Exact versions of what the model code imports; torch as the Makefile pins it (no local
    "+cpu" tag, which no index serves)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def _description(spec: Family, exported, record: dict) -> str:
    signature, value = record["signature"], record.get(spec.gate_metric)
    shown = f"{spec.gate_metric} {value:.4g}" if isinstance(value, (int, float)) else f"no {spec.gate_metric}"
    return (f"genmodels {spec.name} generator ({exported.params.preset} preset, latent {spec.latent_dim(exported.params)}) "
            f"trained on data {exported.config['data']['manifest_sha256'][:12]}; evaluate: {shown} "
            f"({'lower' if spec.mode == 'min' else 'higher'} is better) with {signature['extractor']} features, "
            f"{signature['num_generated']} generated vs {signature['num_real']} {signature['reference_split']} images, "
            f"protocol {signature_sha256(signature)[:12]}")
