"""genmodels.tracking against a real `mlflow server` and against the embedded sqlite default."""

import subprocess
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from genmodels.tracking import (
    PARAM_VALUE_MAX_CHARS,
    RunLogger,
    Tracking,
    finish_run,
    git_tags,
    last_logged_step,
    metric_history,
    open_run,
    resolve_tracking,
    runtime_tags,
)
from tests.integration.mlflow_server import start_mlflow_server


@pytest.fixture(scope="module")
def server_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow_server")


@pytest.fixture(scope="module")
def server_url(server_root) -> str:
    """One server for the whole module: starting one costs several seconds."""
    with start_mlflow_server(server_root) as url:
        yield url


@pytest.fixture
def experiment() -> str:
    """A fresh experiment name per test: the module's server outlives each test."""
    return f"test-{uuid.uuid4().hex[:8]}"


def _open(url: str, experiment: str, run_key: str = "key-1", params: dict | None = None) -> str:
    run_id, _ = open_run(Tracking(uri=url, artifact_location=None), experiment=experiment, run_key=run_key,
                         run_name="run", params=params or {}, tags={})
    return run_id


def test_resolve_tracking_default_env_and_relative_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    default = resolve_tracking(Path("project"))
    assert default.uri == f"sqlite:///{tmp_path.resolve()}/project/mlruns.db"
    assert default.uri.startswith("sqlite:////")  # four slashes: an absolute path
    assert default.artifact_location == f"file://{tmp_path.resolve()}/project/mlartifacts"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking(Path("project")) == Tracking(uri="http://127.0.0.1:5000", artifact_location=None)

    # A Ray worker's cwd differs from the driver's: a relative sqlite path is pinned to the driver's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert resolve_tracking(Path("project")) == Tracking(
        uri=f"sqlite:///{tmp_path.resolve()}/elsewhere.db", artifact_location=default.artifact_location
    )


def test_open_run_creates_then_resumes_by_run_key(server_url, experiment):
    tracking = Tracking(uri=server_url, artifact_location=None)
    client = MlflowClient(tracking_uri=server_url)
    params = {"model": {"family": "dcgan", "g": {"num_channels": 64}}, "lr_g": 2e-4, "betas": [0.5, 0.999]}
    run_id, resumed = open_run(tracking, experiment=experiment, run_key="exp1", run_name="gan-exp1",
                               params=params, tags={"owner": "tests"})
    assert not resumed
    run = client.get_run(run_id)
    expected_params = {"model.family": "dcgan", "model.g.num_channels": "64", "lr_g": "0.0002", "betas": "[0.5, 0.999]"}
    assert run.data.params == expected_params
    assert run.info.run_name == "gan-exp1"
    assert run.data.tags["owner"] == "tests" and run.data.tags["genmodels.run_key"] == "exp1"

    finish_run(server_url, run_id, status="FAILED")
    assert client.get_run(run_id).info.status == "FAILED"
    again, resumed = open_run(tracking, experiment=experiment, run_key="exp1", run_name="other name",
                              params={"lr_g": 1.0}, tags={})
    assert (again, resumed) == (run_id, True)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.params == expected_params

    other, resumed = open_run(tracking, experiment=experiment, run_key="exp2", run_name="gan-exp2", params={}, tags={})
    assert other != run_id and not resumed
    client.delete_run(other)  # a deleted run is never resumed
    fresh, resumed = open_run(tracking, experiment=experiment, run_key="exp2", run_name="gan-exp2", params={}, tags={})
    assert fresh not in (run_id, other) and not resumed

    quoted = "file:///home/o'brien/ray_results/gan-exp1"  # run keys are built from storage paths
    first, resumed = open_run(tracking, experiment=experiment, run_key=quoted, run_name="q", params={}, tags={})
    assert not resumed
    assert open_run(tracking, experiment=experiment, run_key=quoted, run_name="q", params={}, tags={}) == (first, True)
    with pytest.raises(ValueError, match="run_key"):
        open_run(tracking, experiment=experiment, run_key="it's \"odd\"", run_name="x", params={}, tags={})


def test_open_run_logs_more_than_one_batch_of_params_and_cuts_long_values(server_url, experiment):
    params = {"layer": {f"p{i:03d}": i for i in range(250)}, "long": "x" * (PARAM_VALUE_MAX_CHARS + 1000)}
    with pytest.warns(UserWarning, match="'long'"):
        run_id = _open(server_url, experiment, params=params)
    logged = MlflowClient(tracking_uri=server_url).get_run(run_id).data.params
    assert len(logged) == 251 and logged["layer.p249"] == "249"
    assert len(logged["long"]) == PARAM_VALUE_MAX_CHARS and logged["long"].startswith("xxx")


