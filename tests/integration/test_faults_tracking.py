"""Issue 14, scenario 8: the MLflow server goes down mid-run, a real `mlflow server` killed by pid.

Within `train.tracking_outage_s` training goes on, rank 0 keeps the metric points and sends them
once the server is back: every step of every metric is logged exactly once. Past the bound,
training stops cleanly at a checkpoint that keeps the unsent points, and a rerun of the same
name resumes there and sends them. The outage starts at a known step: rank 0 holds at step 5
(GENMODELS_CHAOS=pause) while the test kills the server, then trains on.
"""

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch
from mlflow import MlflowClient

from genmodels.config import parse_params
from genmodels.train.run import TrainError, train
from tests.integration.mlflow_server import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FAST_TRAIN_POLLS = True  # the outage lands at a known step (conftest.ray_runtime)

NUM_STEPS = 16
TINY = {"num_workers": 1, "batch_size_per_worker": 32, "log_every_steps": 2, "sample_every_steps": 1000,
        "checkpoint_every_steps": 4, "num_checkpoints_kept": 10, "max_failures": 0, "eval_every_steps": 4,
        "vae": {"width": 8, "latent_dim": 8, "num_steps": NUM_STEPS}}
EXPECTED_STEPS = {"train/": list(range(2, NUM_STEPS + 1, 2)), "eval/": list(range(4, NUM_STEPS + 1, 4))}
TIMEOUT_S = 240.0
POLL_INTERVAL_S = 0.1


@pytest.fixture
def server(tmp_path, monkeypatch):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    yield server
    server.stop()


def _train(project, shards, **train_params) -> dict:
    params = parse_params({"train": {**TINY, **train_params}})
    return train(params, "vae", shards=shards, models_dir=project / "models", metrics_dir=project / "metrics",
                 project_dir=project, featurizer_dir=project / "no-featurizer")


def _wait_for(condition, what: str, running: Future) -> float:
    """Poll `condition` while training runs in the background; the time it took."""
    start = time.monotonic()
    while not condition():
        if running.done():
            running.result()  # raises the training's error, if any
            pytest.fail(f"training ended before {what}")
        assert time.monotonic() - start < TIMEOUT_S, f"no {what} after {TIMEOUT_S:.0f} s"
        time.sleep(POLL_INTERVAL_S)
    return time.monotonic() - start


def _down_mid_run(server, project, shards, monkeypatch, **train_params) -> tuple[Future, float]:
    """Start training in the background; kill the server while rank 0 holds at step 5 (steps 2
    and 4 logged), then let training go on. Returns the training and when the server went down."""
    marker = project / "pause-at-5"
    monkeypatch.setenv("GENMODELS_CHAOS", f"pause:0:5:{marker}")
    running = ThreadPoolExecutor(max_workers=1).submit(_train, project, shards, **train_params)
    _wait_for(marker.exists, "pause at step 5", running)
    server.kill()
    down_at = time.monotonic()
    marker.write_text("go\n")
    return running, down_at


def _assert_every_step_logged_once(client: MlflowClient, run_id: str) -> None:
    keys = client.get_run(run_id).data.metrics
    assert "train/loss" in keys and "eval/elbo" in keys, sorted(keys)
    for key in keys:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        expected = next(v for prefix, v in EXPECTED_STEPS.items() if key.startswith(prefix))
        assert sorted(steps) == expected, (key, sorted(steps))  # none missing, none twice


def _unsent(checkpoint) -> list:
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)["unsent_metrics"]


def test_server_down_then_back_within_the_bound_loses_no_metric(ray_runtime, server, mnist_shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "ray_results" / "vae-outage-back"
    running, down_at = _down_mid_run(server, tmp_path, mnist_shards, monkeypatch, run_name="vae-outage-back",
                                     tracking_outage_s=120)
    # Training goes on without the server: step 12's checkpoint is written while it is down.
    _wait_for((run_dir / "step_00000012" / "state.pt").exists, "checkpoint at step 12", running)
    trained_down_s = time.monotonic() - down_at
    server.start()
    summary = running.result(timeout=TIMEOUT_S)
    print(f"\nserver down {time.monotonic() - down_at:.1f} s in all (restart included); steps 6-12 trained in "
          f"{trained_down_s:.1f} s of it")

    assert summary["step"] == NUM_STEPS
    client = MlflowClient(server.url)
    _assert_every_step_logged_once(client, summary["mlflow_run_id"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    kept = _unsent(run_dir / "step_00000012")
    assert sorted({point[3] for point in kept}) == [6, 8, 10, 12]  # buffered from the first failed send on
    assert not _unsent(run_dir / f"step_{NUM_STEPS:08d}")  # the final flush went through before the last checkpoint
    outage = run.data.tags["genmodels.tracking.outage.step_6"]
    assert "metric points sent late" in outage
    print(f"{len(kept)} points kept in step 12's checkpoint; run tag: {outage}")


def test_server_down_past_the_bound_stops_at_a_kept_checkpoint_and_a_rerun_resumes(ray_runtime, server, mnist_shards,
                                                                                 tmp_path, monkeypatch):
    run_dir = tmp_path / "ray_results" / "vae-outage-stop"
    running, down_at = _down_mid_run(server, tmp_path, mnist_shards, monkeypatch, run_name="vae-outage-stop",
                                     num_workers=2, tracking_outage_s=2)
    with pytest.raises(TrainError, match=r"unreachable for \d+ s .*train.tracking_outage_s=2 s.*rerun with the same run name"
                       ) as stopped:
        running.result(timeout=TIMEOUT_S)
    print(f"\nstopped {time.monotonic() - down_at:.1f} s after the server went down: {stopped.value}")
    stop_step = int(str(stopped.value).split("at step ")[1].split(",")[0])
    checkpoint = run_dir / f"step_{stop_step:08d}"
    assert torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)["step"] == stop_step
    # The first failed send (step 6) took >= 2 s of MLflow's retries (LOGGING_HTTP): past the bound at step 8.
    assert stop_step < NUM_STEPS
    kept = _unsent(checkpoint)
    assert kept and min(point[3] for point in kept) == 6 and max(point[3] for point in kept) == stop_step

    server.start()
    monkeypatch.delenv("GENMODELS_CHAOS")
    rerun_at = time.monotonic()
    summary = _train(tmp_path, mnist_shards, run_name="vae-outage-stop", num_workers=2, tracking_outage_s=2)
    print(f"rerun resumed at step {stop_step} and finished in {time.monotonic() - rerun_at:.1f} s")
    assert summary["resumed"] and summary["step"] == NUM_STEPS
    client = MlflowClient(server.url)
    _assert_every_step_logged_once(client, summary["mlflow_run_id"])
    tags = client.get_run(summary["mlflow_run_id"]).data.tags
    assert f"genmodels.resumed_from.{stop_step}" in tags
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
