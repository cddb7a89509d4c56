"""Storage faults for real (issue 14): a `dvc repro` SIGKILLed mid-stage, and a disk that fills up
during `prepare` and during checkpointing (a small tmpfs that the test mounts: needs root).

Scenario 11: the next `dvc repro` recovers; no stale lock blocks it, no half-written output is
taken as valid, nothing the killed run wrote is left behind. Scenario 15: the error says which
disk is full, the previous outputs stay whole, and the run resumes once there is space.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from genmodels.config import PrepareParams, parse_params
from genmodels.data.shards import prepare_shards
from genmodels.files import staging_dir
from genmodels.train.run import TrainError, train
from tests.images import write_good_folder

FAST_TRAIN_POLLS = True  # the disk fills at a known checkpoint (conftest.ray_runtime)


def _poll(condition, *, timeout_s: float, what: str, process: subprocess.Popen | None = None, poll_s: float = 0.02):
    """Wait for `condition()` to hold (or return something truthy), failing after `timeout_s` or
    when `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert process is None or process.poll() is None, f"exited before {what}: {process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(poll_s)  # polling a condition with a deadline, not waiting out a race
    return value


def _shards_match_their_manifest(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    listed = [shard for split in manifest["splits"].values() for shard in split["shards"]]
    for shard in listed:
        data = (out / shard["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["num_bytes"], shard["sha256"]), shard["name"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(s["name"] for s in listed)])
    return manifest


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


# --- scenario 11: `dvc repro` SIGKILLed mid-stage -------------------------------------------------


@pytest.mark.slow  # ~20 s: three dvc commands, two prepares
def test_repro_sigkilled_mid_prepare_recovers_on_the_next_repro(project_copy):
    params_path = project_copy / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["prepare"].update(source="digits", max_samples_per_shard=50)  # 37 shards: a few seconds of writing
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    data = project_copy / "data"

    process = subprocess.Popen(["dvc", "repro", "prepare"], cwd=project_copy, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:  # the kill point: shard 0 written whole, shard 1 being written, into the staging directory
        _poll(lambda: list(data.glob(".shards.tmp-*/train-000001.tar")), timeout_s=120, what="second shard",
              process=process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # dvc and the prepare command it runs
        process.wait()
    [staged] = data.glob(".shards.tmp-*")
    assert not (data / "shards").exists()  # nothing half-written was published
    assert list(staged.glob("*.tar")) and not (staged / "manifest.json").exists()
    rwlock = json.loads((project_copy / ".dvc/tmp/rwlock").read_text())
    assert rwlock["write"][str(data / "shards")]["pid"] == process.pid  # the stale lock entry of the dead dvc
    assert "up to date" not in _dvc(project_copy, "status", "prepare")  # the stage still counts as not run

    start = time.monotonic()
    out = _dvc(project_copy, "repro", "prepare")
    recovery_s = time.monotonic() - start
    print(f"scenario 11: `dvc repro prepare` after the SIGKILL took {recovery_s:.1f} s")
    assert "Running stage 'prepare'" in out
    assert f"(Pid {process.pid}), in RWLock-file 'data/shards' had been killed. Auto removed it" in out
    manifest = _shards_match_their_manifest(data / "shards")
    assert manifest["source"] == "digits" and sum(s["num_samples"] for s in manifest["splits"].values()) == 1797
    assert sorted(p.name for p in data.iterdir()) == [".gitignore", "shards"]  # the killed run's staging dir is gone
    # Released: the write lock the dead dvc held. Its read entries (deps) stay in the file; DVC drops a
    # dead reader's entry only when it would block someone (as above), and readers never block readers.
    rwlock = json.loads((project_copy / ".dvc/tmp/rwlock").read_text())
    assert not rwlock.get("write") and {e["pid"] for entries in rwlock.get("read", {}).values() for e in entries} <= {process.pid}
    assert "up to date" in _dvc(project_copy, "status", "prepare")


def _dvc(cwd: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_a_writer_killed_between_its_two_renames_gets_its_output_back(tmp_path):
    """`replace_dir` moves the old output aside, then the new one in: killed in between, the
    target is missing and the old output sits in `.NAME.old-PID@HOST-*`. The next writer puts it back."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"{dead.pid}@{socket.gethostname()}"
    target = tmp_path / "shards"
    (tmp_path / f".shards.old-{owner}-abc" / "shards").mkdir(parents=True)
    (tmp_path / f".shards.old-{owner}-abc" / "shards" / "manifest.json").write_text("previous")
    (tmp_path / f".shards.tmp-{owner}-def").mkdir()  # the new output it was swapping in, never published
    alive = tmp_path / f".shards.tmp-{os.getpid()}@{socket.gethostname()}-ghi"  # a live writer's: left alone
    alive.mkdir()
    staged = staging_dir(target)
    assert (target / "manifest.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, staged.name, "shards"])


# --- scenario 15: out of space, on a real (small) filesystem -------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """mount(name, size_kib) -> a fresh tmpfs of that size under tmp_path; unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root")
    mounted = []

    def mount(name: str, size_kib: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _resize(disk: Path, size_kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(disk)], check=True)


def test_prepare_out_of_space_says_which_disk_and_keeps_the_previous_shards(tmp_path, small_disk, repo_root):
    disk = small_disk("disk", 1024)
    images = tmp_path / "images"
    write_good_folder(images)
    out = disk / "shards"

    def prepare(*sets: str) -> subprocess.CompletedProcess:
        args = [arg for value in sets for arg in ("--set", value)]
        return subprocess.run([sys.executable, "-m", "genmodels.cli", "prepare", "--params", str(repo_root / "params.yaml"),
                               "--out", str(out), *args], capture_output=True, text=True)

    first = prepare(f"prepare.source=folder:{images}", "prepare.image_size=16")  # 12 images: ~50 kB
    assert first.returncode == 0, first.stderr
    before, used = _tree_digest(out), os.statvfs(disk)

    full = prepare("prepare.source=digits")  # 1797 images: ~3.7 MB of shards for a 1 MB disk
    print(f"scenario 15 (prepare): {full.stderr.strip()}")
    assert full.returncode == 2, full.stdout + full.stderr
    assert f"genmodels prepare: error: prepare: No space left on device on the filesystem of {out} after writing" in full.stderr
    assert "previous shards left untouched" in full.stderr and "prepare elsewhere with --out" in full.stderr
    assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr
    assert _tree_digest(out) == before
    assert _shards_match_their_manifest(out)["source"] == f"folder:{images}"
    assert sorted(p.name for p in disk.iterdir()) == ["shards"]  # the partial new shards went
    after = os.statvfs(disk)
    assert (after.f_bfree, after.f_ffree) == (used.f_bfree, used.f_ffree)


# A checkpoint of the TINY GAN below (state.pt + rng + digest) is ~330 kB on tmpfs: 500 kB holds
# the one of step 2, not also the one of step 4.
CHECKPOINT_DISK_KIB = 500
TINY = {"num_workers": 1, "batch_size_per_worker": 16, "log_every_steps": 2, "sample_every_steps": 1000,
        "checkpoint_every_steps": 2, "num_checkpoints_kept": 10, "max_failures": 0, "eval_every_steps": 0,
        "gan": {"width": 8, "latent_dim": 16, "num_steps": 4}}


@pytest.mark.slow
def test_checkpoint_out_of_space_fails_clearly_keeps_the_last_checkpoint_and_resumes(ray_runtime, small_disk, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store: off the small disk
    shards = tmp_path / "shards"
    prepare_shards(PrepareParams(source="digits"), shards)
    disk = small_disk("checkpoints", CHECKPOINT_DISK_KIB)
    params = parse_params({"train": {**TINY, "storage_path": str(disk), "run_name": "gan-full-disk"}})

    def run():
        return train(params, "gan", shards=shards, models_dir=tmp_path / "models", metrics_dir=tmp_path / "metrics",
                     project_dir=tmp_path, featurizer_dir=tmp_path / "no-featurizer")

    # The worker holds at step 3 until Ray's controller has recorded step 2's checkpoint in its
    # snapshot, as when checkpoints are minutes apart: it is step 4's checkpoint that fills the
    # disk. (Ray rewrites that snapshot in place; docs/RELIABILITY.md says what a full disk at
    # that moment costs.)
    marker, snapshot = tmp_path / "pause-at-3", disk / "gan-full-disk" / "checkpoint_manager_snapshot.json"
    monkeypatch.setenv("GENMODELS_CHAOS", f"pause:0:3:{marker}")
    running = ThreadPoolExecutor(max_workers=1).submit(run)

    def paused_with_step_2_recorded() -> bool:
        assert not running.done(), f"training ended before step 2 was recorded: {running.result()}"
        return (marker.exists() and marker.read_text() == "pause at step 3\n" and snapshot.exists()
                and "step_00000002" in snapshot.read_text())

    try:
        _poll(paused_with_step_2_recorded, timeout_s=240, what="pause at step 3 with step 2's checkpoint recorded")
    finally:
        marker.write_text("go\n")  # the worker goes on (or, after a failed wait, ends instead of holding)
    with pytest.raises(TrainError) as raised:
        running.result(timeout=240)
    message = str(raised.value)
    print(f"scenario 15 (checkpoint): {message}")
    assert "No space left on device" in message, message
    assert f"checkpoints go to train.storage_path {disk} (" in message and "rerun with the same run name to resume" in message
    run_dir = disk / "gan-full-disk"
    # The run and its lock file (genmodels.files.run_lock): Ray's session and temp files live elsewhere.
    assert sorted(p.name for p in disk.iterdir()) == ["gan-full-disk", "gan-full-disk.lock"]
    kept = run_dir / "step_00000002" / "state.pt"
    assert torch.load(kept, weights_only=True)["step"] == 2, "the checkpoint persisted before the disk filled up"
    kept_stat, kept_sha = kept.stat(), hashlib.sha256(kept.read_bytes()).hexdigest()
    partial = run_dir / "step_00000004" / "state.pt"
    assert partial.stat().st_size < kept_stat.st_size, "step 4's checkpoint should not have fitted: resize the disk"
    tracking = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    [failed] = tracking.search_runs([tracking.get_experiment_by_name("genmodels").experiment_id])
    assert failed.info.status == "FAILED"

    _resize(disk, 4 * CHECKPOINT_DISK_KIB)
    summary = run()
    assert summary["resumed"] and summary["step"] == 4 and summary["mlflow_run_id"] == failed.info.run_id
    # Resumed from step 2, not retrained from scratch: step 2's checkpoint was not written again.
    assert (kept.stat().st_mtime_ns, hashlib.sha256(kept.read_bytes()).hexdigest()) == (kept_stat.st_mtime_ns, kept_sha)
    assert torch.load(partial, weights_only=True)["step"] == 4  # the partial one was overwritten whole
    assert tracking.get_run(failed.info.run_id).info.status == "FINISHED"
