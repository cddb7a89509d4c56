"""A real `genmodels tune` driver killed or interrupted mid-sweep, then resumed (docs/RELIABILITY.md,
scenarios 3 and 10); its trials run on the test's local Ray, as a driver joins a cluster."""

import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import yaml

from genmodels.config import load_params
from genmodels.files import RunLocked
from genmodels.tune import tune
from tests.integration.test_faults_storage import _poll
from tests.integration.test_tune import SPACE, TRIAL, _runs, _steps

pytestmark = pytest.mark.slow  # each test here starts Ray, dvc or servers: 10 s to minutes on 2 cores


@pytest.fixture
def driver_env(ray_runtime, monkeypatch):
    """`genmodels tune` subprocesses join the test's Ray, as a driver joins a cluster. A second local
    Ray on the host would break Train's placement-group cleaner (it connects with address="auto"
    and refuses to pick between two instances), so a trial stopped by PBT would never release its
    CPUs."""
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def _child_statuses(url, sweep_name):
    _, children = _runs(url, sweep_name)
    return {c.data.tags["tune.trial_id"]: c.info.status for c in children}


def _one_finished_one_under_way(url, sweep_name) -> bool:
    children = _runs(url, sweep_name)[1]
    return (any(c.info.status == "FINISHED" for c in children)
            and any(c.info.status == "RUNNING" and "train/loss_d" in c.data.metrics for c in children))


def test_a_killed_driver_resumes_without_rerunning_finished_trials(driver_env, project, mnist_shards, mlflow_url):
    """A real `genmodels tune` process, SIGKILLed after one trial finished and while the next has
    logged a step, then `--resume`."""
    name = "gan-killed"
    (project / "params.yaml").write_text(yaml.safe_dump({
        "train": {**TRIAL, "gan": {**TRIAL["gan"], "num_steps": 12}},
        "tune": {"name": name, "num_samples": 2, "max_concurrent_trials": 1, "scheduler": "fifo", "space": SPACE}}))
    command = [sys.executable, "-m", "genmodels.cli", "tune", "gan", "--shards", str(mnist_shards)]
    process = subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # both waits together; polling the tracking server
        _poll(lambda: "FINISHED" in _child_statuses(mlflow_url, name).values(), timeout_s=300, what="finished trial",
              process=process, poll_s=0.5)
        with pytest.raises(RunLocked, match=rf"tune gan: sweep '{name}' is already running \(pid {process.pid}@"):
            tune(load_params(project / "params.yaml"), "gan", shards=mnist_shards, project_dir=project, resume=True)
        # The kill then lands mid-trial.
        _poll(lambda: _one_finished_one_under_way(mlflow_url, name), timeout_s=deadline - time.monotonic(),
              what="step logged by the second trial", process=process, poll_s=0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver: Ray ends its job's trials and Train runs
        process.communicate()
    killed_at = time.time()
    finished = {t for t, status in _child_statuses(mlflow_url, name).items() if status == "FINISHED"}
    trials = project / "ray_results" / f"{name}.trials"

    done = subprocess.run([*command, "--resume"], cwd=project, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parents, children = _runs(mlflow_url, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        steps = _steps(mlflow_url, child.info.run_id, "train/loss_d")
        assert steps == [4, 8, 12], (child.data.tags["tune.trial_id"], steps)  # resumed, no step twice
    for trial in finished:  # a trial finished before the kill trained nothing more
        checkpoints = list((trials / f"{name}-{trial}").glob("step_*"))
        assert checkpoints and all(p.stat().st_mtime < killed_at for p in checkpoints), trial
    assert (project / "tune" / "gan_best.yaml").is_file()


def test_ctrl_c_stops_the_sweep_and_leaves_no_run_running(driver_env, project, mnist_shards, mlflow_url):
    name = "gan-interrupted"
    (project / "params.yaml").write_text(yaml.safe_dump({
        "train": {**TRIAL, "gan": {**TRIAL["gan"], "num_steps": 100_000}},
        "tune": {"name": name, "num_samples": 1, "scheduler": "fifo", "space": SPACE}}))
    process = subprocess.Popen([sys.executable, "-m", "genmodels.cli", "tune", "gan", "--shards", str(mnist_shards)],
                               cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _poll(lambda: any("train/loss_d" in c.data.metrics for c in _runs(mlflow_url, name)[1]), timeout_s=300,
              what="step logged by a trial", process=process, poll_s=0.5)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output[-3000:]
    parents, children = _runs(mlflow_url, name)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert children and all(c.info.status == "KILLED" for c in children), [c.info.status for c in children]
