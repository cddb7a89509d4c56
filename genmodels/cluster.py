"""Ray start-up and preflight: one machine with no servers by default, a cluster by configuration.

With RAY_ADDRESS unset, `ensure_ray` starts a private local Ray instance (`address="local"`:
never attach by accident to another Ray on this machine); with it set, the same code connects
to that cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys

import ray

from genmodels.credentials import secret_name, url_credentials
from genmodels.progress import local_ray_env


def ensure_ray() -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        # The dashboard serves Ray's state API: without it Train's placement-group cleaner cannot
        # tell a dead controller from a live one (placement groups leak), and `ray job submit` has
        # nothing to talk to. Its workers inherit this process's environment.
        for key, value in local_ray_env().items():
            os.environ.setdefault(key, value)
        port = free_loopback_port()
        # Ray's state API (Train's placement-group cleaner calls it from inside the cluster) finds
        # the dashboard by looking for a GCS among this host's processes, and gives up when there
        # are two (another project's local Ray): told where it is, it never looks. Ray's workers
        # inherit it from this process.
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{port}"
        before = _descendants()
        with _loopback_node():
            ray.init(address="local", include_dashboard=True, dashboard_host=LOOPBACK, dashboard_port=port,
                     logging_level=logging.WARNING)
        _reap_when_gone([p for p in _descendants() if p not in before])


# Waits for EOF on stdin, a pipe whose write end only the driver holds: the driver is gone, by
# any exit, SIGKILL included. Then kills the processes it was given (pid, start time in clock ticks
# since boot: a wall-clock start time moves when NTP steps the clock), unless the pid now names
# another process.
_REAPER = """
import os, signal, sys
def started(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]
sys.stdin.buffer.read()
for pid, ticks in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        if started(pid) == ticks:
            os.kill(int(pid), signal.SIGKILL)
    except OSError:
        pass
