"""Faults in training, for real (docs/RELIABILITY.md, scenarios 1, 2, 4, 5, 12 and 13): a local Ray
with 2 CPU workers, a real `mlflow server`, faults injected with GENMODELS_CHAOS. Every recovered
run is compared with one uninterrupted run, loss by loss and tensor by tensor. A signalled or
killed driver: test_faults_driver.py."""

import contextlib
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from genmodels.config import PrepareParams
from genmodels.data.shards import ShardError, prepare_shards
from genmodels.train.run import TrainError, train
from tests.integration.test_train import _history, _params, _run_named, _train

FAST_TRAIN_POLLS = True  # a fault at step 10 finds step 4's or 8's checkpoint registered (conftest.ray_runtime)


@pytest.fixture(scope="module")
def uninterrupted(ray_runtime, mnist_shards, mlflow_url, quick_featurizer, tmp_path_factory):
    """The TINY GAN run trained once without a fault: what every recovered run must equal."""
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
        summary = train(_params(run_name="gan-reference"), "gan", shards=mnist_shards, models_dir=root / "models",
                        metrics_dir=root / "metrics", project_dir=root, featurizer_dir=quick_featurizer)
    return {"run_id": summary["mlflow_run_id"], "weights": torch.load(root / "models/gan/weights.pt", weights_only=True)}


def _assert_equals_uninterrupted(project, mlflow_url, run_id, uninterrupted):
    """Weights, optimizer, EMA, RNG and data position restored: the recovered run computed
    what the uninterrupted one did, step for step, and logged each step once."""
    for key in ("train/loss_d", "train/loss_g", "eval/fid"):
        assert _history(mlflow_url, run_id, key) == _history(mlflow_url, uninterrupted["run_id"], key), key
    weights = torch.load(project / "models/gan/weights.pt", weights_only=True)
    for module, state in uninterrupted["weights"].items():
        assert all(torch.equal(weights[module][k], v) for k, v in state.items()), module
    assert MlflowClient(mlflow_url).get_run(run_id).info.status == "FINISHED"


def _resumed_from(mlflow_url, run_id) -> set[int]:
    tags = MlflowClient(mlflow_url).get_run(run_id).data.tags
    return {int(k.rsplit(".", 1)[1]) for k in tags if k.startswith("genmodels.resumed_from.")}


@pytest.mark.slow
def test_stopped_run_resumes_exactly_with_periodic_eval_on_without_logging_a_step_twice(ray_runtime, project, mnist_shards, mlflow_url, uninterrupted, monkeypatch):
    monkeypatch.setenv("GENMODELS_CHAOS", f"raise:1:10:{project / 'fault-once'}")
    with pytest.raises(TrainError, match="injected failure on rank 1 at step 10"):
        _train(project, mnist_shards, run_name="gan-resume")
    run_id = MlflowClient(mlflow_url).search_runs(
        [MlflowClient(mlflow_url).get_experiment_by_name("genmodels").experiment_id],
        "tags.`ray.run_name` = 'gan-resume'")[0].info.run_id
    assert [s for s, _ in _history(mlflow_url, run_id, "train/loss_d")] == [4, 8]

    summary = _train(project, mnist_shards, run_name="gan-resume")  # same name: resume, marker stops a 2nd fault
    assert summary["resumed"] and summary["mlflow_run_id"] == run_id and summary["step"] == 12
    assert [s for s, _ in _history(mlflow_url, run_id, "train/loss_d")] == [4, 8, 12]
    assert _resumed_from(mlflow_url, run_id) in ({4}, {8})  # the latest checkpoint Train had registered
    _assert_equals_uninterrupted(project, mlflow_url, run_id, uninterrupted)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_the_run_completes(ray_runtime, project, mnist_shards, mlflow_url, uninterrupted, monkeypatch):
    monkeypatch.setenv("GENMODELS_CHAOS", f"kill:1:10:{project / 'kill-once'}")
    summary = _train(project, mnist_shards, run_name="gan-kill", max_failures=1)
    assert (project / "kill-once").exists()  # the worker really died at step 10
    # From the latest checkpoint Train had registered when the worker died: 8, or 4 if step 8's was still on its way.
    assert summary["step"] == 12 and _resumed_from(mlflow_url, summary["mlflow_run_id"]) in ({4}, {8})
    _assert_equals_uninterrupted(project, mlflow_url, summary["mlflow_run_id"], uninterrupted)


@pytest.mark.slow
def test_a_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(ray_runtime, project, mnist_shards, mlflow_url, uninterrupted, monkeypatch):
    monkeypatch.setenv("GENMODELS_CHAOS", f"tear:0:8:{project / 'tear-once'}")
    summary = _train(project, mnist_shards, run_name="gan-tear", max_failures=1)
    assert (project / "tear-once").exists()  # rank 0 died with step 8's state.pt half written
    assert summary["step"] == 12 and _resumed_from(mlflow_url, summary["mlflow_run_id"]) == {4}
    previous = torch.load(project / "ray_results/gan-tear/step_00000004/state.pt", weights_only=True)
    assert previous["step"] == 4
    _assert_equals_uninterrupted(project, mlflow_url, summary["mlflow_run_id"], uninterrupted)


