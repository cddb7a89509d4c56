"""A real `dvc repro` / `dvc exp run` in a temporary git repo holding a copy of the project."""

import json
import subprocess


def _run(cwd, *args):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_repro_is_idempotent_and_exp_run_sets_params(project_copy):
    out = _run(project_copy, "dvc", "repro")
    assert "Running stage 'prepare'" in out
    manifest = json.loads((project_copy / "data/shards/manifest.json").read_text())
    assert manifest["source"] == "mnist5k" and manifest["image_size"] == 28
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == 5000
    lock = (project_copy / "dvc.lock").read_text()

    again = _run(project_copy, "dvc", "repro")
    assert "Running stage" not in again and "didn't change" in again
    assert (project_copy / "dvc.lock").read_text() == lock
    assert "up to date" in _run(project_copy, "dvc", "status")

    _run(project_copy, "git", "add", "-A")
    _run(project_copy, "git", "commit", "-q", "-m", "baseline")
    _run(project_copy, "dvc", "exp", "run", "-S", "prepare.image_size=32")
    manifest = json.loads((project_copy / "data/shards/manifest.json").read_text())
    assert manifest["image_size"] == 32 and manifest["params"]["image_size"] == 32
    assert "image_size: 32" in (project_copy / "params.yaml").read_text()


def test_repro_with_bad_params_fails_with_the_key(project_copy):
    params = project_copy / "params.yaml"
    params.write_text(params.read_text().replace("image_size: 28", 'image_size: "large"'))
    result = subprocess.run(["dvc", "repro"], cwd=project_copy, capture_output=True, text=True)
    assert result.returncode != 0
    assert 'prepare.image_size: expected an integer in [8, 512], got "large"' in result.stdout + result.stderr
