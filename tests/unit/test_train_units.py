"""Pure pieces of the training room: config rules, grids, checkpoint bundles, the job identity."""

import os

import numpy as np
import pytest
import torch

from genmodels.config import ConfigError, parse_params
from genmodels.data.transforms import image_grid
from genmodels.files import RunLocked, run_lock
from genmodels.train.checkpoint import StartFrom, bundle_dir, load_bundle, read_exported, weights_digest
from genmodels.train.chaos import Chaos
from genmodels.train.loop import TrainJob
from genmodels.train.run import _out_of_space_hint, ray_train_timeouts


def test_wgan_gp_with_batchnorm_critic_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r'train.gan: d_norm "batch" is invalid with loss "wgan-gp"'):
        parse_params({"train": {"gan": {"loss": "wgan-gp"}}})
    assert parse_params({"train": {"gan": {"loss": "wgan-gp", "d_norm": "layer"}}}).train.gan.loss == "wgan-gp"


def test_shipped_train_params_are_valid(repo_root):
    from genmodels.config import load_params

    train = load_params(repo_root / "params.yaml").train
    assert train.num_workers >= 1 and train.gan.num_steps >= 1 and train.vae.num_steps >= 1


def test_image_grid_places_images_row_major_with_padding():
    images = torch.full((3, 1, 2, 2), -1.0)
    images[1] = 1.0
    grid = image_grid(images, num_columns=2, padding=1)
    assert grid.shape == (1 + 2 * 3, 1 + 2 * 3) and grid.dtype == np.uint8
    assert grid[1:3, 4:6].min() == 255 and grid[1:3, 1:3].max() == 0 and grid[0].max() == 0
    assert image_grid(torch.zeros(1, 3, 4, 4)).shape == (8, 8, 3)


def _job(**train):
    params = parse_params({"train": train}).train
    return TrainJob(family="gan", params=params, shards="/s", manifest_sha256="abc", image_size=28, channels=1,
                    tracking_uri="sqlite:///x.db", run_id="r")


def test_run_identity_ignores_operational_keys_but_not_what_is_computed():
    base = _job()
    assert _job(log_every_steps=7, max_failures=3, gan={"num_steps": 9}).default_run_name() == base.default_run_name()
    assert _job(gan={"lr_g": 1e-3}).default_run_name() != base.default_run_name()
    assert _job(vae={"lr": 1e-2}).default_run_name() == base.default_run_name()  # the other family's params
    assert base.default_run_name().startswith("gan-")
    changed_code = base.model_copy(update={"code_sha256": "other"})
    assert changed_code.default_run_name() != base.default_run_name() and changed_code.identity() == base.identity()


def test_bundle_round_trip_restores_state_and_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.manual_seed(5)
    unsent = [("train/loss", 0.5, 1_700_000_000_123, 6)]  # a point an MLflow outage kept back
    with bundle_dir({"model": model, "opt": opt}, rank=0, step=7, epoch=1, config={"a": 1}, run_id="run",
                    unsent_metrics=unsent) as d:
        expected_noise = torch.rand(3)
        saved = {p.name: p.read_bytes() for p in d.iterdir()}
    for name, data in saved.items():
        (tmp_path / name).write_bytes(data)
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    torch.manual_seed(99)
    meta = load_bundle(tmp_path, {"model": fresh, "opt": fresh_opt}, rank=0, config={"a": 1})
    assert meta == {"step": 7, "epoch": 1, "mlflow_run_id": "run", "metrics": {}, "unsent_metrics": unsent}
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    assert torch.equal(torch.rand(3), expected_noise)  # the RNG continues where it was saved
    with pytest.raises(ValueError, match=r"different config \(changed: a: 1 -> 2\)"):
        load_bundle(tmp_path, {"model": fresh, "opt": fresh_opt}, rank=0, config={"a": 2})


