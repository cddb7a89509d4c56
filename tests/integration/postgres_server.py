"""A throwaway PostgreSQL cluster on 127.0.0.1 for integration tests (`make postgres` installs
Debian's server package; nothing here touches the package's own cluster).

    with start_postgres() as uri:     # "postgresql+psycopg2://genmodels@127.0.0.1:PORT/mlflow"
        start_mlflow_server(root, backend_store_uri=uri)...

initdb into a fresh directory under the system temp dir (pytest's tmp dirs are root-only, 0700,
and PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` system user
the package creates), trust authentication on 127.0.0.1 only, one database, fast shutdown by
pid at exit and the directory removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from tests.integration.mlflow_server import POLL_INTERVAL_S, STOP_TIMEOUT_S, _free_port, _tail

START_TIMEOUT_S = 60.0
USER = "genmodels"
DATABASE = "mlflow"
_INSTALL_HINT = "PostgreSQL's server is needed: `make postgres` (apt-get install postgresql)"


def postgres_bin_dir() -> Path:
    """Debian's /usr/lib/postgresql/<newest version>/bin, else the directory of `initdb` on PATH."""
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name))

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    initdb = found[-1] if found else shutil.which("initdb")
    assert initdb, _INSTALL_HINT
    return Path(initdb).parent


def _owner() -> dict:
    """Popen arguments that run the server as `postgres` when we are root (as ourselves otherwise)."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise AssertionError(f"running as root and there is no `postgres` user to run the server as: {_INSTALL_HINT}") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def start_postgres(database: str = DATABASE) -> Iterator[str]:
    """Start a fresh cluster, yield the SQLAlchemy URI of `database` once it accepts connections."""
    bin_dir, owner = postgres_bin_dir(), _owner()
    root = Path(tempfile.mkdtemp(prefix="genmodels-postgres-"))
    try:
        if owner:
            os.chown(root, owner["user"], owner["group"])
        data, log_path = root / "data", root / "server.log"
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--encoding=UTF8", "--locale=C",
             "--no-sync"],  # --no-sync: initdb's own fsyncs only; the server keeps fsync on
            cwd=root, capture_output=True, text=True, **owner,
        )
        assert initdb.returncode == 0, f"initdb failed:\n{initdb.stdout}{initdb.stderr}"
        port = _free_port()
        with open(log_path, "wb") as log:
            if owner:
                os.fchown(log.fileno(), owner["user"], owner["group"])
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-k", str(root), "-h", "127.0.0.1", "-p", str(port)],
                cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **owner,
            )
        try:
            _wait_ready(bin_dir, process, port, log_path)
            created = subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, database],
                                     capture_output=True, text=True, timeout=30)
            assert created.returncode == 0, f"createdb failed: {created.stderr}"
            yield f"postgresql+psycopg2://{USER}@127.0.0.1:{port}/{database}"
        finally:
            _stop(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(bin_dir: Path, process: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-t", "2"],
                         timeout=10).returncode != 0:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited with {process.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"postgres on 127.0.0.1:{port} not ready after {START_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")
        time.sleep(POLL_INTERVAL_S)


def _stop(process: subprocess.Popen) -> None:
    """SIGINT to the postmaster (fast shutdown: it ends its backends and waits for them), SIGKILL to
    its whole group if it is not gone after STOP_TIMEOUT_S."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()
