"""Shared test setup: quiet, offline, single-threaded, CPU only, tiny sizes.

The environment below mirrors `.ci/run` so that a test run from an IDE behaves like CI.
"""

import os
import sys
from pathlib import Path

import pytest

for key, value in {
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "genmodels-tests",
    "GIT_AUTHOR_EMAIL": "tests@genmodels.invalid",
    "GIT_COMMITTER_NAME": "genmodels-tests",
    "GIT_COMMITTER_EMAIL": "tests@genmodels.invalid",
    "CUDA_VISIBLE_DEVICES": "",
}.items():
    os.environ.setdefault(key, value)
# Subprocesses (dvc, genmodels) must find this venv's executables first.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)  # two threads per process on 2 cores ran 3x slower

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


# The slowest modules, slowest first, by their wall time in two test processes (test_dvc is one
# test of 4 minutes beside the others). xdist hands out whole modules in collection order
# (pyproject's --no-loadscope-reorder), the next one to a process as soon as its current one has
# two tests or fewer left, so none of these starts last and both processes end on small modules.
HEAVIEST_FIRST = ["test_dvc", "test_faults_train", "test_tune", "test_train", "test_cluster", "test_faults_driver",
                  "test_tune_driver", "test_faults_tracking", "test_ux", "test_evaluate", "test_bench_quality",
                  "test_registry", "test_faults_storage", "test_faults_secrets", "test_tracking_load"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.stem
        return HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST)

    items.sort(key=rank)  # stable: within a module, the written order
