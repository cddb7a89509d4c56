"""A real `dvc repro` / `dvc exp run` in a temporary git repo holding a copy of the project.

The shipped params.yaml is used with training shrunk to a few steps of tiny models, so that the
whole pipeline (prepare -> train@gan, train@vae) runs in a test. The train stages join the
test's Ray through RAY_ADDRESS, as on a running cluster (a local Ray of their own would be three
more Ray starts here; `genmodels train` starting its own: test_ux, test_faults_driver). The tune
stage starts its own, as on a workstation: no other test runs `genmodels tune` that way.
"""

import hashlib
import json
import subprocess

import pytest
import ray
import yaml

pytestmark = pytest.mark.slow  # each test here starts Ray, dvc or servers: 10 s to minutes on 2 cores

TINY_TRAIN = {"num_workers": 1, "log_every_steps": 2, "sample_every_steps": 4, "checkpoint_every_steps": 4,
              "eval_every_steps": 4, "eval_num_samples": 50,
              "gan": {"width": 8, "num_steps": 4}, "vae": {"width": 8, "num_steps": 4}}


TINY_OTHERS = {"featurizer": {"num_epochs": 1, "min_val_accuracy": 0.0},
               "evaluate": {"num_samples": 200, "kid_subset_size": 100, "kid_num_subsets": 5, "bootstrap_resamples": 2,
                            "iwae_num_samples": 2, "reference_max_samples": 500},
               "tune": {"num_samples": 1, "scheduler": "fifo"}}  # the stage's wiring, not the search: test_tune's subject


def _shrink_training(project):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in TINY_TRAIN.items():
        if isinstance(value, dict):
            params["train"][key].update(value)
        else:
            params["train"][key] = value
    for section, values in TINY_OTHERS.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _run(cwd, *args):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.mark.timeout(1200)  # the whole pipeline, several times: minutes, more beside other test processes
def test_repro_is_idempotent_and_exp_run_sets_params(project_copy, ray_runtime, monkeypatch):
    address = ray.get_runtime_context().gcs_address
    monkeypatch.setenv("RAY_ADDRESS", address)
    _shrink_training(project_copy)
    out = _run(project_copy, "dvc", "repro")
    for stage in ("prepare", "featurizer", "train@gan", "train@vae", "evaluate@gan", "evaluate@vae", "register@gan",
                  "register@vae"):
        assert f"Running stage '{stage}'" in out
    manifest = json.loads((project_copy / "data/shards/manifest.json").read_text())
    assert manifest["source"] == "mnist5k" and manifest["image_size"] == 28
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == 5000
    for family in ("gan", "vae"):
        assert (project_copy / f"models/{family}/weights.pt").exists()
        assert json.loads((project_copy / f"metrics/train_{family}.json").read_text())["step"] == 4
    shown = _run(project_copy, "dvc", "metrics", "show")
    assert "metrics/train_gan.json" in shown and "loss_d" in shown
    assert "metrics/eval_gan.json" in shown and "fid" in shown and "metrics/eval_vae.json" in shown and "iwae" in shown
    assert "metrics/featurizer.json" in shown and "val_accuracy" in shown
    assert (project_copy / "mlruns.db").exists() and (project_copy / "mlartifacts").is_dir()
    _registered_with_both_aliases(project_copy)
    _status_and_report_of_the_finished_pipeline(project_copy)
    lock = (project_copy / "dvc.lock").read_text()

    again = _run(project_copy, "dvc", "repro")
    assert "Running stage" not in again and "didn't change" in again
    assert (project_copy / "dvc.lock").read_text() == lock
    assert "up to date" in _run(project_copy, "dvc", "status", "dvc.yaml")
    assert "Running stage 'tune" not in out  # plain `dvc repro` never starts a sweep

    monkeypatch.delenv("RAY_ADDRESS")  # the sweep starts a local Ray of its own (module docstring)
    swept = _run(project_copy, "dvc", "repro", "tune/dvc.yaml:tune@vae")
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert "Running stage 'tune/dvc.yaml:tune@vae'" in swept and "Running stage 'train" not in swept
    best = yaml.safe_load((project_copy / "tune/vae_best.yaml").read_text())
    assert set(best["train"]["vae"]) == {"lr", "latent_dim"}
    assert "up to date" in _run(project_copy, "dvc", "status", "tune/dvc.yaml:tune@vae")

    _a_lost_registration_is_redone_not_restored(project_copy)
    _failed_stages_keep_their_outputs(project_copy)
    assert "up to date" in _run(project_copy, "dvc", "status", "dvc.yaml")  # every output is still the one dvc.lock records

    _run(project_copy, "git", "add", "-A")
    _run(project_copy, "git", "commit", "-q", "-m", "baseline")
    # A train param reruns that family's train, evaluate and register only (a prepare param would
    # rerun the whole pipeline; how prepare's params reach the data is test_prepare's subject).
    out = _run(project_copy, "dvc", "exp", "run", "-S", "train.gan.num_steps=6")
    assert "Running stage 'train@gan'" in out and "Running stage 'register@gan'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'train@vae'" not in out
    diff = _run(project_copy, "dvc", "metrics", "diff")  # the new numbers vs the baseline commit
    assert "metrics/eval_gan.json" in diff and "metrics/train_gan.json" in diff and "metrics/eval_vae.json" not in diff
    assert "num_steps: 6" in (project_copy / "params.yaml").read_text()
    assert json.loads((project_copy / "models/gan/config.json").read_text())["gan"]["num_steps"] == 6
    assert json.loads((project_copy / "metrics/train_gan.json").read_text())["step"] == 6


