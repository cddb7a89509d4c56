import shutil
import subprocess
from pathlib import Path

import pytest

from genmodels.config import PrepareParams
from genmodels.data.shards import prepare_shards


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
