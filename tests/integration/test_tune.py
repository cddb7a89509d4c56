"""Ray Tune sweeps for real: trials are Ray Train runs on a local 2-CPU Ray, logged to a real
`mlflow server`; tiny models, 1-worker trials (two run side by side), periodic FID on as shipped.

What is asserted is the machinery: early stopping and the resources it frees, the MLflow parent
and children, the best-config overlay and the command that trains with it, Optuna's proposals,
a PBT exploit that really starts from the donor's weights, and the preflight. A killed or
interrupted driver: test_tune_driver.py.
"""

import json
import time

import pytest
import yaml
from mlflow import MlflowClient

from genmodels.cli import main
from genmodels.config import load_params, parse_params
from genmodels.tune import SweepError, tune

# ASHA and PBT act on a report before the trial runs on past it (conftest.ray_runtime).
FAST_TRAIN_POLLS = True


TRIAL = {
    "num_workers": 1, "batch_size_per_worker": 32, "log_every_steps": 4, "sample_every_steps": 100,
    "checkpoint_every_steps": 4, "eval_every_steps": 4, "eval_num_samples": 50, "num_checkpoints_kept": 10,
    "max_failures": 0, "gan": {"width": 8, "latent_dim": 16, "num_steps": 16},
}


SPACE = {"gan": {"train.gan.lr_g": {"loguniform": [0.00001, 0.01]}, "train.gan.lr_d": {"loguniform": [0.00001, 0.01]}}}


def _params(**tune_section):
    return parse_params({"train": TRIAL, "tune": {"num_samples": 4, "grace_period": 4, "space": SPACE, **tune_section}})


def _runs(url, sweep_name):
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("genmodels")
    if experiment is None:  # nothing logged yet
        return [], []
    runs = client.search_runs([experiment.experiment_id], f"tags.`tune.sweep` = '{sweep_name}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _steps(url, run_id, key="eval/fid"):
    return [m.step for m in sorted(MlflowClient(url).get_metric_history(run_id, key), key=lambda m: m.step)]


def _live_sweep_resources(timeout_s=60.0):
    """Poll Ray's state API until no Train/Tune actor and no placement group is alive; return what is left."""
    from ray.util.state import list_actors, list_placement_groups

    kinds = ("TrainController", "RayTrainWorker", "ImplicitFunc", "run_trial", "_QueueActor")
    deadline = time.monotonic() + timeout_s
    while True:
        actors = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name.startswith(kinds)]
        groups = [g.placement_group_id for g in list_placement_groups() if g.state in ("CREATED", "PENDING", "RESCHEDULING")]
        if (not actors and not groups) or time.monotonic() > deadline:
            return actors, groups
        time.sleep(0.5)  # polling Ray's state for a condition, with a deadline