"""


def _start_ticks(pid: int) -> str:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def _descendants() -> set:
    import psutil

    return set(psutil.Process().children(recursive=True))  # psutil.Process compares by pid and start time


def _reap_when_gone(started: list) -> None:
    """Make the local Ray die with its driver. Ray starts its head processes (GCS, raylet,
    dashboard) to die with their parent (PR_SET_PDEATHSIG), but not the dashboard and runtime-env
    agents the raylet starts: a driver killed by SIGKILL left those two running for good (Ray
    2.60), holding their ports. A reaper in its own session outlives the driver and kills the
    processes `ray.init` started (`started`: psutil.Process objects), none other of the driver's."""
    args = []
    for process in started:
        with contextlib.suppress(OSError):  # gone already
            args += [str(process.pid), _start_ticks(process.pid)]
    reaper = subprocess.Popen([sys.executable, "-c", _REAPER, *args], stdin=subprocess.PIPE, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _REAPERS.append(reaper)  # its pipe stays open for as long as this process lives


_REAPERS: list[subprocess.Popen] = []


LOOPBACK = "127.0.0.1"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _loopback_node():
    """A Ray started here is reachable from this host only. Ray gives a node the address other
    hosts reach it at, and then its GCS, raylet, workers and agents listen on every interface
    (no authentication: anyone on the network could run code here); only a node whose address is
    127.0.0.1 keeps them all on loopback. Ray takes that address only with its multi-host mode
    off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its default on macOS and Windows), a switch it
    reads once, when imported: turned off for this start only (Ray's processes get the address as
    an argument). tests/integration/test_faults_secrets.py checks the listening sockets."""
    from ray._private import ray_constants

    multi_host = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_host


def preflight(*, num_workers: int, cpus_per_worker: float, use_gpu: bool, what: str = "train") -> None:
    """Refuse within seconds what the cluster cannot place: Ray Train would otherwise wait for
    its placement group, time out and retry forever on a cluster without an autoscaler."""
    need = {"CPU": num_workers * cpus_per_worker}
    if use_gpu:
        need["GPU"] = float(num_workers)
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
    if short:
        raise RuntimeError(
            f"{what}.num_workers={num_workers} x cpus_per_worker={cpus_per_worker}"
            f"{' + 1 GPU each' if use_gpu else ''} needs {need}, but the Ray cluster has "
            f"{ {k: have.get(k, 0.0) for k in need} }; lower {what}.num_workers / {what}.cpus_per_worker"
            f"{f' / {what}.use_gpu' if use_gpu else ''} or add nodes"
        )


SHARED_PATHS_ENV = "GENMODELS_SHARED_PATHS"
"""os.pathsep-separated directories every node of the cluster sees at the same path (an NFS
mount, a shared volume): node-local paths under them are accepted on a multi-node cluster."""


def check_shared(paths: dict[str, str | None]) -> None:
    """On a cluster of more than one node (or with an autoscaler), refuse node-local paths that
    workers must open (`paths`: the param or input naming it -> path or URI; None is skipped)."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) <= 1 and not _autoscaling():
        return
    shared = shared_roots()
    local = node_local_paths(paths, shared)
    if local:
        listed = "; ".join(f"{key} = {path}" for key, path in local.items())
        raise RuntimeError(
            f"the Ray cluster has {len(nodes)} node(s){' and an autoscaler' if len(nodes) <= 1 else ''}, and workers on "
            f"other nodes cannot open paths on this one: {listed}. "
            f"Use storage every node reaches by URI (train.storage_path: s3://bucket/ray_results, shards over "
            f"http(s):// or s3://, MLFLOW_TRACKING_URI=http://mlflow-server:5000), or declare a directory that every "
            f"node mounts at the same path with {SHARED_PATHS_ENV}=/mnt/shared (declared now: {shared or 'none'})"
        )


def shared_roots() -> list[str]:
    """$GENMODELS_SHARED_PATHS as real paths (symlinked mounts compare equal); relative entries refused."""
    roots = [p for p in os.environ.get(SHARED_PATHS_ENV, "").split(os.pathsep) if p]
    relative = [p for p in roots if not os.path.isabs(p)]
    if relative:
        raise ValueError(f"{SHARED_PATHS_ENV}: {relative} are relative; give the absolute paths every node mounts")
    return [os.path.realpath(p) for p in roots]


def node_local_paths(paths: dict[str, str | None], shared: list[str]) -> dict[str, str]:
    """The entries of `paths` that name this node's disk and lie under no `shared` root."""
    local = {}
    for key, path in paths.items():
        scheme = path.split("://", 1)[0].lower() if path and "://" in path else ""
        if not path or path.startswith("databricks") or scheme not in ("", "file", "sqlite"):
            continue  # a URI every node reaches (s3://, http(s)://, a tracking server)
        real = os.path.realpath(path.split("://", 1)[1] if scheme else path)
        if not any(os.path.commonpath([real, root]) == root for root in shared):
            local[key] = path
    return local


def _autoscaling() -> bool:
    """Whether Ray's autoscaler v2 runs (KubeRay, `ray up`), from the flag it sets in the GCS
    (a private key, hence the guard). Autoscaler v1 leaves no such flag: its status report
    looks the same as that of a plain local Ray, so a v1 cluster counts by its nodes alone."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY) == b"1"
    except Exception:  # a Ray without this key: judge by the nodes alone
        return False


# Job submission (Ray Jobs). The runtime env is stored in the job's info, which the dashboard
# (no authentication) and `ray job list` show to anyone who reaches them: only these non-secret
# variables travel with a job; credentials come from the cluster side (node environment, a
# Kubernetes Secret).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", SHARED_PATHS_ENV, "GENMODELS_CHAOS")
SHIPPED_ARTIFACTS = ("models/featurizer",)
"""Ignored by git (DVC outputs) but small and needed by the job: added to its working_dir."""
TERMINAL_OK = "SUCCEEDED"


def check_not_secret(env: dict[str, str], command: list[str]) -> None:
    """Refuse what would show credentials in the job's info: variables named like credentials
    (by `_`-separated word: API_KEY, DB_PASS; not TOKENIZERS_PARALLELISM) and URLs with a user or
    password, in the variables or in the command."""
    for name in env:
        if secret_name(name):
            raise ValueError(f"--env {name}: looks like a credential; the runtime env is shown by the dashboard and "
                             f"`ray job list`: give it to the cluster's nodes (environment, Kubernetes Secret) instead")
    for where, value in [*((f"{name}", v) for name, v in env.items()), *(("the command", arg) for arg in command)]:
        for scheme in url_credentials(value):
            raise ValueError(f"{where}: a URL with credentials ({scheme}://...@) would be shown by the dashboard "
                             f"and `ray job list`; set them on the cluster's nodes instead (MLFLOW_TRACKING_USERNAME/PASSWORD, "
                             f"AWS_* variables, a Kubernetes Secret)")


def job_runtime_env(project_dir: str | os.PathLike, staging: str | os.PathLike, env: dict[str, str]) -> tuple[dict, int]:
    """(runtime_env, upload bytes): the project's code (git's view: tracked and untracked files that
    are not ignored, so never .git, .venv or DVC outputs) plus SHIPPED_ARTIFACTS, copied into
    `staging` as the job's working_dir, and the variables `env` (check_not_secret them first)."""
    import shutil
    import subprocess
    from pathlib import Path

    project, staging = Path(project_dir).resolve(), Path(staging)
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=project, check=True, capture_output=True,
                             text=True).stdout.strip()
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=project,
                                check=True, capture_output=True, text=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"{project}: genmodels submit ships the project's git-visible files; not a git work tree ({err})") from None
    if Path(top).resolve() != project:
        raise RuntimeError(f"run genmodels submit from the project's root ({top}), not {project}: the job's working dir is the project")
    # git has filtered already: its ignore files must not travel, or Ray would apply them again and
    # drop SHIPPED_ARTIFACTS (DVC lists models/featurizer in models/.gitignore)
    files = [project / rel for rel in listed
             if rel and (project / rel).is_file() and Path(rel).name not in (".gitignore", ".rayignore")]
    for artifact in SHIPPED_ARTIFACTS:
        if (project / artifact).is_dir():
            files += [p for p in (project / artifact).rglob("*") if p.is_file()]
    for path in files:
        target = staging / path.relative_to(project)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return {"working_dir": str(staging), "env_vars": dict(env)}, sum(path.stat().st_size for path in files)


