"""Ray Train DDP training for real: a local Ray runtime with 2 CPU workers, a real `mlflow server`.

Tiny models and few steps, with periodic evaluation on as in the shipped params; what is
asserted is the machinery: identical weights (and EMA statistics) on every rank, checkpoints
and exact resume with no step logged twice, a killed worker restarted, signals ending the
MLflow run as KILLED.
"""

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

from genmodels.config import PrepareParams, load_params, parse_params
from genmodels.data.shards import ShardError, prepare_shards
from genmodels.files import RunLocked
from genmodels.train.run import TrainError, train

TINY = {
    "num_workers": 2, "batch_size_per_worker": 32, "log_every_steps": 4, "sample_every_steps": 6,
    "checkpoint_every_steps": 4, "num_checkpoints_kept": 10, "max_failures": 0, "eval_every_steps": 6,
    "eval_num_samples": 50,
    "gan": {"width": 8, "num_steps": 12, "latent_dim": 16}, "vae": {"width": 8, "num_steps": 8, "latent_dim": 8},
}


def _params(**train):
    merged = {**TINY, **train}
    for family in ("gan", "vae"):
        merged[family] = {**TINY[family], **train.get(family, {})}
    return parse_params({"train": merged})


def _history(url, run_id, key):
    return [(m.step, m.value) for m in sorted(MlflowClient(url).get_metric_history(run_id, key), key=lambda m: m.step)]


def _train(project, mnist_shards, family="gan", featurizer_dir=None, **train_params):
    return train(_params(**train_params), family, shards=mnist_shards, models_dir=project / "models",
                 metrics_dir=project / "metrics", project_dir=project, featurizer_dir=featurizer_dir or project / "models" / "featurizer")