@pytest.mark.slow
def test_optuna_asha_sweep_stops_trials_early_logs_parent_and_children_and_writes_a_usable_best_config(
        ray_runtime, project, mnist_shards, mlflow_url, capsys):
    # Optuna's TPE proposes, ASHA stops (as a user combines them). TPE draws at random until
    # max(2, num_samples // 4) = 2 trials have finished, so with 2 trials at once only the fourth
    # is sure to come from its model; every result goes back into it.
    params = _params(search="optuna", scheduler="asha", grace_period=4, reduction_factor=2, name="gan-asha")
    started = time.monotonic()
    summary = tune(params, "gan", shards=mnist_shards, out_dir=project / "tune", project_dir=project,
                   featurizer_dir=project / "models" / "featurizer")
    wall_s = time.monotonic() - started
    out = capsys.readouterr().out
    assert "2 concurrent trial(s) of 1 worker(s)" in out  # max_concurrent_trials: 0 resolved to what fits on 2 CPUs
    assert summary["num_trials"] == 4 and summary["errors"] == 0
    assert summary["stopped_early"] >= 1, summary
    # One line per trial event, in place of Tune's status tables.
    events = [line for line in out.splitlines() if line.startswith("tune gan: trial ")]
    assert sum(" started: lr_g " in line for line in events) == 4, out
    assert sum(" stopped early at step " in line for line in events) == summary["stopped_early"], out
    assert sum(" finished at step 16: eval/fid " in line for line in events) == 4 - summary["stopped_early"], out
    assert "Trial status" not in out and "Current time" not in out, out

    # Stopped trials released their Train actors and placement groups.
    actors, groups = _live_sweep_resources()
    assert not actors and not groups, f"still alive after the sweep: actors {actors}, placement groups {groups}"

    parents, children = _runs(mlflow_url, summary["sweep"])
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.params["tune.scheduler"] == "asha" and parent.data.params["tune.num_steps"] == "16"
    assert parent.data.params["tune.space.train.gan.lr_g"] == "loguniform[1e-05, 0.01]"
    assert parent.data.metrics["best/eval/fid"] == pytest.approx(summary["best_metric"])
    artifacts = {a.path for a in MlflowClient(mlflow_url).list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "metric_vs_step.png", "gan_best.yaml"} <= artifacts
    stopped = [c for c in children if c.data.tags["tune.stopped_early"] == "true"]
    assert len(stopped) == summary["stopped_early"]
    for child in stopped:  # stopped at the step ASHA judged: nothing trained or logged after it
        last = int(child.data.tags["tune.last_step"])
        assert _steps(mlflow_url, child.info.run_id, "train/loss_d")[-1] == last
        run_dir = project / "ray_results" / f"{summary['sweep']}.trials" / child.data.tags["ray.run_name"]
        assert max(int(p.name.removeprefix("step_")) for p in run_dir.glob("step_*")) == last
    for child in children:  # each child logs what a training run logs, no step twice
        steps = _steps(mlflow_url, child.info.run_id)
        assert steps == sorted(set(steps)) and steps[0] == 4, steps
        assert child.data.params["gan.lr_g"] == str(json.loads(child.data.tags["tune.config.train.gan.lr_g"]))
        assert {"train/loss_d", "train/loss_g", "eval/fid"} <= set(child.data.metrics)
    full = [c for c in children if c.data.tags["tune.stopped_early"] == "false"]
    assert all(_steps(mlflow_url, c.info.run_id)[-1] == 16 for c in full)

    best = yaml.safe_load((project / "tune" / "gan_best.yaml").read_text())
    assert best == {"train": {"gan": {k.split(".")[-1]: v for k, v in summary["best_config"].items()}}}
    print(f"ASHA sweep of 4 trials x 16 steps: {wall_s:.1f} s wall")
    _proposals_are_the_optuna_studys(project, children)

    # The same sweep is not started twice by accident, nor resumed with other settings.
    with pytest.raises(SweepError, match="sweep 'gan-asha' already exists at .*: continue it with --resume"):
        tune(params, "gan", shards=mnist_shards, out_dir=project / "tune", project_dir=project)
    changed = _params(search="optuna", scheduler="asha", grace_period=4, reduction_factor=2, name="gan-asha", num_samples=5)
    with pytest.raises(SweepError, match=r"was started with other settings \(changed: tune.num_samples: 4 -> 5\)"):
        tune(changed, "gan", shards=mnist_shards, out_dir=project / "tune", project_dir=project, resume=True)

    # The documented command trains with the best config.
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {**TRIAL, "run_name": "gan-best", "gan": {**TRIAL["gan"], "num_steps": 4}}}))
    assert load_params(project / "params.yaml", overlays=[project / "tune" / "gan_best.yaml"]).train.gan.lr_g == best["train"]["gan"]["lr_g"]
    # In this process, on this module's Ray (a process of its own would start a local Ray for 4 steps).
    assert main(["train", "gan", "--overlay", "tune/gan_best.yaml", "--shards", str(mnist_shards)]) == 0, capsys.readouterr()
    run_id = json.loads((project / "models" / "gan" / "mlflow.json").read_text())["run_id"]
    assert MlflowClient(mlflow_url).get_run(run_id).data.params["gan.lr_g"] == str(best["train"]["gan"]["lr_g"])


