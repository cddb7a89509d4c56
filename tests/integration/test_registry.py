"""The model registry against a real `mlflow server`: register with lineage, promote by the gate,
refuse other protocols, race two real promoters, roll back, load by alias where `genmodels`
cannot be imported, refuse a malicious weights file, serve over HTTP, sample a grid.

The generators are freshly initialised networks written as the train stage writes models/<family>
(Ray is not the subject here; test_dvc runs the real pipeline through register), evaluated by
the real evaluate stage: different init seeds give different FIDs.
"""

import base64
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from genmodels.cli import main
from genmodels.config import parse_params
from genmodels.data.shards import load_manifest, manifest_sha256
from genmodels.families import get_family
from genmodels.files import file_sha256
from genmodels.stages.evaluate import evaluate
from genmodels.stages.register import register
from genmodels.tracking import TrackingError, git_tags, open_run, resolve_tracking
from genmodels.tracking.registry import LOCK_SUFFIX, audit_trail, promotion_lock
from tests.integration.mlflow_server import _free_port

SMALL_EVAL = {"num_samples": 300, "kid_subset_size": 100, "kid_num_subsets": 10, "bootstrap_resamples": 3,
              "iwae_num_samples": 5, "reference_max_samples": 1000}
TINY = {"gan": {"width": 8, "latent_dim": 16}, "vae": {"width": 8, "latent_dim": 8}}
SERVE_START_TIMEOUT_S = 120
MAX_RACE_ROUNDS = 8  # each round starts the promoters in the other order: both orders come within a few
BLOCK_GENMODELS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "genmodels" or name.startswith("genmodels."):
            raise ImportError("this repository's genmodels is blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def _trained(root, family, seed, mnist_shards, featurizer, repo_root, evaluate_overrides=None):
    """models/<family>/ and metrics/eval_<family>.json under `root`, as train and evaluate leave them."""
    torch.manual_seed(seed)
    params = parse_params({"train": TINY, "evaluate": {**SMALL_EVAL, **(evaluate_overrides or {}),
                                                      "cache_dir": str(root.parent / "cache")}})
    spec = get_family(family)
    model = spec.build_generator(spec.params(params.train), image_size=28, channels=1)
    target = root / "models" / family
    target.mkdir(parents=True)
    torch.save({spec.generator_key: model.state_dict()}, target / "weights.pt")
    tracking = resolve_tracking(root)
    run_id, _ = open_run(tracking, experiment="registry-tests", run_key=f"{root}-{family}", run_name=f"{family}-{seed}",
                         params={}, tags=git_tags(repo_root))
    config = {"family": family, "image_size": 28, "channels": 1, family: spec.params(params.train).model_dump(),
              "data": {"manifest_sha256": manifest_sha256(load_manifest(mnist_shards))},
              "weights_sha256": file_sha256(target / "weights.pt")}
    (target / "config.json").write_text(json.dumps(config))
    (target / "mlflow.json").write_text(json.dumps({"tracking_uri": tracking.uri, "run_id": run_id}))
    evaluate(params, family, models_dir=root / "models", shards=mnist_shards, featurizer_dir=featurizer,
             metrics_dir=root / "metrics")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_url, mnist_shards, quick_featurizer, repo_root):
    """Three GANs (init seeds 0-2), one evaluated under another protocol, and two VAEs."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
        made = {f"gan{seed}": _trained(root / f"gan{seed}", "gan", seed, mnist_shards, quick_featurizer, repo_root)
                for seed in range(3)}
        made["gan_other_protocol"] = _trained(root / "other", "gan", 0, mnist_shards, quick_featurizer, repo_root,
                                              {"num_samples": 200})
        made["vae"] = _trained(root / "vae", "vae", 0, mnist_shards, quick_featurizer, repo_root)
        made["vae1"] = _trained(root / "vae1", "vae", 1, mnist_shards, quick_featurizer, repo_root)
    return made


@pytest.fixture
def registry(trained, mlflow_url, tmp_path, monkeypatch, request):
    """A registered model name of this test's own, a params file naming it, and a register function."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    monkeypatch.chdir(tmp_path)
    prefix = request.node.name.replace("_", "-")[:40]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"registry": {"model_name": f"{prefix}-{{family}}"}}))
    params = parse_params(yaml.safe_load(params_file.read_text()))

    def register_(key, family="gan"):
        root = trained[key]
        return register(params, family, models_dir=root / "models", metrics_dir=root / "metrics", project_dir=root)

    client = MlflowClient(mlflow_url)
    return {"params": params, "file": str(params_file), "register": register_, "client": client,
            "name": params.registry.name, "url": mlflow_url}