def forwarded_env(extra: list[str] = ()) -> dict[str, str]:
    """The FORWARDED_ENV variables set here, plus `extra` NAME=VALUE pairs."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def job_client(address: str, *, timeout_s: float = 10.0):
    """A JobSubmissionClient for `address` (http://HOST:8265), or a clear error within `timeout_s`
    (Ray's client waits on the OS connect timeout, minutes for a blackholed host)."""
    import urllib.request

    from ray.job_submission import JobSubmissionClient

    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=timeout_s):
            pass
        # Ray's client takes RAY_API_SERVER_ADDRESS over the address it is given, and ensure_ray
        # sets that variable to this process's local Ray.
        saved = os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        try:
            return JobSubmissionClient(address)
        finally:
            if saved is not None:
                os.environ["RAY_API_SERVER_ADDRESS"] = saved
    except (OSError, ConnectionError, RuntimeError, ValueError) as err:
        raise RuntimeError(f"no Ray job server at {address}: {str(err).splitlines()[0]} (is the head's dashboard "
                           f"running, and reachable from here? The default port is 8265)") from None


def follow(client, job_id: str, out=print) -> str:
    """Stream the job's logs until it ends (reconnecting if the stream drops); its final status."""
    import asyncio
    import time

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out(lines.rstrip("\n"), flush=True)

    while True:
        asyncio.run(tail())
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            if str(info.status.value) != TERMINAL_OK and info.message:
                out(f"job {job_id}: {info.message}", flush=True)
            return str(info.status.value)
        time.sleep(1.0)  # the log stream ended before the job: reconnect
