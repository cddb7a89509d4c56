"""Secrets (issue 14, scenario 14): tracking and storage credentials in the environment never
appear in a run's params, tags or artifacts, in what the commands print, in Ray's session logs,
in Ray Train's storage or in the stage outputs, nor in what `genmodels submit` prints or sends
(a password inside MLFLOW_TRACKING_URI is refused); and every server a local `genmodels train`
starts (Ray's GCS, raylet, workers, dashboard and agents) listens on the loopback interface
only. One exception: the DDP rendezvous store (torch's TCPStore) that rank 0 hosts while a run
lasts listens on every interface; torch takes no bind address for it (only a socket bound
beforehand), and Ray Train's process-group setup passes none.

One real `genmodels train` process (its own local Ray, as for a user) with distinctive fake
credentials; the test's MLflow server has no authentication, so they are sent and ignored.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from genmodels.cli import main
from tests.integration.ray_nodes import kill_leftovers, short_temp_dir

pytestmark = [pytest.mark.integration]

_TAG = uuid.uuid4().hex
SECRETS = {name: f"s3cr3t-{name.lower()}-{_TAG}" for name in (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
# What MLflow sends for them (basic auth wins over the token): the same secret, base64-encoded.
NEEDLES = {**SECRETS, "Authorization header": base64.standard_b64encode(
    f"{SECRETS['MLFLOW_TRACKING_USERNAME']}:{SECRETS['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()}
TRAIN = {"num_workers": 2, "batch_size_per_worker": 32, "log_every_steps": 4, "sample_every_steps": 16,
         "checkpoint_every_steps": 16, "eval_every_steps": 0, "max_failures": 0, "run_name": "gan-secrets",
         "gan": {"width": 8, "latent_dim": 16, "num_steps": 16}}
PROGRESS = re.compile(r"^train gan  step (\d+)/")


def _found(data: bytes | str) -> list[str]:
    data = data.encode() if isinstance(data, str) else data
    return [name for name, secret in NEEDLES.items() if secret.encode() in data]


def _scan(root: Path) -> tuple[list[str], int]:
    """(leaks as 'path: names', files read) for every regular file under `root` (symlinks not followed)."""
    leaks, count = [], 0
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:  # a file Ray removed meanwhile
                continue
            count += 1
            if found := _found(data):
                leaks.append(f"{path}: {found}")
    return leaks, count


def _descendants(root: int) -> set[int]:
    children = defaultdict(list)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                children[int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])].append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children[pid]
    return found


def _address(hexed: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6}'s address: 32-bit words in host (little-endian) byte order."""
    raw = b"".join(bytes.fromhex(hexed[i:i + 8])[::-1] for i in range(0, len(hexed), 8))
    address = ipaddress.ip_address(raw)
    return getattr(address, "ipv4_mapped", None) or address