def _frozen_ray_workers() -> list[int]:
    frozen = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] == "T" and b"ray::" in (stat.parent / "cmdline").read_bytes():
                frozen.append(int(stat.parent.name))
    return frozen


@pytest.mark.slow
def test_a_hung_rank_fails_the_run_within_the_collective_timeout_and_a_rerun_resumes(ray_runtime, project, mnist_shards, mlflow_url, uninterrupted, monkeypatch):
    marker = project / "stop-once"
    # At step 10: Train registers a checkpoint once its controller has polled every rank's report,
    # and a rank frozen right after its step-4 report (at 6) was seen to leave none registered.
    monkeypatch.setenv("GENMODELS_CHAOS", f"stop:1:10:{marker}")
    # gloo's two words for its timeout, under train.collective_timeout_s: which one depends on the collective hit
    with pytest.raises(TrainError, match="Timed out waiting 10000ms|Application timeout caused pair closure") as failed:
        _train(project, mnist_shards, run_name="gan-hung", collective_timeout_s=10)
    detected_s = time.time() - marker.stat().st_mtime  # from the SIGSTOP to the driver's error
    print(f"hung rank surfaced after {detected_s:.1f} s (collective_timeout_s=10): {failed.value}")
    assert 10 <= detected_s < 90, detected_s
    assert _frozen_ray_workers() == []  # the frozen rank was killed with its group, not left holding a CPU
    run_id = _run_named(mlflow_url, "gan-hung").info.run_id
    assert MlflowClient(mlflow_url).get_run(run_id).info.status == "FAILED"

    summary = _train(project, mnist_shards, run_name="gan-hung")  # the default timeout; the marker stops a 2nd freeze
    assert summary["mlflow_run_id"] == run_id and _resumed_from(mlflow_url, run_id) in ({4}, {8})
    _assert_equals_uninterrupted(project, mlflow_url, run_id, uninterrupted)


def test_more_workers_or_gpus_than_the_cluster_has_fails_fast(ray_runtime, project, mnist_shards):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"train.num_workers=16 x cpus_per_worker=1.0 needs \{'CPU': 16.0\}, but the Ray cluster has \{'CPU': 2.0\}"):
        _train(project, mnist_shards, num_workers=16)
    with pytest.raises(RuntimeError, match=r"needs \{'CPU': 2.0, 'GPU': 2.0\}, but the Ray cluster has \{'CPU': 2.0, 'GPU': 0.0\}"):
        _train(project, mnist_shards, use_gpu=True)
    assert time.monotonic() - started < 30  # no pending placement group
    assert {p.suffix for p in (project / "ray_results").iterdir()} == {".lock"}  # the runs' lock files: no run, no checkpoint


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "substituted"])
def test_a_damaged_shard_stops_the_run_before_it_starts_naming_the_shard(project, mnist_shards, mlflow_url, tmp_path, damage):
    shards = tmp_path / "shards"
    shutil.copytree(mnist_shards, shards)
    victim, other = sorted(shards.glob("train-*.tar"))[1], sorted(shards.glob("train-*.tar"))[0]
    data = bytearray(victim.read_bytes())
    if damage == "flipped-byte":
        data[len(data) // 2] ^= 0xFF
    victim.write_bytes({"flipped-byte": bytes(data), "truncated": bytes(data[:-512]), "substituted": other.read_bytes()}[damage])
    with pytest.raises(ShardError, match=rf"shard {re.escape(str(victim))}"):
        _train(project, shards, run_name=f"gan-{damage}")
    assert not (project / "ray_results").exists() and _run_named(mlflow_url, f"gan-{damage}") is None


@pytest.mark.timeout(300)  # a rank left without data would hang in the all-reduce: fail instead
@pytest.mark.slow
def test_one_shard_for_two_ranks_of_two_loader_workers_each_trains_in_step(ray_runtime, project, tmp_path):
    shards = tmp_path / "one-shard"
    prepare_shards(PrepareParams(source="digits", max_samples_per_shard=1_000_000, val_fraction=0.0), shards)
    assert len(list(shards.glob("train-*.tar"))) == 1  # fewer shards than ranks, not divisible by ranks x workers
    summary = _train(project, shards, family="vae", run_name="vae-one-shard", loader_workers=2, eval_every_steps=0)
    final = project / "ray_results" / "vae-one-shard" / "step_00000008"
    digests = [p.read_text() for p in final.glob("weights_rank*.sha256")]
    assert summary["step"] == 8 and len(digests) == 2 and len(set(digests)) == 1  # both ranks reached step 8, in step
