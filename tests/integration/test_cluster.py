"""`genmodels submit` and `genmodels jobs` against a real Ray cluster started by the test (`ray
start --head --block` as a child process, stopped by pid), and the shared-storage preflight."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from genmodels.cli import main
from tests.integration.mlflow_server import _free_port
from tests.integration.ray_nodes import hiding, ray_head, ray_worker_node, short_temp_dir

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


@pytest.fixture
def cli(project_copy, monkeypatch, capsys):
    """`genmodels ...` in this process, from the project's root: (exit code, stdout, stderr)."""
    monkeypatch.chdir(project_copy)

    def run(*args):
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_submit_streams_logs_returns_the_job_status_and_never_ships_secrets(head, project_copy, cli, monkeypatch):
    for key, value in {"MLFLOW_TRACKING_PASSWORD": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET,
                       "MLFLOW_TRACKING_URI": "http://mlflow:5000"}.items():
        monkeypatch.setenv(key, value)  # the submitter's environment
    (project_copy / "models" / "featurizer").mkdir(parents=True)
    (project_copy / "models" / "featurizer" / "weights.pt").write_bytes(b"w" * 1000)
    (project_copy / "models" / ".gitignore").write_text("/featurizer\n")  # as `dvc repro` writes it
    probe = ("import os; print('password seen:', os.environ.get('MLFLOW_TRACKING_PASSWORD')); "
             "print(os.environ['MLFLOW_TRACKING_URI']); print(sorted(os.listdir('.'))); "
             "print('featurizer:', os.listdir('models/featurizer'))")
    code, out, err = cli("submit", "--address", head.dashboard, "--", sys.executable, "-c", probe)
    assert code == 0, out + err
    size = re.search(r"submit: ([\d.]+) MB to upload", out)
    assert size and float(size.group(1)) < 5, out  # the code, not .git, .venv or DVC outputs
    print(f"submission upload: {size.group(1)} MB", file=sys.__stdout__)
    assert "password seen: None" in out and "http://mlflow:5000" in out and "SUCCEEDED" in out
    assert "'genmodels'" in out and "'.git'" not in out  # the working dir is the project's code
    assert "featurizer: ['weights.pt']" in out  # git-ignored by DVC, shipped all the same
    listed = subprocess.run(["ray", "job", "list", "--address", head.dashboard], capture_output=True, text=True)
    for text in (listed.stdout + listed.stderr, "".join(cli("jobs", "list", "--address", head.dashboard)[1:])):
        assert "SUCCEEDED" in text and SECRET not in text

    code, out, _ = cli("submit", "--address", head.dashboard, "--", sys.executable, "-c",
                       "import sys; print('about to fail'); sys.exit(3)")
    assert code == 1 and "about to fail" in out and "FAILED" in out
    job_id = re.search(r"submit: job (\S+) on", out).group(1)
    code, out, _ = cli("jobs", "logs", job_id, "--address", head.dashboard)
    assert code == 0 and "about to fail" in out

    code, out, _ = cli("submit", "--address", head.dashboard, "--no-wait", "--", sys.executable, "-c", "import time; time.sleep(600)")
    assert code == 0
    job_id = re.search(r"submit: job (\S+) on", out).group(1)
    assert "stopping" in cli("jobs", "stop", job_id, "--address", head.dashboard)[1]
    _until(lambda: f"{job_id}  STOPPED" in cli("jobs", "list", "--address", head.dashboard)[1])


def test_a_submitted_training_larger_than_the_cluster_fails_fast_with_the_reason(head, project_copy, mnist_shards, cli):
    started = time.monotonic()
    code, out, _ = cli("submit", "--address", head.dashboard, "--", "genmodels", "train", "gan", "--shards", str(mnist_shards),
                       "--set", "train.num_workers=16", "--set", "train.eval_every_steps=0")
    assert code == 1 and "FAILED" in out, out[-3000:]
    assert "train.num_workers=16 x cpus_per_worker=1.0 needs {'CPU': 16.0}, but the Ray cluster has {'CPU': 2.0}" in out, out[-3000:]
    assert time.monotonic() - started < 120  # the job's own preflight, never a pending placement group


def test_submit_refuses_credentials_dvc_and_an_unreachable_address(head, cli, monkeypatch):
    code, _, err = cli("submit", "--address", head.dashboard, "--env", "DB_PASSWORD=x", "--", "true")
    assert code == 2 and "--env DB_PASSWORD: looks like a credential" in err
    code, _, err = cli("submit", "--address", head.dashboard, "--", "genmodels", "train", "gan", "--shards",
                       f"https://user:{SECRET}@data/shards")
    assert code == 2 and "the command: a URL with credentials" in err and SECRET not in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{SECRET}@mlflow:5000")
    code, _, err = cli("submit", "--address", head.dashboard, "--", "true")
    assert code == 2 and "MLFLOW_TRACKING_URI: a URL with credentials" in err and SECRET not in err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    code, _, err = cli("submit", "--address", head.dashboard, "--", "dvc", "repro")
    assert code == 2 and "publish data/shards by URL" in err
    started = time.monotonic()
    code, _, err = cli("submit", "--address", f"http://127.0.0.1:{_free_port()}", "--", "true")
    assert code == 2 and "no Ray job server at" in err and time.monotonic() - started < 30


@pytest.fixture
def shared_dir():
    """Outside pytest's base temp dir, which the second node hides."""
    path = short_temp_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_a_submitted_two_node_ddp_run_needs_nothing_from_the_drivers_disk(tmp_path, tmp_path_factory, project_copy,
                                                                          mnist_shards, quick_featurizer, mlflow_url,
                                                                          shared_dir, repo_root):
    """Two Ray nodes of one CPU each, so the two DDP workers land on different nodes, each in a
    mount namespace of its own where tmpfs hides what a real node would not have: everything this
    test session wrote (the project with its data, models, metrics and caches, the shards, the
    MLflow server's files), this repository's code, and for the second node the head's Ray temp
    dir, where the job's driver runs. A path of the submitter's or the driver's opened on a node
    finds an empty directory, as on a real cluster; the venv stays visible, as a node's own
    install. A directory both nodes see stands in for S3, declared with GENMODELS_SHARED_PATHS
    (s3:// itself is tested in test_loader against moto)."""
    from mlflow import MlflowClient
    from ray.util.state import list_actors, list_nodes

    shutil.copytree(quick_featurizer, project_copy / "models" / "featurizer")
    (project_copy / "models" / ".gitignore").write_text("/featurizer\n")  # as `dvc repro` leaves it
    shared = shared_dir
    head_dir = short_temp_dir()  # the worker node uses the same path, under its tmpfs
    # Both nodes hide everything this test session wrote (the project copy the submission came
    # from included: the driver runs on the head from the job's working dir) and this repository's
    # own genmodels (the venv's editable install points there): the nodes run the code the job
    # brought. The worker node also hides the head's Ray temp dir, where the driver runs.
    session, code = tmp_path_factory.getbasetemp(), repo_root / "genmodels"
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
        with ray_head(head_dir, num_cpus=1, wrapper=hiding([session, code])) as head, \
                ray_worker_node(head, tmp_path / "worker.log", num_cpus=1, wrapper=hiding([session, code, head_dir])) as worker:
            def joined():
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                return len([n for n in list_nodes(address=head.dashboard) if n.state == "ALIVE"]) == 2

            _until(joined)
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