def _listeners(root: int) -> list[tuple[str, str]]:
    """(process, address:port) of every listening TCP socket held by `root` or a process under it."""
    owners = {}
    for pid in _descendants(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            name = " ".join(Path(arg).name for arg in argv[:2] if arg)  # "python dashboard.py", "raylet --..."
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    owners[link[len("socket:["):-1]] = f"{pid} {name[:60]}"
        except OSError:  # a process that ended meanwhile
            continue
    listening = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owners:  # 0A: TCP_LISTEN
                hexed, port = fields[1].split(":")
                listening.append((owners[fields[9]], f"{_address(hexed)}:{int(port, 16)}"))
    return listening


@pytest.mark.slow
def test_a_training_run_shows_no_credential_and_listens_on_loopback_only(tmp_path, mnist_shards, mlflow_url):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({"train": TRAIN}))
    ray_dir = short_temp_dir()  # this run's Ray: its session logs are all under here
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GENMODELS_VERBOSE")}
    env = {**environ, **SECRETS, "MLFLOW_TRACKING_URI": mlflow_url, "RAY_TMPDIR": str(ray_dir)}
    with open(tmp_path / "stdout", "w+") as stdout:
        process = subprocess.Popen([sys.executable, "-m", "genmodels.cli", "train", "gan", "--shards", str(mnist_shards)],
                                   cwd=project, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            stderr, listening = [], None
            for line in process.stderr:  # the progress display: rank 0 has reported, DDP is up
                stderr.append(line)
                if listening is None and PROGRESS.match(line):
                    listening = _listeners(process.pid)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            kill_leftovers(ray_dir)
        stdout.seek(0)
        said = stdout.read()
    stderr = "".join(stderr)
    try:
        assert process.returncode == 0, said[-3000:] + stderr[-3000:]
        assert listening, f"no progress line, or no listener seen:\n{stderr[-3000:]}"
        shown = "\n".join(f"  {owner}  {address}" for owner, address in sorted(listening))
        print(f"listening while training:\n{shown}", file=sys.__stdout__)
        owners = " ".join(owner for owner, _ in listening)
        for server in ("gcs_server", "raylet", "dashboard", "RayTrainWorker"):
            assert server in owners, f"{server} not seen listening (the run ended before the check?):\n{shown}"
        public = [(owner, address) for owner, address in listening
                  if not ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback]
        # Accepted (see the module's docstring): the DDP rendezvous store on rank 0 listens on every
        # interface whatever MASTER_ADDR says.
        store = [(owner, address) for owner, address in public
                 if "RayTrainWorker" in owner and ipaddress.ip_address(address.rsplit(":", 1)[0]).is_unspecified]
        assert len(store) <= 1 and public == store, f"listening beyond the loopback interface:\n{shown}"

        assert not _found(said) and not _found(stderr), (_found(said), _found(stderr))
        run_id = json.loads((project / "models/gan/mlflow.json").read_text())["run_id"]
        run = MlflowClient(mlflow_url).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["gan.width"] == "8"
        recorded = json.dumps([run.info.run_name, run.data.params, run.data.tags])
        assert not _found(recorded), _found(recorded)
        artifacts = Path(download_artifacts(run_id=run_id, tracking_uri=mlflow_url, dst_path=str(tmp_path / "artifacts")))
        leaks, count = _scan(artifacts)
        assert count and not leaks, (count, leaks)
        assert list((project / "ray_results" / "gan-secrets").glob("step_*")), "no checkpoint in the storage path"
        leaks, count = _scan(project)  # params.yaml, models/, metrics/, ray_results/ (Train's storage path)
        assert not leaks, leaks
        logs = list(ray_dir.glob("*/session_*/logs"))
        assert logs and any(logs[0].iterdir()), f"no Ray session logs under {ray_dir}"
        leaks, count = _scan(ray_dir)  # session logs, runtime resources, Train's staging
        assert not leaks, leaks
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture
def submitted(project_copy, monkeypatch):
    """`genmodels submit` in this process, its job server replaced by a recorder of what would be
    sent (and of the staged working dir's files, which are deleted once submitted)."""
    from genmodels import cluster

    sent = {}

    class Recorder:
        def submit_job(self, **kwargs):
            sent.update(kwargs)
            leaks, count = _scan(Path(kwargs["runtime_env"]["working_dir"]))
            sent["working_dir scan"] = (leaks, count)
            return "raysubmit_recorded"

    monkeypatch.setattr(cluster, "job_client", lambda address, **_: Recorder())
    monkeypatch.chdir(project_copy)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    return sent


def test_b_submit_prints_and_sends_no_credential(submitted, capsys):
    code = main(["submit", "--address", "http://127.0.0.1:8265", "--no-wait", "--", "genmodels", "train", "gan",
                 "--shards", "http://data.example/shards"])
    out, err = capsys.readouterr()
    assert code == 0 and "submit: job raysubmit_recorded" in out, out + err
    assert "environment: MLFLOW_TRACKING_URI" in out, out
    assert not _found(out + err), _found(out + err)
    leaks, count = submitted.pop("working_dir scan")
    assert count and not leaks, leaks
    assert not _found(repr(submitted)), _found(repr(submitted))  # entrypoint, runtime env (env_vars), metadata
    assert set(submitted["runtime_env"]["env_vars"]) == {"MLFLOW_TRACKING_URI"}

    # A credential given by hand is refused, and its value is not echoed back.
    secret = SECRETS["MLFLOW_TRACKING_TOKEN"]
    code = main(["submit", "--address", "http://127.0.0.1:8265", "--env", f"MLFLOW_TRACKING_TOKEN={secret}", "--", "true"])
    out, err = capsys.readouterr()
    assert code == 2 and "--env MLFLOW_TRACKING_TOKEN: looks like a credential" in err and not _found(out + err), err


def test_a_password_in_the_tracking_uri_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys, mnist_shards):
    """MLFLOW_TRACKING_URI=http://user:SECRET@host would be printed by `train` and MLflow, and kept
    in models/<family>/mlflow.json: refused, without being echoed; a user name alone goes."""
    from genmodels.tracking import resolve_tracking

    secret = SECRETS["MLFLOW_TRACKING_PASSWORD"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": TRAIN}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shards").symlink_to(mnist_shards)  # so that `status` gets as far as the tracking store
    for uri in (f"http://admin:{secret}@127.0.0.1:1", f"postgresql://mlflow:{secret}@127.0.0.1:1/mlflow"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for command in (["train", "gan", "--shards", str(mnist_shards)], ["status"]):
            code = main(command)
            out, err = capsys.readouterr()
            assert code == 2 and "a password in the URI" in err and "MLFLOW_TRACKING_PASSWORD" in err, (command, out, err)
            assert not _found(out + err), (command, out, err)
    assert not (tmp_path / "models").exists() and not (tmp_path / "ray_results").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://genmodels@127.0.0.1:1/mlflow")
    assert resolve_tracking(tmp_path).uri.startswith("postgresql+psycopg2://genmodels@")
