"""MLflow tracking for the training driver and for rank 0 inside Ray Train workers.

    tracking = resolve_tracking(project_dir)                       # driver
    run_id, resumed = open_run(tracking, experiment="gan", run_key=key, run_name="gan-exp1",
                               params=cfg.model_dump(), tags={**git_tags(project_dir), **runtime_tags()})
    # pass tracking.uri and run_id to the workers (train_loop_config); on rank 0:
    logger = RunLogger(uri, run_id, resume_after_step=step_restored_from_checkpoint)
    logger.log_metrics({"loss_g": 0.7, "loss_d": 1.3}, step=step)
    # driver, after fit():
    finish_run(tracking.uri, run_id)                               # or status="FAILED"

One training run is one MLflow run, found again after a restart by its `genmodels.run_key`
tag, so a resumed Ray run keeps appending to the same curves. MLflow itself is imported
inside the functions: `import mlflow` takes 2-3 s, and the CLI and unit tests need none of it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

RUN_KEY_TAG = "genmodels.run_key"
# MLflow rejects longer param values (MAX_PARAM_VAL_LENGTH in mlflow/utils/validation.py); a
# server truncates them only when its own MLFLOW_TRUNCATE_LONG_VALUES allows, so cut them here.
PARAM_VALUE_MAX_CHARS = 6000
_TRUNCATED_MARK = "...[truncated]"
# Schemes whose server picks the artifact store (and proxies uploads); every other store
# (sqlite, file, a database) would default to ./mlruns relative to the cwd at creation time,
# which inside a Ray worker is Ray's session directory.
_REMOTE_SCHEMES = ("http://", "https://", "databricks")
_GIT_TIMEOUT_S = 10.0


class TrackingError(RuntimeError):
    """The tracking store cannot be used as asked; the message names the experiment or key."""


@dataclass(frozen=True)
class Tracking:
    uri: str  # tracking URI, absolute for local stores so every process opens the same file
    artifact_location: str | None  # explicit experiment artifact root, or None to let a remote server decide


def store_exists(uri: str) -> bool:
    """False for an sqlite store whose file is missing: opening it would create an empty one."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()


@contextlib.contextmanager
def impatient_requests(timeout_s: int = 5):
    """For commands that only look (status, report): one try per request, `timeout_s` each, instead
    of MLflow's 7 retries with back-off (minutes per call against a server that is down). Settings
    the user made win."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.setdefault(names[0], "0")
    os.environ.setdefault(names[1], str(timeout_s))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def resolve_tracking(project_dir: Path) -> Tracking:
    """Where runs go: $MLFLOW_TRACKING_URI if set, else `project_dir/mlruns.db` (embedded sqlite)."""
    local_artifacts = (Path(project_dir) / "mlartifacts").resolve().as_uri()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        database = (Path(project_dir) / "mlruns.db").resolve()
        return Tracking(uri=f"sqlite:///{database}", artifact_location=local_artifacts)
    if uri.startswith(_REMOTE_SCHEMES):
        return Tracking(uri=uri, artifact_location=None)
    return Tracking(uri=_absolute_sqlite_uri(uri), artifact_location=local_artifacts)


def _absolute_sqlite_uri(uri: str) -> str:
    # "sqlite:///mlruns.db" is relative to the cwd, and a Ray worker's cwd is not the driver's:
    # pin it to the driver's cwd so the workers write into the same database.
    prefix = "sqlite:///"
    path = uri[len(prefix):]
    if not uri.startswith(prefix) or path.startswith("/") or path in ("", ":memory:"):
        return uri
    return prefix + str(Path(path).resolve())


def open_run(
    tracking: Tracking, *, experiment: str, run_key: str, run_name: str,
    params: dict[str, object], tags: dict[str, str],
) -> tuple[str, bool]:
    """(run_id, resumed): the active run tagged `run_key` in `experiment`, else a new one with `params`.

    A resumed run gets no params: MLflow params are immutable, and the run already holds the
    ones it started with. Its status goes back to RUNNING.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri=tracking.uri)
    experiment_id = _experiment_id(client, experiment, tracking.artifact_location)
    run_id = _find_run(client, experiment_id, run_key)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id, True

    run_id = client.create_run(experiment_id, run_name=run_name, tags={**tags, RUN_KEY_TAG: run_key}).info.run_id
    # MlflowClient.log_batch splits these into calls of <= 100 params (MAX_PARAMS_TAGS_PER_BATCH).
    client.log_batch(run_id, params=[Param(k, v) for k, v in flatten_params(params).items()])
    return run_id, False