def test_a_start_from_bundle_may_differ_in_named_keys_only_and_keeps_the_new_optimiser_settings(tmp_path):
    """PBT's exploit: the donor's weights and Adam moments, under the exploiting trial's mutated lr."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    donor = {"gan": {"lr_g": 1e-3, "width": 8}, "data": "x"}
    with bundle_dir({"model": model, "opt": opt}, rank=0, step=8, epoch=0, config=donor, run_id="r", metrics={"eval/fid": 3.0}) as d:
        start = StartFrom.from_directory(d, may_differ=("gan.lr_g",), label="trial a step 8", reseed=123)
        assert any(name.startswith("rng") for name in StartFrom.from_directory(d, may_differ=(), label="own").files)
    assert not any(name.startswith("rng") for name in start.files)  # an exploit does not replay the donor's noise
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=5e-4)
    mutated = {"gan": {"lr_g": 5e-4, "width": 8}, "data": "x"}
    meta = start.load({"model": fresh, "opt": fresh_opt}, rank=0, config=mutated)
    assert meta["step"] == 8 and meta["metrics"] == {"eval/fid": 3.0}
    assert weights_digest({"model": fresh}) == weights_digest({"model": model})
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert fresh_opt.param_groups[0]["lr"] == 5e-4  # not the donor's 1e-3
    drawn = torch.rand(2)  # rank 0 reseeded with reseed + rank
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(2))
    with pytest.raises(ValueError, match=r"changed: gan.width: 8 -> 16"):
        start.load({"model": fresh, "opt": fresh_opt}, rank=0, config={"gan": {"lr_g": 5e-4, "width": 16}, "data": "x"})


def test_digest_covers_the_ema_buffers_but_not_the_live_ones():
    live, ema = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    base = weights_digest({"generator": live, "ema": ema})
    live.running_mean += 1  # ranks' live statistics legitimately differ
    assert weights_digest({"generator": live, "ema": ema}) == base
    ema.running_mean += 1  # the EMA's standing statistics must not
    assert weights_digest({"generator": live, "ema": ema}) != base


def test_resume_identity_ignores_cpus_and_threads_per_worker():
    assert _job(cpus_per_worker=2.0, threads_per_worker=2).default_run_name() == _job().default_run_name()


def test_sync_batchnorm_on_cpu_is_refused_when_params_load():
    with pytest.raises(ConfigError, match="train: sync_batchnorm: true needs use_gpu: true"):
        parse_params({"train": {"sync_batchnorm": True}})
    assert parse_params({"train": {"sync_batchnorm": True, "use_gpu": True}}).train.sync_batchnorm


def test_chaos_spec_is_validated_once_on_the_driver(monkeypatch):
    monkeypatch.setenv("GENMODELS_CHAOS", "explode:1:x:/tmp/m")
    with pytest.raises(ValueError, match="GENMODELS_CHAOS='explode:1:x:/tmp/m': expected ACTION:RANK:STEP:MARKER_FILE"):
        Chaos.from_env()
    monkeypatch.setenv("GENMODELS_CHAOS", "kill:1:10:/tmp/m")
    assert Chaos.from_env() == Chaos("kill", 1, 10, "/tmp/m")
    monkeypatch.delenv("GENMODELS_CHAOS")
    assert Chaos.from_env() is None


def test_diverged_ranks_are_detected(tmp_path):
    model = torch.nn.Linear(2, 2)
    with bundle_dir({"m": model}, rank=0, step=1, epoch=0, config={}, run_id="r") as d:
        for p in d.iterdir():
            (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "weights_rank1.sha256").write_text(weights_digest({"m": model}))
    assert read_exported(tmp_path)["step"] == 1
    with torch.no_grad():
        model.weight += 1
    (tmp_path / "weights_rank1.sha256").write_text(weights_digest({"m": model}))
    with pytest.raises(RuntimeError, match="ranks hold different weights"):
        read_exported(tmp_path)


def test_a_run_lock_refuses_a_second_holder_until_the_first_lets_go(tmp_path):
    with run_lock(str(tmp_path), "gan-x", "train gan: run") as path:
        assert path == tmp_path / "gan-x.lock"
        with pytest.raises(RunLocked, match=rf"train gan: run 'gan-x' is already running \(pid {os.getpid()}@"):
            with run_lock(f"file://{tmp_path}", "gan-x", "train gan: run"):
                pass
        with run_lock(str(tmp_path), "gan-y", "train gan: run"):  # another name is another lock
            pass
    with run_lock(str(tmp_path), "gan-x", "train gan: run"):  # released on exit
        pass
    with run_lock("s3://bucket/runs", "gan-x", "train gan: run") as path:  # object stores have no locks
        assert path is None


def test_ray_train_timeouts_come_from_the_params():
    tp = parse_params({"train": {"collective_timeout_s": 5, "worker_health_timeout_s": 7}}).train
    assert ray_train_timeouts(tp) == {"RAY_TRAIN_COLLECTIVE_TIMEOUT_S": "5.0", "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": "7.0",
                                      "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60.0"}


def test_out_of_space_names_the_checkpoint_disk_whether_a_worker_or_the_controller_hit_it(tmp_path):
    """The full disk is reported by whichever hits it first: a worker writing its checkpoint or the
    controller writing its snapshot of them; both get the hint (scenario 15 once met the second)."""
    import errno

    from ray.train import ControllerError, WorkerGroupError

    full = OSError(errno.ENOSPC, "Error writing bytes to file")
    by_worker, by_controller = (_out_of_space_hint(err, str(tmp_path), "gan-1") for err in
                                (WorkerGroupError("w", {0: full}), ControllerError(full)))
    for hint in (by_worker, by_controller):
        assert f"checkpoints go to train.storage_path {tmp_path} (" in hint, hint
    # Only the controller writes Ray's record of the checkpoints, in place: that file is named.
    snapshot = f"{tmp_path}/gan-1/checkpoint_manager_snapshot.json"
    assert snapshot in by_controller and snapshot not in by_worker
    assert _out_of_space_hint(ControllerError(RuntimeError("other")), str(tmp_path), "gan-1") == ""
