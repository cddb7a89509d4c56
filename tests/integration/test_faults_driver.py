"""A real `genmodels train` driver signalled or SIGKILLed mid-run, then run again
(docs/RELIABILITY.md, scenarios 3 and 10): each starts its own local Ray, as on a workstation."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from genmodels.config import load_params
from genmodels.files import RunLocked
from genmodels.train.run import train
from tests.integration.test_faults_train import _resumed_from
from tests.integration.test_train import TINY, _history, _run_named

pytestmark = pytest.mark.slow  # each test here starts Ray, dvc or servers: 10 s to minutes on 2 cores


@pytest.mark.parametrize("signum,exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_driver_ends_the_run_as_killed(project, mnist_shards, mlflow_url, signum, exit_code):
    """A real `genmodels train` process with its own Ray, signalled mid-training."""
    run_name = f"gan-signal-{signum}"
    params = {"train": {**TINY, "num_workers": 1, "run_name": run_name, "checkpoint_every_steps": 1000,
                        "log_every_steps": 1, "gan": {**TINY["gan"], "num_steps": 100_000}}}
    (project / "params.yaml").write_text(json.dumps(params))
    process = subprocess.Popen(
        [sys.executable, "-m", "genmodels.cli", "train", "gan", "--shards", str(mnist_shards)],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not ((run := _run_named(mlflow_url, run_name)) and "train/loss_d" in run.data.metrics):
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.5)  # polling the tracking server for a condition, not waiting out a race
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == exit_code, output[-3000:]
    assert MlflowClient(mlflow_url).get_run(run.info.run_id).info.status == "KILLED"


def _group_members(pgid: int) -> list[int]:
    members = []
    for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pgid:
                members.append(pid)
    return members


def test_a_sigkilled_driver_is_resumed_by_running_the_command_again(project, mnist_shards, mlflow_url):
    """SIGKILL, which no handler sees (the OOM killer, a lost login node): the MLflow run stays
    RUNNING until the same command runs again, finds it by its run key and resumes it."""
    run_name = "gan-driver-kill"

    def command(num_steps: int) -> list[str]:
        params = {"train": {**TINY, "num_workers": 1, "run_name": run_name, "log_every_steps": 1, "eval_every_steps": 0,
                            "sample_every_steps": 1000, "gan": {**TINY["gan"], "num_steps": num_steps}}}
        (project / "params.yaml").write_text(json.dumps(params))
        return [sys.executable, "-m", "genmodels.cli", "train", "gan", "--shards", str(mnist_shards)]

    process = subprocess.Popen(command(24), cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    storage = project / "ray_results" / run_name
    try:
        deadline = time.monotonic() + 180
        while not (storage / "checkpoint_manager_snapshot.json").exists():  # Train's record of a registered checkpoint
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint was ever registered"
            time.sleep(0.2)  # polling the filesystem for a condition, not waiting out a race
        with pytest.raises(RunLocked, match=rf"train gan: run '{run_name}' is already running \(pid {process.pid}@"):
            train(load_params(project / "params.yaml"), "gan", shards=mnist_shards, project_dir=project)
        process.kill()  # the driver alone
        process.wait(timeout=30)
        deadline = time.monotonic() + 60
        while _group_members(process.pid):  # the local Ray dies with its driver (genmodels.cluster's reaper)
            assert time.monotonic() < deadline, "the killed driver's local Ray outlived it: " + str([(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:200]) for pid in _group_members(process.pid)])
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # only when an assertion above failed
    run = _run_named(mlflow_url, run_name)
    assert run.info.status == "RUNNING"

    rerun = subprocess.run(command(28), cwd=project, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "(resumed)" in rerun.stdout
    assert json.loads((project / "models/gan/mlflow.json").read_text())["run_id"] == run.info.run_id
    resumed_at = _resumed_from(mlflow_url, run.info.run_id)
    assert len(resumed_at) == 1 and 0 < min(resumed_at) <= 24  # from the checkpoint it had, not from scratch
    assert [s for s, _ in _history(mlflow_url, run.info.run_id, "train/loss_d")] == list(range(1, 29))
    assert MlflowClient(mlflow_url).get_run(run.info.run_id).info.status == "FINISHED"
