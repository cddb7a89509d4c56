"""Ray Train DDP training for real: a local Ray runtime with 2 CPU workers, a real `mlflow server`.

Tiny models and few steps, with periodic evaluation on as in the shipped params; what is
asserted is the machinery: identical weights (and EMA statistics) on every rank, checkpoints,
periodic evaluation spread over the ranks, a changed config refused on resume, a failed export
ending the MLflow run as FAILED. Faults and recovery: test_faults_train.py.
"""

import json

import pytest
import torch
from mlflow import MlflowClient

from genmodels.config import PrepareParams, parse_params
from genmodels.data.shards import prepare_shards
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


@pytest.mark.slow
def test_gan_on_two_workers_logs_to_mlflow_keeps_ranks_identical_and_spreads_periodic_eval(ray_runtime, project, mnist_shards, mlflow_url):
    summary = _train(project, mnist_shards, run_name="gan-basic", eval_num_samples=101)
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

    fid = _history(mlflow_url, run_id, "eval/fid")
    assert [s for s, _ in fid] == [6, 12] and all(v > 0 for _, v in fid)
    # 101 = 51 generated on rank 0 + 50 on rank 1, merged by all-reduce: both ranks did their share.
    assert [v for _, v in _history(mlflow_url, run_id, "eval/num_generated")] == [101, 101]
    assert summary["eval/fid"] == fid[-1][1]  # what Ray (and so Tune) received at the last report
    # genmodels reads its own shards: Train started no Ray Data actor beside the run (dead ones are listed too).
    from ray.util.state import list_actors

    assert not list_actors(filters=[("class_name", "=", "DatasetManager")])
    assert list_actors(filters=[("class_name", "=", "TrainController")])  # the query does see this run's actors


def test_vae_trains_logs_reconstructions_and_periodic_val_elbo(ray_runtime, project, mnist_shards, mlflow_url):
    summary = _train(project, mnist_shards, family="vae", run_name="vae-basic", sample_every_steps=8, eval_every_steps=4)
    assert summary["step"] == 8
    run_id = summary["mlflow_run_id"]
    elbo = _history(mlflow_url, run_id, "train/elbo")
    assert [s for s, _ in elbo] == [4, 8]
    loss = _history(mlflow_url, run_id, "train/loss")
    assert all(v > 0 for _, v in loss) and loss[-1][1] < loss[0][1]  # nats per image, decreasing
    artifacts = " ".join(a.path for a in MlflowClient(mlflow_url).list_artifacts(run_id, "images"))
    assert "samples" in artifacts and "reconstructions" in artifacts
    assert set(torch.load(project / "models/vae/weights.pt", weights_only=True)) == {"vae"}
    elbo = _history(mlflow_url, run_id, "eval/elbo")
    assert [s for s, _ in elbo] == [4, 8] and all(v < 0 for _, v in elbo)
    num_val = json.loads((mnist_shards / "manifest.json").read_text())["splits"]["val"]["num_samples"]
    assert [v for _, v in _history(mlflow_url, run_id, "eval/num_val")] == [num_val, num_val]


def test_periodic_gan_fid_without_a_featurizer_says_what_to_do(ray_runtime, project, mnist_shards):
    with pytest.raises(FileNotFoundError, match="no trained domain classifier.*set train.eval_every_steps: 0"):
        _train(project, mnist_shards, eval_every_steps=6, featurizer_dir=project / "no-featurizer")


def test_wgan_gp_double_backward_works_under_ddp_and_a_resume_with_a_changed_config_is_refused(ray_runtime, project, mnist_shards):
    wgan = {"loss": "wgan-gp", "d_norm": "layer", "spectral_norm": True, "d_steps_per_g_step": 2, "num_steps": 4}
    summary = _train(project, mnist_shards, run_name="gan-wgan-gp", gan=wgan)
    assert summary["step"] == 4
    final = project / "ray_results" / "gan-wgan-gp" / "step_00000004"
    assert len({p.read_text() for p in final.glob("weights_rank*.sha256")}) == 1
    # More steps would resume the run; a changed learning rate is refused, never mixed into it.
    with pytest.raises(TrainError, match=r"different config \(changed: gan.lr_g: 0.0002 -> 0.001\)"):
        _train(project, mnist_shards, run_name="gan-wgan-gp", gan={**wgan, "num_steps": 8, "lr_g": 1e-3})


def test_vae_without_val_data_trains_and_skips_val_metrics(ray_runtime, project, tmp_path):
    shards = tmp_path / "no-val-shards"
    prepare_shards(PrepareParams(source="mnist5k", val_fraction=0.0), shards)
    summary = _train(project, shards, family="vae", run_name="vae-no-val", eval_every_steps=4, num_workers=1)
    assert summary["step"] == 8 and "eval/elbo" not in summary


def test_a_failed_export_marks_the_run_failed(ray_runtime, project, mnist_shards, mlflow_url):
    (project / "not-a-dir").write_text("a file where models/ should be")
    with pytest.raises(OSError):
        train(_params(run_name="gan-export-fails", num_workers=1, gan={"num_steps": 4}), "gan", shards=mnist_shards,
              models_dir=project / "not-a-dir", metrics_dir=project / "metrics", project_dir=project,
              featurizer_dir=project / "models" / "featurizer")
    run = _run_named(mlflow_url, "gan-export-fails")
    assert run.info.status == "FAILED"


def _run_named(url, run_name):
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("genmodels")
    runs = client.search_runs([experiment.experiment_id], f"tags.`ray.run_name` = '{run_name}'") if experiment else []
    return runs[0] if runs else None