def _registered_with_both_aliases(project):
    """A fresh store ends `dvc repro` with candidate and champion on each family's first version,
    its tags naming the train stage of dvc.lock."""
    from mlflow import MlflowClient

    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for family in ("gan", "vae"):
        registered = json.loads((project / f"models/{family}/registered.json").read_text())
        assert registered["name"] == f"genmodels-{family}" and registered["version"] == "1"
        assert registered["aliases"] == ["candidate", "champion"]
        client = MlflowClient(registered["tracking_uri"])
        assert registered["tracking_uri"] == f"sqlite:///{project / 'mlruns.db'}"
        tags = client.get_model_version(registered["name"], "1").tags
        stage = hashlib.sha256(json.dumps(lock[f"train@{family}"], sort_keys=True).encode()).hexdigest()
        assert tags["dvc.train_stage"] == stage and tags["git.commit"] != "unknown"


def _status_and_report_of_the_finished_pipeline(project):
    """`genmodels status` names each family's numbers, protocol, run and aliases; the report page
    renders in a real headless Chromium with every picture loaded, and evaluate logged it to MLflow."""
    from mlflow import MlflowClient

    from genmodels.metrics.protocol import signature_sha256
    from genmodels.progress import number
    from tests.browser import render

    out = _run(project, "genmodels", "status")
    for family in ("gan", "vae"):
        record = json.loads((project / f"metrics/eval_{family}.json").read_text())
        run = json.loads((project / f"models/{family}/mlflow.json").read_text())
        assert f"fid {number(record['fid'])} ± {number(record['fid_bootstrap_std'])}" in out, out
        assert f"protocol {signature_sha256(record['signature'])[:12]}" in out, out
        assert f"MLflow run {run['run_id']} (FINISHED)" in out, out
        assert f"registry genmodels-{family}: v1 candidate+champion" in out, out
        assert f"genmodels sample models:/genmodels-{family}@champion" in out
        logged = {a.path for a in MlflowClient(run["tracking_uri"]).list_artifacts(run["run_id"])}
        assert "report.html" in logged, logged
    assert "mlflow ui --backend-store-uri sqlite:///mlruns.db" in out and "dvc plots show" in out
    assert "measured on other weights" not in out

    page, shot = project.parent / "report.html", project.parent / "report.png"
    assert "report: gan, vae" in _run(project, "genmodels", "report", "-o", str(page))
    rendered = render(page, shot)
    assert rendered.title == "genmodels report: gan, vae"
    captions = [image["alt"] for image in rendered.images]
    for kind in ("samples", "real images", "training losses", "periodic eval/"):
        assert sum(kind in caption for caption in captions) == 2, captions  # one per family
    assert all(image["complete"] and image["width"] > 0 for image in rendered.images), rendered.images
    assert not [entry for entry in rendered.console if entry["level"] in ("SEVERE", "WARNING")], rendered.console
    assert "Protocol signature" in rendered.text and "manifest sha256" in rendered.text
    assert shot.stat().st_size > 20_000  # a page with pictures, not a blank one


