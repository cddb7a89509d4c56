"""`genmodels status`: where the project stands, in a few lines per family, and where to look next.

    from genmodels.status import status
    print(status(params, project_dir="."))

Read from the files the stages write (data/shards/manifest.json, models/<family>/,
metrics/*.json) and from the tracking store (the training run's state, the registered versions
and their aliases). Nothing is created: a project without a tracking database keeps none.
"""

from __future__ import annotations

import json
from pathlib import Path

from genmodels.config import Params
from genmodels.families import FAMILIES, get_family
from genmodels.files import read_json
from genmodels.progress import number

INDENT = " " * 11


def status(params: Params, project_dir: str | Path = ".") -> str:
    from genmodels.tracking import impatient_requests

    with impatient_requests():
        return _status(params, Path(project_dir).resolve())


def _status(params: Params, project: Path) -> str:
    lines = [f"genmodels status: {project}"]
    manifest_path = project / "data" / "shards" / "manifest.json"
    if not manifest_path.is_file():
        lines.append("nothing here yet (no data/shards/manifest.json): run `make run` for the whole pipeline "
                     "(prepare, featurizer, train, evaluate, register), or `dvc repro prepare` to start with the data")
        return "\n".join(lines)
    from genmodels.data.shards import load_manifest, manifest_sha256
    from genmodels.tracking import resolve_tracking

    manifest = load_manifest(project / "data" / "shards")
    splits = ", ".join(f"{name} {split.num_samples}" for name, split in manifest.splits.items())
    shards = sum(len(split.shards) for split in manifest.splits.values())
    lines.append(f"{'data':<11}{manifest.source}, {manifest.image_size}x{manifest.image_size}x{manifest.channels}: {splits} "
                 f"({shards} shards); manifest {manifest_sha256(manifest)[:12]}")
    featurizer = read_json(project / "metrics" / "featurizer.json")
    lines.append(f"{'featurizer':<11}" + (f"val accuracy {featurizer['val_accuracy']:.4f}" if featurizer
                                          else "not trained: dvc repro featurizer"))
    tracking = resolve_tracking(project)
    client = _client(tracking.uri)
    trained = []
    for family in FAMILIES:
        model_dir = project / "models" / family
        if not (model_dir / "config.json").is_file():
            lines.append(f"{family:<11}not trained: dvc repro train@{family}")
            continue
        trained.append(family)
        lines += _family_lines(params, family, project, client)
    lines.append("look further")
    lines.append(f"  {_mlflow_ui(tracking.uri, project)}    # runs, curves, sample grids")
    lines.append("  dvc plots show    # loss curves -> dvc_plots/index.html")
    for family in trained:
        name = params.registry.name(family)
        lines.append(f"  genmodels sample models:/{name}@champion -n 64 -o {family}_samples.png")
    lines.append("  genmodels report -o report.html    # samples, real images, curves and metrics in one page")
    return "\n".join(lines)


def _family_lines(params: Params, family: str, project: Path, client) -> list[str]:
    spec = get_family(family)
    config = json.loads((project / "models" / family / "config.json").read_text())
    train = read_json(project / "metrics" / f"train_{family}.json") or {}
    mlflow = read_json(project / "models" / family / "mlflow.json") or {}
    state = _run_state(client, mlflow.get("run_id"))
    shown = {k.removeprefix("train/"): train[k.removeprefix("train/")] for k in spec.curve_keys
             if k.removeprefix("train/") in train}
    periodic = train.get(spec.metric)
    if periodic is not None:
        shown[f"periodic {spec.metric.split('/')[-1]}"] = periodic
    lines = [f"{family:<11}trained {train.get('step', '?')} steps in {train.get('wall_s', '?')} s on "
             f"{train.get('world_size', '?')} worker(s); run {config.get('run_name')!r}; MLflow run {mlflow.get('run_id', '?')}"
             f"{f' ({state})' if state else ''}"]
    if shown:
        lines.append(INDENT + "  ".join(f"{k} {number(v)}" for k, v in shown.items()))
    lines.append(INDENT + _eval_line(spec, project, config))
    registry = _registry_line(client, params.registry.name(family), family)
    if registry:
        lines.append(INDENT + registry)
    return lines


def _eval_line(spec, project: Path, config: dict) -> str:
    from genmodels.metrics.protocol import signature_sha256

    record = read_json(project / "metrics" / f"eval_{spec.name}.json")
    if record is None:
        return f"not evaluated: dvc repro evaluate@{spec.name}"
    numbers = [f"fid {number(record['fid'])} ± {number(record.get('fid_bootstrap_std', float('nan')))}"]
    numbers += [f"{k} {number(record[k])}" for k in ("kid", "precision", "recall", "coverage", "elbo", "iwae") if k in record]
    if "classes_under_half_share" in record:
        numbers.append(f"classes under half their share {record['classes_under_half_share']}")
    if "memorised_fraction" in record:
        numbers.append(f"memorised {100 * record['memorised_fraction']:.1f}% (held-out images: 1%)")
    signature = record.get("signature", {})
    stale = "" if record.get("weights_sha256") == config.get("weights_sha256") else \
        f"; measured on other weights: dvc repro evaluate@{spec.name}"
    return (f"eval  {'  '.join(numbers)}; protocol {signature_sha256(signature)[:12]} ({signature.get('num_generated')} "
            f"generated vs {signature.get('num_real')} {signature.get('reference_split')}, {signature.get('extractor')}){stale}")


def _registry_line(client, name: str, family: str) -> str:
    if client is None:
        return ""
    try:
        from mlflow.exceptions import MlflowException

        try:
            model = client.get_registered_model(name)
        except MlflowException:
            return f"registry {name}: no version yet (dvc repro register@{family})"
        versions = sorted({int(v.version) for v in client.search_model_versions(f"name = '{name}'")}, reverse=True)
    except Exception as err:  # noqa: BLE001 - status reports an unreachable store, it does not fail on it
        return f"registry {name}: unreachable ({type(err).__name__})"
    by_version: dict[int, list[str]] = {}
    for alias, version in model.aliases.items():
        by_version.setdefault(int(version), []).append(alias)
    shown = [f"v{v}" + (f" {'+'.join(sorted(by_version[v]))}" if v in by_version else "") for v in versions[:5]]
    more = f", {len(versions) - 5} older" if len(versions) > 5 else ""
    return f"registry {name}: {', '.join(shown)}{more}"


def _client(uri: str):
    """An MLflow client of the store, or None where there is none yet (a missing sqlite file stays missing)."""
    from genmodels.tracking import store_exists

    if not store_exists(uri):
        return None
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_state(client, run_id: str | None) -> str:
    if client is None or not run_id:
        return ""
    try:
        return client.get_run(run_id).info.status
    except Exception as err:  # noqa: BLE001 - see _registry_line
        return f"unreachable: {type(err).__name__}"


def _mlflow_ui(uri: str, project: Path) -> str:
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        shown = database.relative_to(project) if database.is_relative_to(project) else database
        return f"mlflow ui --backend-store-uri sqlite:///{shown} --port 5000"
    return f"open {uri}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"
