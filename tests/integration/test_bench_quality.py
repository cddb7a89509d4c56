"""`bench/quality.py --smoke`: the whole side-by-side machinery (prepare, featurizer, the default
through `genmodels train` on Ray, both baselines, scoring, table and picture) in seconds. It
checks the structure of what the bench writes, never its numbers."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

METRICS = {"fid", "fid_bootstrap_std", "kid", "precision", "recall", "density", "coverage", "classes_under_half_share",
           "wall_s", "num_steps"}
VAE_BOUNDS = {"neg_elbo_bce", "neg_iwae_bce", "neg_elbo_binarised"}


def test_smoke_run_writes_a_side_by_side_table_results_and_grids(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "bench/quality.py", "--smoke", "--out", str(tmp_path)], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"gan", "vae"}
    for family, result in results.items():
        expected = METRICS | (VAE_BOUNDS if family == "vae" else set())
        for run in (result, result["shipped"]):  # at the budget; at the shipped num_steps' wall time (a snapshot)
            assert expected <= set(run["default"]) and expected <= set(run["baseline"]), family
            assert run["baseline"]["wall_s"] >= run["budget_s"]
        assert result["default"]["num_steps"] == 4
        assert result["shipped"]["baseline"]["num_steps"] < result["baseline"]["num_steps"]
        assert result["shipped"]["baseline"]["fid"] != result["baseline"]["fid"]  # a copy, not the model trained on

    table = (tmp_path / "table.md").read_text().splitlines()
    assert "| family | budget | metric | default | baseline | default / baseline |" in table
    rows = [line.split("|")[1:-1] for line in table if line.startswith("| gan ") or line.startswith("| vae ")]
    assert all(len(row) == 6 for row in rows)
    shown = {(family.strip(), "shipped" in budget, metric.strip()) for family, budget, metric, *_ in rows}
    for shipped in (False, True):
        assert {("gan", shipped, m) for m in METRICS} | {("vae", shipped, m) for m in METRICS | VAE_BOUNDS} <= shown
    assert "\n".join(table) in done.stdout  # printed as written
    targets = [line.split(":")[0].split(" (")[0] for line in table if line.startswith("target ")]
    assert targets == ["target gan fid", "target gan fid at the shipped num_steps' wall time", "target vae fid",
                       "target vae neg_elbo_bce"]

    width, height = Image.open(tmp_path / "grids.png").size
    assert width > 2 * 8 * 28 and height > 2 * 8 * 28  # per family a row: default's grid, baseline's grid


def test_the_baselines_copy_is_never_its_final_model(repo_root, mnist_shards):
    """One step that passes a snapshot's time and the budget at once (a loaded machine) gets one
    step more, so the copy and the final model differ; it made the smoke run above flaky."""
    import importlib.util
    import time

    from torch import nn

    spec = importlib.util.spec_from_file_location("bench_quality", repo_root / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    out = quality._train_for(0.2, mnist_shards, 0, lambda batch: time.sleep(0.3), nn.Linear(1, 1), snapshot_s=(0.1,))
    assert [info["num_steps"] for _, info in out] == [1, 2]  # a step that takes 0.3 s, not a wait for anything
