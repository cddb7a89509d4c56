"""What a user sees: `genmodels train` as a real process whose output is not a terminal (as under
`dvc repro` into a file or CI), and `genmodels status` where nothing has run yet.

No `ray_runtime` here: `genmodels train` starts and stops its own local Ray, as it does for a user.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow  # each test here starts Ray, dvc or servers: 10 s to minutes on 2 cores

TRAIN = {"num_workers": 2, "batch_size_per_worker": 32, "log_every_steps": 4, "sample_every_steps": 100,
         "checkpoint_every_steps": 4, "eval_every_steps": 4, "eval_num_samples": 50, "max_failures": 1,
         "gan": {"width": 8, "latent_dim": 16, "num_steps": 12}}
PROGRESS = re.compile(r"^train gan  step (\d+)/(\d+) ")


def _train(project, mnist_shards, *args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GENMODELS_VERBOSE")}
    done = subprocess.run([sys.executable, "-m", "genmodels.cli", "train", "gan", "--shards", str(mnist_shards), *args],
                          cwd=project, capture_output=True, text=True, timeout=300, env={**environ, **env})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shown = done.stderr.splitlines()  # the progress display's; stdout has the header and the footer
    return done.stdout.splitlines(), shown, [(int(m.group(1)), int(m.group(2))) for line in shown if (m := PROGRESS.match(line))]


def test_train_shows_rank_zero_progress_quietly_and_a_worker_error_with_its_message(project, mnist_shards, tmp_path):
    (project / "params.yaml").write_text(yaml.safe_dump({"train": TRAIN}))
    said, shown, steps = _train(project, mnist_shards)
    assert steps == [(4, 12), (8, 12), (12, 12)], shown  # rank 0's numbers (of 2 ranks), once per log interval
    assert len(shown) <= 2 * len(steps), shown
    assert said[0].startswith("train gan: run 'gan-") and "(new), 2 worker(s), 12 steps; MLflow run " in said[0], said
    assert said[-1].startswith("train gan: 12 steps in "), said
    assert all(line.startswith(("🏃 View run", "🧪 View experiment")) for line in said[1:-1]), said  # MLflow's links
    for number in ("loss_d ", "loss_g ", "img/s ", "fid ", "eta "):
        assert number in shown[0], shown
    for internal in ("TrainingReport(", "PreemptionWatcher", "Started training worker group", "Requesting resources"):
        assert internal not in "\n".join(said + shown)

    # Extended by 8 steps, rank 1 fails at step 14; Train restarts the group from step 12 (max_failures: 1).
    said, shown, steps = _train(project, mnist_shards, "--set", "train.gan.num_steps=20",
                                GENMODELS_CHAOS=f"raise:1:14:{tmp_path / 'once'}")
    assert "(resumed), 2 worker(s), 20 steps" in said[0], said
    assert "train gan: rank 1 failed: RuntimeError('GENMODELS_CHAOS: injected failure on rank 1 at step 14')" in shown, shown
    assert "train gan: restarted at step 12" in shown, shown
    assert steps == [(16, 20), (20, 20)], shown


def test_status_of_an_empty_project_says_what_to_run_first(tmp_path):
    done = subprocess.run([sys.executable, "-m", "genmodels.cli", "status"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nothing here yet" in done.stdout and "make run" in done.stdout


def test_status_of_a_partial_project_says_what_is_missing_and_creates_no_store(tmp_path, mnist_shards):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shards").symlink_to(mnist_shards)
    model = tmp_path / "models" / "gan"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"run_name": "gan-0123456789", "weights_sha256": "0" * 64}))
    (model / "mlflow.json").write_text(json.dumps({"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "run_id": "0" * 32}))
    done = subprocess.run([sys.executable, "-m", "genmodels.cli", "status"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "mnist5k, 28x28x1" in out and "featurizer not trained: dvc repro featurizer" in out
    assert "run 'gan-0123456789'" in out and "not evaluated: dvc repro evaluate@gan" in out
    assert "vae        not trained: dvc repro train@vae" in out
    assert not (tmp_path / "mlruns.db").exists()  # looking created no tracking store
