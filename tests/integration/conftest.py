import os
import shutil
import subprocess
from pathlib import Path

import pytest
import ray

from genmodels.cluster import free_loopback_port
from genmodels.config import FeaturizerParams, PrepareParams
from genmodels.progress import local_ray_env
from genmodels.data.shards import prepare_shards
from genmodels.stages.featurizer import train_featurizer
from tests.integration.mlflow_server import start_mlflow_server


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> Path:
    """The embedded default, prepared once per session into several shards per split."""
    out = tmp_path_factory.mktemp("mnist") / "shards"
    prepare_shards(PrepareParams(source="mnist5k", max_samples_per_shard=700), out)
    return out


@pytest.fixture
def project_copy(tmp_path, repo_root) -> Path:
    """The project's tracked and untracked-but-not-ignored files in a fresh git repo (what a clone of main holds)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo_root, check=True, capture_output=True, text=True,
    ).stdout.split("\0")
    dest = tmp_path / "project"
    for rel in filter(None, listed):
        if (repo_root / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / rel, dest / rel)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "copy of genmodels"]):
        subprocess.run(["git", *args], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def ray_runtime(request):
    # The controller polls its workers every 2 s (Ray's default); each poll costs CPU on 2 cores.
    # A module whose subject is when Train sees a report or a fault sets FAST_TRAIN_POLLS = True:
    # 0.2 s, so a checkpoint is registered and a failure noticed at the step the test expects.
    fast = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"} if getattr(request.module, "FAST_TRAIN_POLLS", False) else {}
    # After a failure, Train waits this long for each rank to leave its process group (Ray's
    # default 30 s); a frozen rank never does. Read by the controller, which inherits the
    # environment of the node, not the driver's: a cluster sets it where `ray start` runs.
    os.environ["TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"] = "3"
    # local_ray_env: as genmodels.cluster.ensure_ray does. A value set by whoever runs the tests wins.
    added = {k: v for k, v in {**fast, **local_ray_env()}.items() if k not in os.environ}
    os.environ.update(added)
    port = free_loopback_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # as genmodels.cluster.ensure_ray does, and why
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             logging_level="ERROR")
    yield
    ray.shutdown()
    del os.environ["RAY_API_SERVER_ADDRESS"]  # it overrides even an explicit --address (Ray's submission client)
    for key in added:  # a later module's `genmodels train` must show that it sets them itself (test_ux)
        del os.environ[key]


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="session")
def quick_featurizer(mnist_shards, tmp_path_factory):
    """One epoch of the domain classifier (6 s of CPU), once per test process; tests only read it."""
    out = tmp_path_factory.mktemp("featurizer")
    train_featurizer(FeaturizerParams(num_epochs=1), mnist_shards, out / "model", out / "featurizer.json")
    return out / "model"


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_url, quick_featurizer):
    """A project directory laid out as `dvc repro` leaves it before training: models/featurizer in place."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "featurizer").symlink_to(quick_featurizer)
    return tmp_path