def find_run(tracking_uri: str, experiment: str, run_key: str) -> str | None:
    """The id of the (not deleted) run tagged `run_key` in `experiment`, None if there is none."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return None if found is None else _find_run(client, found.experiment_id, run_key)


def _find_run(client, experiment_id: str, run_key: str) -> str | None:
    # run_key is matched through an MLflow filter string, which has no escapes: quote it with a
    # quote character it does not contain (a path like /home/o'brien needs double quotes).
    quote = next((q for q in "'\"" if q not in run_key), None)
    if not run_key or quote is None or "\\" in run_key:
        raise ValueError(f"run_key: expected a non-empty string without backslashes and without both "
                         f"quote characters, got {run_key!r}")
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = {quote}{run_key}{quote}",
        order_by=["attributes.start_time DESC"], max_results=1,
    )  # ACTIVE_ONLY by default: a deleted run is never resumed
    return found[0].info.run_id if found else None


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it just now
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted: restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` or choose another experiment name"
        )
    if artifact_location is not None and experiment.artifact_location != artifact_location:
        warnings.warn(
            f"MLflow experiment {name!r} keeps its artifact location {experiment.artifact_location}, "
            f"not {artifact_location} (it is fixed when the experiment is created)",
            stacklevel=3,
        )
    return experiment.experiment_id


def flatten_params(params: dict[str, object], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; values str()-ed and cut to PARAM_VALUE_MAX_CHARS."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = str(value)
        if len(text) > PARAM_VALUE_MAX_CHARS:
            warnings.warn(f"param {name!r}: {len(text)} characters cut to {PARAM_VALUE_MAX_CHARS}", stacklevel=2)
            text = text[: PARAM_VALUE_MAX_CHARS - len(_TRUNCATED_MARK)] + _TRUNCATED_MARK
        flat[name] = text
    return flat


class RunLogger:
    """Rank-0 logger inside a Ray worker. Metrics/images at steps <= resume_after_step are dropped:
    they were logged before a restart, and MLflow must never get a step twice."""

    def __init__(self, tracking_uri: str, run_id: str, *, resume_after_step: int = 0):
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.resume_after_step = resume_after_step

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        if step <= self.resume_after_step or not values:
            return
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        metrics = [Metric(key, float(value), timestamp_ms, step) for key, value in values.items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """A uint8 HxW or HxWxC (C in 1, 3, 4) image, shown in the MLflow UI's step slider under `key`."""
        if step <= self.resume_after_step:
            return
        shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
        if image.dtype.name != "uint8" or not shape_ok:
            # A CHW tensor would otherwise be read as a 3-row image with C channels.
            raise ValueError(f"image {key!r}: expected uint8 HxW or HxWxC with C in (1, 3, 4), "
                             f"got {image.dtype} {tuple(image.shape)}")
        # synchronous: a worker may exit right after the last step, taking a background upload with it.
        self._client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(local_path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def last_logged_step(tracking_uri: str, run_id: str, key: str) -> int:
    """The largest step of metric `key` in the run, 0 if it was never logged."""
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, key)
    return max((m.step for m in history), default=0)


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Close the run with status FINISHED, FAILED or KILLED."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status=status)


def metric_history(tracking_uri: str, run_id: str, keys: list[str]) -> list[dict]:
    """[{"step": s, key: value, ...}] sorted by step, one row per step (for DVC plot CSVs).

    A key not logged at a step is absent from that row. Were a step logged twice, the later
    timestamp wins.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    rows: dict[int, dict] = {}
    for key in keys:
        for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            rows.setdefault(metric.step, {"step": metric.step})[key] = metric.value
    return [rows[step] for step in sorted(rows)]


def git_tags(project_dir: Path) -> dict[str, str]:
    """{"git.commit": sha, "git.dirty": "true"/"false"}, "unknown" for what git cannot tell."""
    commit = _git(project_dir, "rev-parse", "HEAD")
    # Untracked files do not count: outputs such as mlruns.db must not mark every run dirty.
    status = _git(project_dir, "status", "--porcelain", "--untracked-files=no")
    return {
        "git.commit": commit.strip() if commit else "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status.strip())).lower(),
    }


def _git(cwd: Path, *args: str) -> str | None:
    """stdout of a git command, None if git is missing, fails or hangs (tags must never stop training)."""
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def runtime_tags() -> dict[str, str]:
    """Versions that change results; read from package metadata, so nothing heavy is imported."""
    tags = {"python.version": platform.python_version()}
    for package in ("ray", "torch", "mlflow"):
        try:
            tags[f"{package}.version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            tags[f"{package}.version"] = "not installed"
    return tags
