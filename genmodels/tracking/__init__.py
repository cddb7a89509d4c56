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

An outage of the tracking server (issue 14, scenario 8): a RunLogger given `outage_s` keeps the
metric points the server could not take and sends them later, oldest first, with their own
steps and timestamps; training goes on meanwhile. Sending a point twice is harmless: a SQL
store keys a metric by (key, timestamp, step, value) and skips an exact repeat
(`SqlAlchemyStore._log_metrics`), so a batch whose answer was lost can simply be sent again.
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

from genmodels.credentials import url_credentials

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
# MLflow's HTTP settings (environment variables it reads at every request) for calls that must
# not hold training for minutes: its defaults are 7 retries with back-off (about 4 min against a
# server that is down) and 120 s per request. Two quick retries still absorb a blip of a few
# seconds; a longer outage is the RunLogger's buffer's job. Settings the user made win.
LOGGING_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# While the server is known to be down: one try, at most every PROBE_INTERVAL_S, so that a hung
# server (no answer, not refused) costs training at most one request timeout per interval.
PROBE_HTTP = {**LOGGING_HTTP, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
PROBE_INTERVAL_S = 5.0
MAX_UNSENT_POINTS = 100_000
"""Metric points a RunLogger keeps for a server that is down (some 10-30 MB in memory and in the
checkpoint) before training stops as it does past `outage_s`."""


class TrackingError(RuntimeError):
    """The tracking store cannot be used as asked; the message names the experiment or key."""


@dataclass(frozen=True)
class Tracking:
    uri: str  # tracking URI, absolute for local stores so every process opens the same file
    artifact_location: str | None  # explicit experiment artifact root, or None to let a remote server decide


def store_exists(uri: str) -> bool:
    """False for an sqlite store whose file is missing: opening it would create an empty one."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()


def impatient_requests(timeout_s: int = 5):
    """For commands that only look (status, report): one try per request, `timeout_s` each, instead
    of MLflow's 7 retries with back-off (minutes per call against a server that is down). Settings
    the user made win."""
    return http_settings({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)})


@contextlib.contextmanager
def http_settings(settings: dict[str, str]):
    """MLflow's HTTP environment variables for the calls inside, where the user has not set them."""
    saved = {name: os.environ.get(name) for name in settings}
    for name, value in settings.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def unreachable(err: BaseException) -> bool:
    """The server is down or failing (no connection, a timeout, a 5xx after MLflow's retries), as
    opposed to a request it refuses (4xx), which sending again would not cure."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):  # connection errors and timeouts arrive as INTERNAL_ERROR (500)
        return err.get_http_status_code() >= 500
    return isinstance(err, (requests.RequestException, OSError))


def patiently(call, *, uri: str, outage_s: float | None, what: str):
    """`call()`; with `outage_s`, under LOGGING_HTTP and tried again every PROBE_INTERVAL_S while the
    server is unreachable, for up to `outage_s` seconds (0: once). None: one call with MLflow's own
    settings."""
    if outage_s is None:
        return call()
    start = time.monotonic()
    while True:
        try:
            with http_settings(LOGGING_HTTP):
                return call()
        except Exception as err:
            waited_s = time.monotonic() - start
            if not unreachable(err):
                raise
            if waited_s >= outage_s:
                raise TrackingError(f"{what}: MLflow tracking server {uri} unreachable; gave up after "
                                    f"{waited_s:.0f} s: {err}") from err
            time.sleep(min(PROBE_INTERVAL_S, outage_s - waited_s))  # polling the server, up to the deadline


def resolve_tracking(project_dir: Path) -> Tracking:
    """Where runs go: $MLFLOW_TRACKING_URI if set, else `project_dir/mlruns.db` (embedded sqlite).
    A URI with a password in it is refused: it is printed, and recorded in models/<family>/mlflow.json."""
    local_artifacts = (Path(project_dir) / "mlartifacts").resolve().as_uri()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    for scheme in url_credentials(uri, passwords_only=True):
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={scheme}://...@...: a password in the URI would be shown in logs and recorded in "
            f"models/<family>/mlflow.json; give a tracking server's credentials as MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), a database's by its own means (PGPASSWORD, ~/.pgpass)"
        )
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
    """Rank-0 logger inside a Ray worker. After a restart (`resume_after_step`: the last step
    logged before it), a metric's points up to the last step MLflow holds *of that key* are
    dropped, and images up to `resume_after_step`: MLflow must never get a step twice, and must
    not miss one either (eval/* follow train/* at the same step; a crash between the two leaves
    eval/* to log again).

    With `outage_s` (training), metric points the server cannot take wait in `unsent`, are sent
    with the next ones once it answers again, and travel with each checkpoint; `settle` tells
    the loop when to stop. Without (evaluate, tune's driver), every error is raised as it comes.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, resume_after_step: int = 0, outage_s: float | None = None):
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri)
        self.uri, self.run_id = tracking_uri, run_id
        self.resume_after_step = resume_after_step
        self.outage_s = outage_s
        self._last_step: dict[str, int] = {}  # per key, read from the server once, after a restart
        self.unsent: list[tuple[str, float, int, int]] = []
        """(key, value, timestamp_ms, step) the server has not taken yet, oldest first."""
        self._down_since: float | None = None  # time.monotonic() when the first failed request of this outage began
        self._down_step = 0
        self._next_try = 0.0

    @property
    def down_s(self) -> float:
        """Seconds since a send first failed, 0 while the server takes everything."""
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        if self.resume_after_step > 0:  # -1: never drop (evaluate logs at the last training step, maybe 0)
            values = {k: v for k, v in values.items() if step > self._logged_up_to(k)}
        if not values:
            return
        timestamp_ms = int(time.time() * 1000)
        points = [(key, float(value), timestamp_ms, step) for key, value in values.items()]
        if self.outage_s is None:
            self._send(points)
            return
        self.unsent += points
        self._flush(step)

    def _logged_up_to(self, key: str) -> int:
        """One request (LOGGING_HTTP's retries), never an outage waited out: rank 0 alone makes it
        while the other ranks wait in a collective. Unanswered, the key counts as logged up to
        `resume_after_step`, and is asked again next time."""
        if key not in self._last_step:
            try:
                self._last_step[key] = last_logged_step(self.uri, self.run_id, key, outage_s=0)
            except TrackingError:
                return self.resume_after_step
        return self._last_step[key]

    def resend(self, points: list[tuple[str, float, int, int]]) -> None:
        """Points a checkpoint kept unsent (needs `outage_s`), sent before anything newer. Not
        filtered by `resume_after_step`: were some logged already, the store skips the exact repeats."""
        self.unsent[:0] = [tuple(p) for p in points]
        if self.unsent:
            self._flush(self.unsent[0][3])

    def settle(self, *, final: bool) -> str:
        """At a checkpoint, try to send what waits: "go" (sent, or the outage is still within
        `outage_s`), "stop" (points still wait after `outage_s` of outage, or more than
        MAX_UNSENT_POINTS wait: the loop stops training there, the points kept in the
        checkpoint) or, at the end of training (`final`) within the bound, "wait" after one probe
        interval: call again."""
        if not self.unsent or self.outage_s is None:
            return "go"
        self._flush(self._down_step, force=True)
        if not self.unsent:
            return "go"
        if self.down_s >= self.outage_s or len(self.unsent) > MAX_UNSENT_POINTS:
            return "stop"
        if not final:
            return "go"
        time.sleep(min(PROBE_INTERVAL_S, self.outage_s - self.down_s))  # polling the server, up to the bound
        return "wait"

    def _flush(self, step: int, *, force: bool = False) -> None:
        """Send `unsent`; while the server is down, try only every PROBE_INTERVAL_S unless `force`."""
        down = self._down_since is not None
        if not self.unsent or (down and not force and time.monotonic() < self._next_try):
            return
        late = f"unreachable {self.down_s:.1f} s; {len(self.unsent)} metric points sent late"
        tags = {f"genmodels.tracking.outage.step_{self._down_step}": late} if down else {}  # says why curves have a gap in time
        began = time.monotonic()
        try:
            with http_settings(PROBE_HTTP if down else LOGGING_HTTP):
                self._send(self.unsent, tags)
        except Exception as err:
            if not unreachable(err):
                raise
            self._next_try = time.monotonic() + PROBE_INTERVAL_S
            if not down:  # the outage counts from the first request it failed, retries included
                self._down_since, self._down_step = began, step
                warnings.warn(f"MLflow tracking server {self.uri} unreachable at step {step} ({err}); training goes on "
                              f"and keeps its metrics for up to train.tracking_outage_s={self.outage_s:g} s", stacklevel=2)
            return
        if down:
            warnings.warn(f"MLflow tracking server {self.uri} back after an outage from step {self._down_step}: {late}",
                          stacklevel=2)
        self.unsent.clear()
        self._down_since = None

    def _send(self, points: list[tuple[str, float, int, int]], tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        # log_batch splits into requests of <= 1000 metrics (MAX_METRICS_PER_BATCH), in order.
        self._client.log_batch(self.run_id, metrics=[Metric(*point) for point in points],
                               tags=[RunTag(k, v) for k, v in (tags or {}).items()])

    def _http(self):
        return http_settings(LOGGING_HTTP) if self.outage_s is not None else contextlib.nullcontext()

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """A uint8 HxW or HxWxC (C in 1, 3, 4) image, shown in the MLflow UI's step slider under `key`.
        During an outage (`outage_s`) an image is skipped, with a warning: a preview is not worth
        a request timeout, nor memory."""
        if step <= self.resume_after_step:
            return
        shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
        if image.dtype.name != "uint8" or not shape_ok:
            # A CHW tensor would otherwise be read as a 3-row image with C channels.
            raise ValueError(f"image {key!r}: expected uint8 HxW or HxWxC with C in (1, 3, 4), "
                             f"got {image.dtype} {tuple(image.shape)}")
        if self._down_since is None:
            try:
                with self._http():
                    # synchronous: a worker may exit right after the last step, taking a background upload with it.
                    self._client.log_image(self.run_id, image, key=key, step=step, synchronous=True)
                return
            except Exception as err:
                if self.outage_s is None or not unreachable(err):
                    raise
                reason = str(err)
        else:
            reason = f"down since step {self._down_step}"
        warnings.warn(f"image {key!r} at step {step} not logged: MLflow tracking server {self.uri} unreachable ({reason})",
                      stacklevel=2)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        with self._http():
            self._client.log_artifact(self.run_id, str(local_path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        with self._http():
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def last_logged_step(tracking_uri: str, run_id: str, key: str, *, outage_s: float | None = None) -> int:
    """The largest step of metric `key` in the run, 0 if it was never logged; `outage_s` as in `patiently`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    history = patiently(lambda: client.get_metric_history(run_id, key), uri=tracking_uri, outage_s=outage_s,
                        what=f"reading run {run_id}")
    return max((m.step for m in history), default=0)


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED", *, outage_s: float | None = None) -> None:
    """Close the run with status FINISHED, FAILED or KILLED; `outage_s` as in `patiently`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    patiently(lambda: client.set_terminated(run_id, status=status), uri=tracking_uri, outage_s=outage_s,
              what=f"marking run {run_id} {status}")


def metric_history(tracking_uri: str, run_id: str, keys: list[str], *, outage_s: float | None = None) -> list[dict]:
    """[{"step": s, key: value, ...}] sorted by step, one row per step (for DVC plot CSVs).

    A key not logged at a step is absent from that row. Were a step logged twice, the later
    timestamp wins. `outage_s` as in `patiently`.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    rows: dict[int, dict] = {}
    for key in keys:
        history = patiently(lambda: client.get_metric_history(run_id, key), uri=tracking_uri, outage_s=outage_s,
                            what=f"reading run {run_id}")
        for metric in sorted(history, key=lambda m: m.timestamp):
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
