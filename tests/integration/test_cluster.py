"""`genmodels submit` and `genmodels jobs` against a real Ray cluster started by the test (`ray
start --head --block` as a child process, stopped by pid), and the shared-storage preflight."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.integration.mlflow_server import _free_port
from tests.integration.ray_nodes import ray_head, ray_worker_node, short_temp_dir

SECRET = "s3cr3t-do-not-show"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    temp_dir = short_temp_dir()
    with ray_head(temp_dir, num_cpus=2) as started:
        yield started
    shutil.rmtree(temp_dir, ignore_errors=True)


def _genmodels(cwd, *args, env=None, timeout=300):
    return subprocess.run(["genmodels", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_submit_streams_logs_returns_the_job_status_and_never_ships_secrets(head, project_copy):
    secrets = {"MLFLOW_TRACKING_PASSWORD": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    probe = "import os; print('password seen:', os.environ.get('MLFLOW_TRACKING_PASSWORD')); print(os.environ['MLFLOW_TRACKING_URI']); print(sorted(os.listdir('.')))"
    ok = _genmodels(project_copy, "submit", "--address", head.dashboard, "--", sys.executable, "-c", probe, env=secrets)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    size = re.search(r"submit: ([\d.]+) MB to upload", ok.stdout)
    assert size and float(size.group(1)) < 5, ok.stdout  # the code, not .git, .venv or DVC outputs
    assert "password seen: None" in ok.stdout and "http://mlflow:5000" in ok.stdout and "SUCCEEDED" in ok.stdout
    assert "'genmodels'" in ok.stdout and "'.git'" not in ok.stdout  # the working dir is the project's code
    for listing in (subprocess.run(["ray", "job", "list", "--address", head.dashboard], capture_output=True, text=True),
                    _genmodels(project_copy, "jobs", "list", "--address", head.dashboard)):
        assert listing.returncode == 0 and "SUCCEEDED" in listing.stdout + listing.stderr
        assert SECRET not in listing.stdout + listing.stderr

    failing = _genmodels(project_copy, "submit", "--address", head.dashboard, "--", sys.executable, "-c",
                         "import sys; print('about to fail'); sys.exit(3)")
    assert failing.returncode == 1 and "about to fail" in failing.stdout and "FAILED" in failing.stdout
    job_id = re.search(r"submit: job (\S+) on", failing.stdout).group(1)
    logs = _genmodels(project_copy, "jobs", "logs", job_id, "--address", head.dashboard)
    assert logs.returncode == 0 and "about to fail" in logs.stdout

    detached = _genmodels(project_copy, "submit", "--address", head.dashboard, "--no-wait", "--", sys.executable, "-c",
                          "import time; time.sleep(600)")
    assert detached.returncode == 0
    job_id = re.search(r"submit: job (\S+) on", detached.stdout).group(1)
    assert "stopping" in _genmodels(project_copy, "jobs", "stop", job_id, "--address", head.dashboard).stdout
    _until(lambda: f"{job_id}  STOPPED" in _genmodels(project_copy, "jobs", "list", "--address", head.dashboard).stdout)


def test_submit_refuses_credentials_dvc_and_an_unreachable_address(head, project_copy):
    refused = _genmodels(project_copy, "submit", "--address", head.dashboard, "--env", "DB_PASSWORD=x", "--", "true")
    assert refused.returncode == 2 and "--env DB_PASSWORD: looks like a credential" in refused.stderr
    in_url = _genmodels(project_copy, "submit", "--address", head.dashboard, "--", "true",
                        env={"MLFLOW_TRACKING_URI": f"http://user:{SECRET}@mlflow:5000"})
    assert in_url.returncode == 2 and "credentials in the URL" in in_url.stderr and SECRET not in in_url.stderr
    dvc = _genmodels(project_copy, "submit", "--address", head.dashboard, "--", "dvc", "repro")
    assert dvc.returncode == 2 and "publish data/shards by URL" in dvc.stderr
    started = time.monotonic()
    nobody = _genmodels(project_copy, "submit", "--address", f"http://127.0.0.1:{_free_port()}", "--", "true")
    assert nobody.returncode == 2 and "no Ray job server at" in nobody.stderr
    assert time.monotonic() - started < 30


def test_a_submitted_two_node_ddp_run_needs_nothing_from_the_drivers_disk(tmp_path, project_copy, mnist_shards,
                                                                          quick_featurizer, mlflow_url):
    """Two Ray nodes of one CPU each, so the two DDP workers land on different nodes. The second
    runs in its own mount namespace where tmpfs hides the project, the shards' directory and the
    head's temp dir: a worker that opens a path of the driver's finds an empty directory, as on
    a real cluster. Shared storage stands in for S3 here: a directory both nodes see, declared
    with GENMODELS_SHARED_PATHS (S3 itself is the loader's and pyarrow's concern)."""
    from mlflow import MlflowClient
    from ray.util.state import list_actors, list_nodes

    shutil.copytree(quick_featurizer, project_copy / "models" / "featurizer")
    shared = tmp_path / "shared"
    shared.mkdir()
    head_dir = short_temp_dir()  # the worker node uses the same path, under its tmpfs
    hidden = [project_copy, mnist_shards.parent, head_dir]
    unshare = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               " && ".join(f'mount -t tmpfs none "${i + 1}"' for i in range(len(hidden))) + f" && shift {len(hidden)} && exec \"$@\"",
               "sh", *map(str, hidden)]
    port = _free_port()
    shards = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(mnist_shards)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    experiment = f"two-nodes-{port}"
    command = ["genmodels", "train", "gan", "--shards", f"http://127.0.0.1:{port}",
               *[arg for setting in (f"train.experiment={experiment}", "train.num_workers=2", "train.cpus_per_worker=1",
                                     f"train.storage_path={shared / 'ray_results'}", "train.gan.num_steps=12",
                                     "train.gan.width=8", "train.eval_every_steps=6", "train.eval_num_samples=64",
                                     "train.checkpoint_every_steps=6", "train.sample_every_steps=6", "train.log_every_steps=3")
                 for arg in ("--set", setting)]]
    started = time.monotonic()
    try:
        with ray_head(head_dir, num_cpus=1) as head, \
                ray_worker_node(head, tmp_path / "worker.log", num_cpus=1, wrapper=unshare):
            _until(lambda: len([n for n in list_nodes(address=head.dashboard) if n.state == "ALIVE"]) == 2)
            job = _genmodels(project_copy, "submit", "--address", head.dashboard, "--", *command, timeout=600,
                             env={"MLFLOW_TRACKING_URI": mlflow_url, "GENMODELS_SHARED_PATHS": str(shared)})
            workers = list_actors(address=head.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
            undeclared = _genmodels(project_copy, "submit", "--address", head.dashboard, "--", *command, timeout=600,
                                    env={"MLFLOW_TRACKING_URI": mlflow_url})
    finally:
        shards.terminate()
        shards.wait(timeout=30)
        shutil.rmtree(head_dir, ignore_errors=True)
    print(f"two-node test: {time.monotonic() - started:.1f} s")
    assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-3000:]
    assert len({actor.node_id for actor in workers}) == 2, [(a.node_id, a.state) for a in workers]
    assert undeclared.returncode == 1  # the same storage, not declared shared: refused before Ray Train starts
    assert f"cannot open paths on this one: train.storage_path = {shared / 'ray_results'}" in undeclared.stdout
    assert "GENMODELS_SHARED_PATHS=/mnt/shared" in undeclared.stdout
    client = MlflowClient(mlflow_url)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED" and "eval/fid" in run.data.metrics and run.data.metrics["train/epoch"] > 0
    assert any("samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))
    assert sorted(p.name for p in (shared / "ray_results").glob("*/step_*")) == ["step_00000006", "step_00000012"]


def _until(condition, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)  # polling Ray's state API: there is no event to wait on