def _fid(trained, key):
    return json.loads((trained[key] / "metrics/eval_gan.json").read_text())["fid"]


def _promote(registry, *args):
    return main(["promote", "gan", "--params", registry["file"], *args])


def test_register_logs_a_candidate_with_lineage_and_evaluation_tags(registry, trained, tmp_path):
    name, client = registry["name"]("gan"), registry["client"]
    run_id = json.loads((trained["gan1"] / "models/gan/mlflow.json").read_text())["run_id"]
    client.set_terminated(run_id, "FINISHED")
    before = client.get_run(run_id).info
    first = registry["register"]("gan0")
    second = registry["register"]("gan1")
    after = client.get_run(run_id).info
    assert (after.status, after.end_time) == (before.status, before.end_time)  # the training run is not reopened
    assert (first["version"], second["version"]) == ("1", "2") and second["name"] == name
    assert json.loads((trained["gan1"] / "models/gan/registered.json").read_text()) == second
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {"candidate": "2", "champion": "1"}  # the first registration also became the champion
    assert [(e["action"], e["from_version"], e["to_version"]) for e in audit_trail(client, name)] == [
        ("first-champion", None, "1")]

    version = client.get_model_version(name, "2")
    tags, record = version.tags, json.loads((trained["gan1"] / "metrics/eval_gan.json").read_text())
    config = json.loads((trained["gan1"] / "models/gan/config.json").read_text())
    run = client.get_run(version.run_id)
    assert version.run_id == json.loads((trained["gan1"] / "models/gan/mlflow.json").read_text())["run_id"]
    assert tags["git.commit"] == run.data.tags["git.commit"] != "unknown" and tags["git.dirty"] in ("true", "false")
    assert tags["data.manifest_sha256"] == config["data"]["manifest_sha256"]
    assert tags["train.weights_sha256"] == config["weights_sha256"]
    assert tags["dvc.train_stage"] == "absent"  # no dvc.lock here; test_dvc checks the hash
    assert json.loads(tags["config"])["gan"] == config["gan"]
    numbers = {k: v for k, v in record.items() if isinstance(v, float)}
    assert {k: float(tags[f"eval.{k}"]) for k in numbers} == numbers and "fid" in numbers
    assert {k: json.loads(tags[f"eval.signature.{k}"]) for k in record["signature"]} == record["signature"]
    assert float(tags["featurizer.val_accuracy"]) == record["featurizer_val_accuracy"]
    assert "\n" not in version.description and f"fid {record['fid']:.4g}" in version.description
    assert "lower is better" in version.description and "300 generated" in version.description

    logged = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    signature = logged.metadata.signature
    assert [c.name for c in signature.inputs.inputs] == ["num_images", "seed", "truncation"]
    assert signature.params.to_dict() == [{"name": "format", "type": "string", "default": "raw", "shape": None}]
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/2", dst_path=str(tmp_path / "model"))
    pins = open(f"{local}/requirements.txt").read().split()
    assert len(json.loads(open(f"{local}/serving_input_example.json").read())["dataframe_split"]["data"]) > 1
    assert f"torch=={torch.__version__.split('+')[0]}" in pins and any(p.startswith("mlflow==") for p in pins)


