"""Faults in training, for real (docs/RELIABILITY.md, scenarios 1-5, 10, 12 and 13): a local Ray
with 2 CPU workers, a real `mlflow server`, real signals to real processes, faults injected with
GENMODELS_CHAOS. Every recovered run is compared with one uninterrupted run, loss by loss and
tensor by tensor."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from genmodels.config import PrepareParams, load_params
from genmodels.data.shards import ShardError, prepare_shards
from genmodels.files import RunLocked
from genmodels.train.run import TrainError, train
from tests.integration.test_train import TINY, _history, _params, _run_named, _train


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


def test_killed_worker_is_restarted_and_the_run_completes(ray_runtime, project, mnist_shards, mlflow_url, uninterrupted, monkeypatch):
    monkeypatch.setenv("GENMODELS_CHAOS", f"kill:1:10:{project / 'kill-once'}")
    summary = _train(project, mnist_shards, run_name="gan-kill", max_failures=1)
    assert (project / "kill-once").exists()  # the worker really died at step 10
    # From the latest checkpoint Train had registered when the worker died: 8, or 4 if step 8's was still on its way.
    assert summary["step"] == 12 and _resumed_from(mlflow_url, summary["mlflow_run_id"]) in ({4}, {8})
    _assert_equals_uninterrupted(project, mlflow_url, summary["mlflow_run_id"], uninterrupted)


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


def test_a_hung_rank_fails_the_run_within_the_collective_timeout_and_a_rerun_resumes(ray_runtime, project, mnist_shards, mlflow_url, uninterrupted, monkeypatch):
    marker = project / "stop-once"
    monkeypatch.setenv("GENMODELS_CHAOS", f"stop:1:6:{marker}")
    with pytest.raises(TrainError, match="Timed out waiting 10000ms") as failed:  # gloo, under train.collective_timeout_s
        _train(project, mnist_shards, run_name="gan-hung", collective_timeout_s=10)
    detected_s = time.time() - marker.stat().st_mtime  # from the SIGSTOP to the driver's error
    print(f"hung rank surfaced after {detected_s:.1f} s (collective_timeout_s=10): {failed.value}")
    assert 10 <= detected_s < 90, detected_s
    assert _frozen_ray_workers() == []  # the frozen rank was killed with its group, not left holding a CPU
    run_id = _run_named(mlflow_url, "gan-hung").info.run_id
    assert MlflowClient(mlflow_url).get_run(run_id).info.status == "FAILED"

    summary = _train(project, mnist_shards, run_name="gan-hung")  # the default timeout; the marker stops a 2nd freeze
    assert summary["mlflow_run_id"] == run_id and _resumed_from(mlflow_url, run_id) == {4}
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
def test_one_shard_for_two_ranks_of_two_loader_workers_each_trains_in_step(ray_runtime, project, tmp_path):
    shards = tmp_path / "one-shard"
    prepare_shards(PrepareParams(source="digits", max_samples_per_shard=1_000_000, val_fraction=0.0), shards)
    assert len(list(shards.glob("train-*.tar"))) == 1  # fewer shards than ranks, not divisible by ranks x workers
    summary = _train(project, shards, family="vae", run_name="vae-one-shard", loader_workers=2, eval_every_steps=0)
    final = project / "ray_results" / "vae-one-shard" / "step_00000008"
    digests = [p.read_text() for p in final.glob("weights_rank*.sha256")]
    assert summary["step"] == 8 and len(digests) == 2 and len(set(digests)) == 1  # both ranks reached step 8, in step


@pytest.mark.parametrize("signum,exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_driver_ends_the_run_as_killed(project, mnist_shards, mlflow_url, signum, exit_code):
    """A real `genmodels train` process with its own Ray, signalled mid-training."""
    run_name = f"gan-signal-{signum}"
    params = {"train": {**TINY, "num_workers": 1, "run_name": run_name, "checkpoint_every_steps": 1000,
                        "log_every_steps": 1, "gan": {**TINY["gan"], "num_steps": 100_000}}}
    (project / "params.yaml").write_text(json.dumps(params))
    process = subprocess.Popen(
        [sys.executable, "-m", "genmodels.cli", "train", "gan", "--shards", str(mnist_shards)],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not ((run := _run_named(mlflow_url, run_name)) and "train/loss_d" in run.data.metrics):
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.5)  # polling the tracking server for a condition, not waiting out a race
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == exit_code, output[-3000:]
    assert MlflowClient(mlflow_url).get_run(run.info.run_id).info.status == "KILLED"


def _group_members(pgid: int) -> list[int]:
    members = []
    for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pgid:
                members.append(pid)
    return members


def test_a_sigkilled_driver_is_resumed_by_running_the_command_again(project, mnist_shards, mlflow_url):
    """SIGKILL, which no handler sees (the OOM killer, a lost login node): the MLflow run stays
    RUNNING until the same command runs again, finds it by its run key and resumes it."""
    run_name = "gan-driver-kill"

    def command(num_steps: int) -> list[str]:
        params = {"train": {**TINY, "num_workers": 1, "run_name": run_name, "log_every_steps": 1, "eval_every_steps": 0,
                            "sample_every_steps": 1000, "gan": {**TINY["gan"], "num_steps": num_steps}}}
        (project / "params.yaml").write_text(json.dumps(params))
        return [sys.executable, "-m", "genmodels.cli", "train", "gan", "--shards", str(mnist_shards)]

    process = subprocess.Popen(command(24), cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    storage = project / "ray_results" / run_name
    try:
        deadline = time.monotonic() + 180
        while not (storage / "checkpoint_manager_snapshot.json").exists():  # Train's record of a registered checkpoint
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint was ever registered"
            time.sleep(0.2)  # polling the filesystem for a condition, not waiting out a race
        with pytest.raises(RunLocked, match=rf"train gan: run '{run_name}' is already running \(pid {process.pid}@"):
            train(load_params(project / "params.yaml"), "gan", shards=mnist_shards, project_dir=project)
        process.kill()  # the driver alone
        process.wait(timeout=30)
        deadline = time.monotonic() + 60
        while _group_members(process.pid):  # the local Ray dies with its driver (genmodels.cluster's reaper)
            assert time.monotonic() < deadline, "the killed driver's local Ray outlived it: " + str([(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:200]) for pid in _group_members(process.pid)])
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # only when an assertion above failed
    run = _run_named(mlflow_url, run_name)
    assert run.info.status == "RUNNING"

    rerun = subprocess.run(command(28), cwd=project, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "(resumed)" in rerun.stdout
    assert json.loads((project / "models/gan/mlflow.json").read_text())["run_id"] == run.info.run_id
    resumed_at = _resumed_from(mlflow_url, run.info.run_id)
    assert len(resumed_at) == 1 and 0 < min(resumed_at) <= 24  # from the checkpoint it had, not from scratch
    assert [s for s, _ in _history(mlflow_url, run.info.run_id, "train/loss_d")] == list(range(1, 29))
    assert MlflowClient(mlflow_url).get_run(run.info.run_id).info.status == "FINISHED"