def test_gan_on_two_workers_logs_to_mlflow_and_keeps_ranks_identical(ray_runtime, project, mnist_shards, mlflow_url):
    summary = _train(project, mnist_shards, run_name="gan-basic")
    assert summary["step"] == 12 and summary["world_size"] == 2 and not summary["resumed"]
    final = project / "ray_results" / "gan-basic" / "step_00000012"
    digests = {p.read_text() for p in final.glob("weights_rank*.sha256")}
    assert len(list(final.glob("weights_rank*.sha256"))) == 2 and len(digests) == 1  # both ranks, same weights
    weights = torch.load(project / "models/gan/weights.pt", weights_only=True)
    assert set(weights) == {"generator", "discriminator"}
    run_id = json.loads((project / "models/gan/mlflow.json").read_text())["run_id"]
    assert summary["mlflow_run_id"] == run_id
    run = MlflowClient(mlflow_url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["gan.width"] == "8" and run.data.params["train.num_workers"] == "2"
    for tag in ("git.commit", "git.dirty", "data.manifest_sha256", "ray.version", "torch.version"):
        assert run.data.tags[tag]
    assert run.data.tags["ray.world_size"] == "2"
    for key in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake", "train/grad_norm_d", "train/img_per_s"):
        assert [step for step, _ in _history(mlflow_url, run_id, key)] == [4, 8, 12], key
    artifacts = [a.path for a in MlflowClient(mlflow_url).list_artifacts(run_id, "images")]
    assert any("samples" in path for path in artifacts), artifacts
    metrics = json.loads((project / "metrics/train_gan.json").read_text())
    assert metrics["step"] == 12 and "loss_d" in metrics
    curve = (project / "metrics/train_gan_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,loss_d,loss_g") and len(curve) == 4


def test_vae_trains_and_logs_reconstructions(ray_runtime, project, mnist_shards, mlflow_url):
    summary = _train(project, mnist_shards, family="vae", run_name="vae-basic", sample_every_steps=8)
    assert summary["step"] == 8
    run_id = summary["mlflow_run_id"]
    elbo = _history(mlflow_url, run_id, "train/elbo")
    assert [s for s, _ in elbo] == [4, 8]
    loss = _history(mlflow_url, run_id, "train/loss")
    assert all(v > 0 for _, v in loss) and loss[-1][1] < loss[0][1]  # nats per image, decreasing
    artifacts = " ".join(a.path for a in MlflowClient(mlflow_url).list_artifacts(run_id, "images"))
    assert "samples" in artifacts and "reconstructions" in artifacts
    assert set(torch.load(project / "models/vae/weights.pt", weights_only=True)) == {"vae"}


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
    assert _resumed_from(mlflow_url, run_id) == {8}
    _assert_equals_uninterrupted(project, mlflow_url, run_id, uninterrupted)


def test_killed_worker_is_restarted_and_the_run_completes(ray_runtime, project, mnist_shards, mlflow_url, uninterrupted, monkeypatch):
    monkeypatch.setenv("GENMODELS_CHAOS", f"kill:1:10:{project / 'kill-once'}")
    summary = _train(project, mnist_shards, run_name="gan-kill", max_failures=1)
    assert (project / "kill-once").exists()  # the worker really died at step 10
    assert summary["step"] == 12 and _resumed_from(mlflow_url, summary["mlflow_run_id"]) == {8}
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
    with pytest.raises(TrainError, match="rank 0|timed out|Timed out") as failed:
        _train(project, mnist_shards, run_name="gan-hung", collective_timeout_s=5)
    detected_s = time.time() - marker.stat().st_mtime  # from the SIGSTOP to the driver's error
    print(f"hung rank surfaced after {detected_s:.1f} s (collective_timeout_s=5): {failed.value}")
    assert 5 <= detected_s < 60, detected_s
    assert _frozen_ray_workers() == []  # the frozen rank was killed with its group, not left holding a CPU
    run_id = _run_named(mlflow_url, "gan-hung").info.run_id
    assert MlflowClient(mlflow_url).get_run(run_id).info.status == "FAILED"

    summary = _train(project, mnist_shards, run_name="gan-hung", collective_timeout_s=5)  # the marker stops a 2nd freeze
    assert summary["mlflow_run_id"] == run_id and _resumed_from(mlflow_url, run_id) == {4}
    _assert_equals_uninterrupted(project, mlflow_url, run_id, uninterrupted)


def test_resume_with_a_changed_config_is_refused(ray_runtime, project, mnist_shards):
    _train(project, mnist_shards, run_name="gan-config", gan={"num_steps": 4})
    with pytest.raises(TrainError, match=r"different config \(changed: gan.lr_g: 0.0002 -> 0.001\)"):
        _train(project, mnist_shards, run_name="gan-config", gan={"num_steps": 8, "lr_g": 1e-3})


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


def test_periodic_eval_is_spread_over_ranks_and_reported(ray_runtime, project, mnist_shards, mlflow_url, quick_featurizer):
    gan = _train(project, mnist_shards, run_name="gan-eval", eval_every_steps=6, eval_num_samples=101, featurizer_dir=quick_featurizer)
    fid = _history(mlflow_url, gan["mlflow_run_id"], "eval/fid")
    assert [s for s, _ in fid] == [6, 12] and all(v > 0 for _, v in fid)
    # 101 = 51 generated on rank 0 + 50 on rank 1, merged by all-reduce: both ranks did their share.
    assert [v for _, v in _history(mlflow_url, gan["mlflow_run_id"], "eval/num_generated")] == [101, 101]
    assert gan["eval/fid"] == fid[-1][1]  # what Ray (and so Tune) received at the last report

    vae = _train(project, mnist_shards, family="vae", run_name="vae-eval", eval_every_steps=4)
    elbo = _history(mlflow_url, vae["mlflow_run_id"], "eval/elbo")
    assert [s for s, _ in elbo] == [4, 8] and all(v < 0 for _, v in elbo)
    num_val = json.loads((mnist_shards / "manifest.json").read_text())["splits"]["val"]["num_samples"]
    assert [v for _, v in _history(mlflow_url, vae["mlflow_run_id"], "eval/num_val")] == [num_val, num_val]


def test_periodic_gan_fid_without_a_featurizer_says_what_to_do(ray_runtime, project, mnist_shards):
    with pytest.raises(FileNotFoundError, match="no trained domain classifier.*set train.eval_every_steps: 0"):
        _train(project, mnist_shards, eval_every_steps=6, featurizer_dir=project / "no-featurizer")


def test_wgan_gp_double_backward_works_under_ddp(ray_runtime, project, mnist_shards):
    summary = _train(project, mnist_shards, run_name="gan-wgan-gp",
                     gan={"loss": "wgan-gp", "d_norm": "layer", "spectral_norm": True, "d_steps_per_g_step": 2, "num_steps": 4})
    assert summary["step"] == 4
    final = project / "ray_results" / "gan-wgan-gp" / "step_00000004"
    assert len({p.read_text() for p in final.glob("weights_rank*.sha256")}) == 1


def test_vae_without_val_data_trains_and_skips_val_metrics(ray_runtime, project, tmp_path):
    shards = tmp_path / "no-val-shards"
    prepare_shards(PrepareParams(source="mnist5k", val_fraction=0.0), shards)
    summary = _train(project, shards, family="vae", run_name="vae-no-val", eval_every_steps=4)
    assert summary["step"] == 8 and "eval/elbo" not in summary


def test_a_failed_export_marks_the_run_failed(ray_runtime, project, mnist_shards, mlflow_url):
    (project / "not-a-dir").write_text("a file where models/ should be")
    with pytest.raises(OSError):
        train(_params(run_name="gan-export-fails", gan={"num_steps": 4}), "gan", shards=mnist_shards,
              models_dir=project / "not-a-dir", metrics_dir=project / "metrics", project_dir=project,
              featurizer_dir=project / "models" / "featurizer")
    run = _run_named(mlflow_url, "gan-export-fails")
    assert run.info.status == "FAILED"


def _run_named(url, run_name):
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("genmodels")
    runs = client.search_runs([experiment.experiment_id], f"tags.`ray.run_name` = '{run_name}'") if experiment else []
    return runs[0] if runs else None


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
