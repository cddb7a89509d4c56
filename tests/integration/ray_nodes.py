"""Real Ray nodes for cluster tests: `ray start --block` child processes with ports of their own,
stopped by pid (never `ray stop`, which kills every Ray process on the host).

    with ray_head(short_temp_dir(), num_cpus=2) as head:     # head.address "127.0.0.1:PORT"
        ...                                                   # head.dashboard "http://127.0.0.1:PORT"
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.integration.mlflow_server import _free_port

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 5.0  # `ray start --block` takes ~20 s over SIGTERM; nothing of a test node needs saving


def short_temp_dir() -> Path:
    """A Ray temp dir short enough for its AF_UNIX socket paths (107 bytes; pytest's tmp_path is not)."""
    return Path(tempfile.mkdtemp(prefix="gm-ray-", dir="/tmp"))


@dataclass(frozen=True)
class Head:
    address: str
    dashboard: str
    temp_dir: Path


def _ray() -> str:
    return str(Path(sys.executable).parent / "ray")


def _ports() -> list[str]:
    """Every port a node opens, its own: two nodes on one host must not collide."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
             "--dashboard-agent-listen-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [arg for name in names for arg in (name, str(_free_port()))]


@contextlib.contextmanager
def ray_head(temp_dir: Path, *, num_cpus: int, env: dict | None = None, wrapper: list[str] = ()) -> Iterator[Head]:
    """Every node is told its dashboard (RAY_API_SERVER_ADDRESS), as genmodels.cluster.ensure_ray
    tells a local Ray, so that Ray's state API never has to pick among the Rays of this host."""
    port, dashboard_port = _free_port(), _free_port()
    head = Head(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard_port}", temp_dir=temp_dir)
    command = [*wrapper, _ray(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
               "--num-cpus", str(num_cpus), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(_free_port()),
               "--temp-dir", str(temp_dir), "--disable-usage-stats", *_ports()]
    try:
        with _node(command, temp_dir / "head.log", {"RAY_API_SERVER_ADDRESS": head.dashboard, **(env or {})}) as process:
            _wait_for(lambda: _answers(f"{head.dashboard}/api/version"), "the head's dashboard", temp_dir / "head.log", process)
            yield head
    finally:
        kill_leftovers(temp_dir)


@contextlib.contextmanager
def ray_worker_node(head: Head, log: Path, *, num_cpus: int, env: dict | None = None,
                    wrapper: list[str] = ()) -> Iterator[subprocess.Popen]:
    """A second node joining `head`; `wrapper` runs it inside e.g. `unshare -m sh -c ...`."""
    command = [*wrapper, _ray(), "start", "--block", "--address", head.address, "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--disable-usage-stats", *_ports()]
    with _node(command, log, {"RAY_API_SERVER_ADDRESS": head.dashboard, **(env or {})}) as process:
        yield process


@contextlib.contextmanager
def _node(command: list[str], log_path: Path, env: dict | None) -> Iterator[subprocess.Popen]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            yield process
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the node's process group (raylet, GCS, dashboard are its children), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # children that outlived `ray start`
            return
        except subprocess.TimeoutExpired:
            continue


def kill_leftovers(temp_dir: Path) -> None:
    """SIGKILL, by pid, processes of this cluster that left its process group: job drivers run in
    sessions of their own, with the job's working dir (under `temp_dir`) as their cwd."""
    marker = str(temp_dir)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(marker) or marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_for(ready, what: str, log_path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        if process.poll() is not None:
            raise AssertionError(f"{what}: `ray start` exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.25)  # polling a starting server: there is nothing to wait on
    raise AssertionError(f"{what} did not come up in {START_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-3000:]}")


def hiding(directories: list[Path]) -> list[str]:
    """A command prefix that runs the rest in a mount namespace of its own where each directory
    is an empty tmpfs (what a node of a real cluster sees of another machine's disk)."""
    mounts = " && ".join(f'mount -t tmpfs none "${i + 1}"' for i in range(len(directories)))
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && shift {len(directories)} && exec "$@"',
            "sh", *map(str, directories)]