def test_register_refuses_an_evaluation_of_other_weights(registry, trained, tmp_path, capsys):
    assert main(["register", "gan", "--params", registry["file"], "--models", str(trained["gan0"] / "models"),
                 "--metrics", str(trained["gan1"] / "metrics")]) == 2
    assert "was measured on other weights" in capsys.readouterr().err
    assert not registry["client"].search_registered_models(f"name = '{registry['name']('gan')}'")


def test_register_refuses_a_model_trained_against_another_tracking_store(registry, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert main(["register", "gan", "--params", registry["file"], "--models", str(trained["gan0"] / "models"),
                 "--metrics", str(trained["gan0"] / "metrics")]) == 2
    assert f"trained against tracking store {registry['url']}" in capsys.readouterr().err


def test_promote_moves_the_champion_only_for_a_better_candidate(registry, trained, capsys):
    name, client = registry["name"]("gan"), registry["client"]
    ranked = sorted(["gan0", "gan1", "gan2"], key=lambda key: _fid(trained, key))  # best (lowest FID) first
    worst, middle, best = (registry["register"](key)["version"] for key in reversed(ranked))  # worst is champion
    assert _promote(registry, "--version", middle, "--dry-run") == 0
    assert "would promote" in capsys.readouterr().out and str(client.get_registered_model(name).aliases["champion"]) == worst

    assert _promote(registry, "--version", middle) == 0
    out = capsys.readouterr().out
    assert f"v{middle} {_fid(trained, ranked[1]):.4f}" in out and f"v{worst} {_fid(trained, ranked[2]):.4f}" in out
    assert "promoted" in out
    gap = _fid(trained, ranked[1]) - _fid(trained, ranked[0])
    assert _promote(registry, "--version", best, "--margin", str(gap * 2)) == 1  # better, not by the margin
    assert "kept" in capsys.readouterr().out
    assert _promote(registry, "--version", worst) == 1
    assert _promote(registry) == 0  # the candidate alias: the last registered, the best
    assert _promote(registry) == 0 and "already" in capsys.readouterr().out
    assert str(client.get_registered_model(name).aliases["champion"]) == best
    moves = [(e["action"], e["from_version"], e["to_version"]) for e in audit_trail(client, name)]
    assert moves == [("first-champion", None, worst), ("promote", worst, middle), ("promote", middle, best)]
    entry = audit_trail(client, name)[-1]
    assert entry["to_metric"] == _fid(trained, ranked[0]) and entry["from_metric"] == _fid(trained, ranked[1])
    assert entry["user"] and entry["git_commit"] and entry["time"].endswith("Z")


def test_the_vae_gate_takes_the_higher_elbo(registry, trained, capsys):
    name, client = registry["name"]("vae"), registry["client"]
    elbo = {key: json.loads((trained[key] / "metrics/eval_vae.json").read_text())["elbo"] for key in ("vae", "vae1")}
    better, worse = sorted(elbo, key=elbo.get, reverse=True)
    champion = registry["register"](worse, family="vae")["version"]
    candidate = registry["register"](better, family="vae")["version"]
    assert main(["promote", "vae", "--params", registry["file"], "--margin", "-1"]) == 2
    assert "--margin: expected a finite number >= 0" in capsys.readouterr().err
    assert main(["promote", "vae", "--params", registry["file"]]) == 0
    assert "higher is better" in capsys.readouterr().out
    assert str(client.get_registered_model(name).aliases["champion"]) == candidate != champion


def test_promote_refuses_a_candidate_measured_under_another_protocol(registry, trained, capsys):
    name, client = registry["name"]("gan"), registry["client"]
    registry["register"]("gan1")
    other = registry["register"]("gan_other_protocol")["version"]
    assert _promote(registry, "--version", other) == 2
    err = capsys.readouterr().err
    assert "num_generated: 300 vs 200" in err.replace("'", "") or "num_generated: 200 vs 300" in err
    assert str(client.get_registered_model(name).aliases["champion"]) == "1" and len(audit_trail(client, name)) == 1
    assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")  # released after the refusal


def test_rollback_walks_back_along_the_audit_trail(registry, trained, capsys):
    name, client = registry["name"]("gan"), registry["client"]
    ranked = sorted(["gan0", "gan1", "gan2"], key=lambda key: _fid(trained, key))
    versions = [registry["register"](key)["version"] for key in reversed(ranked)]  # 1 worst .. 3 best
    assert _promote(registry, "--version", versions[1]) == 0 and _promote(registry, "--version", versions[2]) == 0
    assert main(["promote", "gan", "--rollback", "--params", registry["file"]]) == 0
    assert str(client.get_registered_model(name).aliases["champion"]) == versions[1]
    assert main(["promote", "gan", "--rollback", "--params", registry["file"]]) == 0
    assert str(client.get_registered_model(name).aliases["champion"]) == versions[0]
    capsys.readouterr()
    assert main(["promote", "gan", "--rollback", "--params", registry["file"]]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    assert [(e["action"], e["from_version"], e["to_version"]) for e in audit_trail(client, name)][-2:] == [
        ("rollback", versions[2], versions[1]), ("rollback", versions[1], versions[0])]


def test_two_promoters_racing_end_on_the_better_version_with_one_entry_per_move(registry, trained, tmp_path):
    """Each round the test holds the lock until both promoters wait on it, then lets them race."""
    name, client = registry["name"]("gan"), registry["client"]
    ranked = sorted(["gan0", "gan1", "gan2"], key=lambda key: _fid(trained, key))
    worst, middle, best = (registry["register"](key)["version"] for key in reversed(ranked))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    orders = []
    for round_ in range(MAX_RACE_ROUNDS):
        if len(set(orders)) == 2:
            break
        client.set_registered_model_alias(name, "champion", worst)  # reset outside genmodels
        before = len(audit_trail(client, name))
        with promotion_lock(client, name):
            racers = {v: subprocess.Popen(["genmodels", "promote", "gan", "--version", v, "--params", registry["file"]],
                                          env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                      for v in ((middle, best) if round_ % 2 == 0 else (best, middle))}  # either one starts first
            for process in racers.values():  # each blocks on the lock the test holds
                assert any("waiting for the promotion lock" in line for line in iter(process.stdout.readline, "")), \
                    process.communicate()
        outputs = {v: process.communicate(timeout=120)[0] for v, process in racers.items()}
        codes = {v: process.returncode for v, process in racers.items()}
        assert codes[best] == 0, outputs
        assert str(client.get_registered_model(name).aliases["champion"]) == best
        moved = [v for v in (middle, best) if "promoted" in outputs[v]]
        added = audit_trail(client, name)[before:]
        assert [e["to_version"] for e in added] == sorted(moved, key=lambda v: v == best)
        orders.append("middle then best" if middle in moved else "best, then middle kept")
    print("race orders:", orders)
    assert set(orders) == {"middle then best", "best, then middle kept"}, orders


def test_a_lock_of_a_dead_process_is_broken_and_a_live_one_waited_for(registry, trained, capsys):
    name, client = registry["name"]("gan"), registry["client"]
    registry["register"]("gan0")
    here = {"host": socket.gethostname(), "pid_namespace": str(os.stat("/proc/self/ns/pid").st_ino),
            "acquired_at": str(time.time())}
    client.create_registered_model(name + LOCK_SUFFIX, tags={**here, "token": "live", "pid": str(os.getpid())})
    with pytest.raises(TrackingError, match=f"still held by pid {os.getpid()}"):
        with promotion_lock(client, name, timeout_s=1):
            pass
    client.delete_registered_model(name + LOCK_SUFFIX)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client.create_registered_model(name + LOCK_SUFFIX, tags={**here, "token": "dead", "pid": dead.stdout.strip()})
    assert _promote(registry) == 0
    assert "breaking the stale promotion lock" in capsys.readouterr().out
    assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")


def test_the_model_loads_by_alias_where_genmodels_cannot_be_imported(registry, trained, tmp_path):
    registry["register"]("gan0")
    registry["register"]("vae", family="vae")
    script = BLOCK_GENMODELS + f"""
import json, mlflow, pandas as pd, numpy as np
gan = mlflow.pyfunc.load_model("models:/{registry['name']('gan')}@champion")
rows = gan.predict(pd.DataFrame([{{"num_images": 3, "seed": 5}}, {{"num_images": 2, "seed": 7}}]))
alone = gan.predict(pd.DataFrame([{{"num_images": 2, "seed": 7}}]))
truncated = gan.predict(pd.DataFrame([{{"num_images": 3, "seed": 5, "truncation": 0.5}}]))
vae = mlflow.pyfunc.load_model("models:/{registry['name']('vae')}@champion")
try:
    vae.predict(pd.DataFrame([{{"num_images": 1, "seed": 0, "truncation": 0.5}}]))
    vae_truncation = "accepted"
except Exception as err:
    vae_truncation = str(err)
print(json.dumps({{"shape": list(rows.shape), "dtype": str(rows.dtype), "row_order": bool((rows[3:] == alone).all()),
                  "seeds_differ": bool((rows[:2] != alone).any()), "truncation_changes": bool((truncated != rows[:3]).any()),
                  "vae_shape": list(vae.predict(pd.DataFrame([{{"num_images": 4, "seed": 0}}])).shape),
                  "vae_truncation": vae_truncation, "genmodels": sorted(m for m in sys.modules if m.split(".")[0] == "genmodels")}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["shape"] == [5, 28, 28, 1] and seen["dtype"] == "uint8" and seen["vae_shape"] == [4, 28, 28, 1]
    assert seen["row_order"] and seen["seeds_differ"] and seen["truncation_changes"] and seen["genmodels"] == []
    assert "truncation" in seen["vae_truncation"] and seen["vae_truncation"] != "accepted"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # runs on unpickling: creates the marker file


def test_a_weights_file_replaced_by_a_malicious_pickle_is_refused(registry, trained, tmp_path):
    registry["register"]("gan0")
    local = mlflow.artifacts.download_artifacts(f"models:/{registry['name']('gan')}/1", dst_path=str(tmp_path / "model"))
    weights = next(p for p in (tmp_path / "model").rglob("weights.pt"))
    marker = tmp_path / "payload-ran"
    weights.write_bytes(pickle.dumps({"generator": _Payload(str(marker))}))
    with pytest.raises(Exception, match="sha256 .* is not the registered weights"):
        mlflow.pyfunc.load_model(local)
    spec_file = next(p for p in (tmp_path / "model").rglob("generator.json"))  # an attacker who rewrites both files
    spec_file.write_text(json.dumps({**json.loads(spec_file.read_text()), "weights_sha256": file_sha256(weights)}))
    with pytest.raises(Exception, match="refused, not a plain tensor state dict"):
        mlflow.pyfunc.load_model(local)
    assert not marker.exists()


def test_mlflow_models_serve_answers_raw_and_png_images(registry, trained, tmp_path):
    registry["register"]("gan0")
    uri = f"models:/{registry['name']('gan')}@champion"
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_serving(server, port, tmp_path / "serve.log")
        rows = [{"num_images": 2, "seed": 3}, {"num_images": 1, "seed": 4}]
        raw = _post(port, {"dataframe_records": rows})
        png = _post(port, {"dataframe_records": rows, "params": {"format": "png"}})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(rows))
    assert np.array_equal(np.asarray(raw["predictions"], dtype=np.uint8), expected)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in png["predictions"]])
    assert np.array_equal(decoded, expected[..., 0])


def _wait_until_serving(server, port, log_path):
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow models serve exited:\n{log_path.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)  # polling a server that is starting: there is nothing to wait on
    raise AssertionError(f"mlflow models serve did not answer /ping in {SERVE_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def _post(port, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_sample_writes_a_grid_from_the_champion(registry, trained, tmp_path):
    registry["register"]("gan0")
    out = tmp_path / "grid.png"
    assert main(["sample", f"models:/{registry['name']('gan')}@champion", "-n", "16", "-o", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 30 + 2, 8 * 30 + 2) and grid.std() > 0
