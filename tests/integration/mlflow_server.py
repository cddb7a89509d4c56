"""A real `mlflow server` (sqlite backend unless told another, proxied artifacts) for integration tests.

    with start_mlflow_server(tmp_path) as url:      # "http://127.0.0.1:PORT"
        MlflowClient(tracking_uri=url)...
    start_mlflow_server(tmp_path, backend_store_uri="postgresql+psycopg2://...")   # see postgres_server.py
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

START_TIMEOUT_S = 180.0  # beside other test processes on 2 cores, 90 s was seen to fall short
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.25


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _launch(root: Path, port: int, backend_store_uri: str | None = None, workers: int = 1) -> subprocess.Popen:
    """Start `mlflow server` on 127.0.0.1:`port` storing into `root`, its output appended to
    `root/server.log`; return once /health answers."""
    root.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{(root / 'server.db').resolve()}",
        "--artifacts-destination", str((root / "artifacts").resolve()),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
    ]
    # The huey job runner is off: it is one more process group member, and no test uses jobs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log_path = root / "server.log"
    # A file, not a pipe: nobody reads the server's output while tests run, and a full pipe blocks it.
    # Appended: one log across the restarts of an MlflowServer.
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: uvicorn workers are stopped with it
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server on {url} not healthy after {START_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")
            time.sleep(POLL_INTERVAL_S)
    except BaseException:
        _stop(process)
        raise
    return process


@contextlib.contextmanager
def start_mlflow_server(root: Path, backend_store_uri: str | None = None, workers: int = 1) -> Iterator[str]:
    """Start a server storing into `root` (runs in `root/server.db` unless `backend_store_uri` names
    another store) with `workers` uvicorn workers, yield its URL once /health answers, stop its
    process group."""
    port = _free_port()
    process = _launch(root, port, backend_store_uri, workers)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group (mlflow and its uvicorn worker), SIGKILL to whatever is left after 10 s."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            process.poll()  # reap mlflow itself, or its zombie keeps the group alive
            os.killpg(process.pid, 0)  # raises ProcessLookupError once the group is empty
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(path: Path, num_chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-num_chars:]


class MlflowServer:
    """A server that a test takes down mid-run and brings back: the same port, the same stores.

        server = MlflowServer(tmp_path)
        server.start()      # server.url: "http://127.0.0.1:PORT"
        server.kill()       # down at once, as a crash
        server.start()      # back, with every run it had
        server.stop()
    """

    def __init__(self, root: Path):
        self.root = root
        self.url = f"http://127.0.0.1:{_free_port()}"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it, and return once /health answers."""
        self._process = _launch(self.root, int(self.url.rsplit(":", 1)[1]))

    def kill(self) -> None:
        """SIGKILL to its process group, as a crash leaves it; returns once every member is gone."""
        process, self._process = self._process, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(process.pid, 0)  # raises ProcessLookupError once the group is empty
                time.sleep(0.05)
            raise RuntimeError(f"mlflow server on {self.url}: process group {process.pid} outlived SIGKILL")

    def stop(self) -> None:
        if self._process is not None:
            _stop(self._process)
            self._process = None