def _proposals_are_the_optuna_studys(project, children):
    """Each trial's config is one the Optuna study proposed (Tune saved the searcher's state with the
    sweep), and every result, early-stopped or not, went back into the TPE model."""
    from ray.tune.search.optuna import OptunaSearch

    configs = [tuple(json.loads(c.data.tags[f"tune.config.{k}"]) for k in ("train.gan.lr_g", "train.gan.lr_d")) for c in children]
    assert len(set(configs)) == len(children)
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(project / "ray_results" / "gan-asha"))
    study = searcher._ot_study  # the optuna.Study the searcher drew from (no public accessor)
    assert {(t.params["train.gan.lr_g"], t.params["train.gan.lr_d"]) for t in study.trials} == set(configs)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == len(children)


@pytest.mark.slow
def test_pbt_exploit_starts_from_the_donors_checkpoint(ray_runtime, project, mnist_shards, mlflow_url):
    params = _params(scheduler="pbt", num_samples=2, num_steps=8, perturbation_interval=4, resample_probability=0.5, name="gan-pbt")
    summary = tune(params, "gan", shards=mnist_shards, out_dir=project / "tune", project_dir=project,
                   featurizer_dir=project / "models" / "featurizer")
    assert summary["errors"] == 0
    parents, children = _runs(mlflow_url, summary["sweep"])
    assert all(r.info.status == "FINISHED" for r in parents + children)
    exploits = [(c, key.split(".")[2]) for c in children for key in c.data.tags if key.endswith(".donor") and key.startswith("tune.exploit.")]
    assert exploits, "no PBT exploit happened"
    for child, step in exploits:
        tags = child.data.tags
        donor = tags[f"tune.exploit.{step}.donor"]
        loaded = tags[f"genmodels.start.{step}.weights_sha256"]  # digest of the weights the workers loaded
        assert loaded == tags[f"tune.exploit.{step}.donor_weights_sha256"]
        # ... equal to the donor's own Train checkpoint at that step.
        donor_run = tags[f"genmodels.start.{step}.from"].split("Train run ")[1].rstrip(")")
        written = project / "ray_results" / "gan-pbt.trials" / donor_run / f"step_{int(step):08d}" / "weights_rank0.sha256"
        assert written.read_text() == loaded
        assert donor != tags["tune.trial_id"]
        mutated = json.loads(tags[f"tune.exploit.{step}.config"])
        assert set(mutated) == {"train.gan.lr_g", "train.gan.lr_d"}
        steps = _steps(mlflow_url, child.info.run_id, "train/loss_d")
        assert steps == [4, 8]  # synchronous PBT: no step logged twice, none missing
        # The trial stopped exactly at the exploit: its own run trained nothing past that step, so
        # every point after it in the child's curves comes from the donor's weights.
        own = project / "ray_results" / "gan-pbt.trials" / f"gan-pbt-{tags['tune.trial_id']}"
        assert max(int(p.name.removeprefix("step_")) for p in own.glob("step_*")) == int(step)
        print(f"PBT exploit at step {step}: trial {tags['tune.trial_id']} took {donor}'s weights ({loaded[:12]}), now {mutated}")


def test_a_trial_larger_than_the_cluster_fails_in_seconds(ray_runtime, project, mnist_shards):
    params = parse_params({"train": {**TRIAL, "num_workers": 3}, "tune": {"space": SPACE, "scheduler": "fifo"}})
    started = time.monotonic()
    with pytest.raises(SweepError, match=r"one trial cannot be placed.*needs \{'CPU': 3\.0\}.*has \{'CPU': 2\.0\}"):
        tune(params, "gan", shards=mnist_shards, out_dir=project / "tune", project_dir=project,
             featurizer_dir=project / "models" / "featurizer")
    assert time.monotonic() - started < 60


def test_resuming_a_sweep_that_does_not_exist_or_a_pbt_sweep_is_refused(ray_runtime, project, mnist_shards):
    with pytest.raises(SweepError, match="no sweep 'gan-missing' to resume"):
        tune(_params(name="gan-missing"), "gan", shards=mnist_shards, project_dir=project, resume=True)
    with pytest.raises(SweepError, match="a PBT sweep cannot be resumed"):
        tune(_params(name="gan-pbt-again", scheduler="pbt", num_samples=2), "gan", shards=mnist_shards, project_dir=project, resume=True)