def _a_lost_registration_is_redone_not_restored(project):
    """DVC's run-cache could restore registered.json without registering: the stage must run."""
    (project / "models/gan/registered.json").unlink()
    out = _run(project, "dvc", "repro", "register@gan")
    assert "Running stage 'register@gan'" in out and "is cached" not in out
    assert json.loads((project / "models/gan/registered.json").read_text())["version"] == "2"


# (stage, params key, bad value, what the error says, outputs that must survive); one family per
# foreach stage: train@vae and evaluate@vae are the same stage definitions, with the same persist.
FAILURES = [
    ("prepare", "prepare.image_size", "large", 'prepare.image_size: expected an integer in [8, 512], got "large"', ["data/shards"]),
    ("prepare", "prepare.imgsize", 28, "prepare.imgsize: unknown key", ["data/shards"]),
    ("featurizer", "featurizer.lr", -1, "featurizer.lr: expected a number in (0, 1], got -1",
     ["models/featurizer", "metrics/featurizer.json"]),
    # Valid params, a failure after the work: the featurizer cannot reach 100% on one epoch.
    ("featurizer", "featurizer.min_val_accuracy", 1.0, "< featurizer.min_val_accuracy 1.0",
     ["models/featurizer", "metrics/featurizer.json"]),
    ("train@gan", "train.gan.lr_g", 0, "train.gan.lr_g: expected a number in (0, 1], got 0",
     ["models/gan", "metrics/train_gan.json", "metrics/train_gan_curve.csv"]),
    ("evaluate@gan", "evaluate.num_samples", 1, "evaluate.num_samples: expected an integer >= 10, got 1",
     ["metrics/eval_gan.json"]),
    ("register@gan", "registry.model_name", "gan model", "registry.model_name: expected a name of letters",
     ["models/gan/registered.json"]),
]


def _digest(path):
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _failed_stages_keep_their_outputs(project):
    """Through `dvc repro`, which deletes a stage's outputs before its command unless they persist."""
    params_path = project / "params.yaml"
    original = params_path.read_text()
    for stage, key, value, message, outputs in FAILURES:
        before = {out: _digest(project / out) for out in outputs}
        params = yaml.safe_load(original)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        result = subprocess.run(["dvc", "repro", "-s", stage], cwd=project, capture_output=True, text=True)
        assert result.returncode != 0, f"{stage} with {key}={value!r} did not fail"
        assert message in result.stdout + result.stderr, (stage, result.stdout[-2000:], result.stderr[-2000:])
        for out in outputs:
            assert _digest(project / out) == before[out], f"{stage} failed and changed {out}"
    # The whole file broken: DVC itself refuses bad YAML, and an empty file once dvc.lock records params.
    before = _digest(project / "data/shards")
    for text, message in [("prepare: [\n", "YAML file structure is corrupted"),
                          ("", "Parameters 'prepare' are missing from 'params.yaml'")]:
        params_path.write_text(text)
        result = subprocess.run(["dvc", "repro", "-s", "prepare"], cwd=project, capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stdout + result.stderr, (text, result.stderr[-2000:])
        assert _digest(project / "data/shards") == before
    params_path.write_text(original)


def test_repro_with_bad_params_fails_with_the_key(project_copy):
    params = project_copy / "params.yaml"
    params.write_text(params.read_text().replace("image_size: 28", 'image_size: "large"'))
    result = subprocess.run(["dvc", "repro"], cwd=project_copy, capture_output=True, text=True)
    assert result.returncode != 0
    assert 'prepare.image_size: expected an integer in [8, 512], got "large"' in result.stdout + result.stderr