def test_run_logger_drops_steps_already_logged_before_a_restart(server_url, experiment):
    run_id = _open(server_url, experiment)
    client = MlflowClient(tracking_uri=server_url)
    assert last_logged_step(server_url, run_id, "loss_g") == 0

    first = RunLogger(server_url, run_id)
    for step in range(1, 21):
        first.log_metrics({"loss_g": step / 10, "loss_d": -step / 10}, step=step)
        if step == 10:  # killed after step 20's losses went out, before its fid did
            first.log_metrics({"fid": 100.0 - step}, step=step)
    resume_after_step = last_logged_step(server_url, run_id, "loss_g")
    assert resume_after_step == 20

    # The restarted job resumes from an older checkpoint (step 10) and replays 11..30.
    second = RunLogger(server_url, run_id, resume_after_step=resume_after_step)
    for step in range(11, 31):
        second.log_metrics({"loss_g": step / 10 + 5, "loss_d": -step / 10}, step=step)
        if step % 10 == 0:
            second.log_metrics({"fid": 100.0 - step}, step=step)

    for key in ("loss_g", "loss_d"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, 31))
    assert sorted(m.step for m in client.get_metric_history(run_id, "fid")) == [10, 20, 30]
    rows = metric_history(server_url, run_id, ["loss_g", "loss_d", "fid"])
    assert [row["step"] for row in rows] == list(range(1, 31))
    assert rows[14] == {"step": 15, "loss_g": 1.5, "loss_d": -1.5}  # the first logger's value survives
    assert rows[24] == {"step": 25, "loss_g": 7.5, "loss_d": -2.5}
    assert rows[29] == {"step": 30, "loss_g": 8.0, "loss_d": -3.0, "fid": 70.0}


def test_run_logger_after_a_restart_drops_per_key_only_what_the_server_holds(server_url, experiment):
    run_id = _open(server_url, experiment)
    RunLogger(server_url, run_id).log_metrics({"loss": 10.0}, step=10)
    logger = RunLogger(server_url, run_id, resume_after_step=10)
    for step in range(1, 16):
        logger.log_metrics({"loss": float(step), "eval": -float(step)}, step=step)
    client = MlflowClient(tracking_uri=server_url)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [10, 11, 12, 13, 14, 15]
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval")) == list(range(1, 16))


def test_images_and_artifacts_go_through_the_server(server_url, server_root, experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    tracking = resolve_tracking(tmp_path)
    run_id, _ = open_run(tracking, experiment=experiment, run_key="img", run_name="img", params={}, tags={})
    client = MlflowClient(tracking_uri=server_url)
    assert client.get_experiment_by_name(experiment).artifact_location.startswith("mlflow-artifacts:")

    logger = RunLogger(tracking.uri, run_id, resume_after_step=5)
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    logger.log_image("samples", image, step=3)  # before the restart point: dropped
    logger.log_image("samples", image, step=7)
    logger.log_image("samples/gray", image[:, :, 0], step=8)
    with pytest.raises(ValueError, match="'samples'.*got float32"):
        logger.log_image("samples", np.zeros((3, 8, 8), np.float32), step=9)
    (tmp_path / "summary.txt").write_text("done")
    logger.log_artifact(tmp_path / "summary.txt", artifact_path="reports")
    logger.set_tags({"best.step": "7"})

    images = [Path(f.path).name for f in client.list_artifacts(run_id, "images")]
    pngs = [name for name in images if name.endswith(".png")]
    assert len(pngs) == 2
    assert any(name.startswith("samples+step+7+") for name in pngs)
    assert any(name.startswith("samples~gray+step+8+") for name in pngs)
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/summary.txt"]
    assert client.get_run(run_id).data.tags["best.step"] == "7"
    # Proxied: the bytes sit in the server's --artifacts-destination, nothing in the project.
    assert any(p.name.startswith("samples+step+7+") for p in (server_root / "artifacts").rglob("*.png"))
    assert not (tmp_path / "mlartifacts").exists()


def test_embedded_default_keeps_artifacts_in_the_project_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project, worker_cwd = tmp_path / "project", tmp_path / "ray_session"
    project.mkdir()
    worker_cwd.mkdir()
    tracking = resolve_tracking(project)
    run_id, resumed = open_run(tracking, experiment="gan", run_key="k", run_name="gan", params={"a": 1}, tags={})
    assert not resumed

    monkeypatch.chdir(worker_cwd)  # as inside a Ray worker
    logger = RunLogger(tracking.uri, run_id)
    logger.log_metrics({"loss": 0.5}, step=1)
    logger.log_image("samples", np.zeros((4, 4), np.uint8), step=1)
    finish_run(tracking.uri, run_id)

    assert (project / "mlruns.db").is_file()
    assert len(list((project / "mlartifacts").rglob("samples+step+1+*.png"))) == 1
    assert list(worker_cwd.iterdir()) == []
    client = MlflowClient(tracking_uri=tracking.uri)
    assert client.get_experiment_by_name("gan").artifact_location == tracking.artifact_location
    assert client.get_run(run_id).info.status == "FINISHED"
    assert metric_history(tracking.uri, run_id, ["loss"]) == [{"step": 1, "loss": 0.5}]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_git_tags_commit_and_dirty_state(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never find a repo above tmp_path
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_tags(plain) == {"git.commit": "unknown", "git.dirty": "unknown"}
    assert git_tags(tmp_path / "missing") == {"git.commit": "unknown", "git.dirty": "unknown"}

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "params.yaml").write_text("lr: 1\n")
    _git(repo, "add", "params.yaml")
    _git(repo, "commit", "-q", "-m", "first")
    sha = _git(repo, "rev-parse", "HEAD")
    assert len(sha) == 40
    assert git_tags(repo) == {"git.commit": sha, "git.dirty": "false"}
    (repo / "mlruns.db").write_text("untracked output")
    assert git_tags(repo)["git.dirty"] == "false"
    (repo / "params.yaml").write_text("lr: 2\n")
    assert git_tags(repo) == {"git.commit": sha, "git.dirty": "true"}


def test_runtime_tags_name_the_installed_versions():
    tags = runtime_tags()
    assert set(tags) == {"ray.version", "torch.version", "python.version", "mlflow.version"}
    assert tags["mlflow.version"] == mlflow.__version__
    assert all(value and value != "not installed" for value in tags.values())
