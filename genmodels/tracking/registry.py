"""The MLflow model registry as the promotion stages use it: aliases, a lock, an audit trail.

    client = MlflowClient(tracking_uri)
    with promotion_lock(client, "genmodels-gan", on_wait=print):   # one alias mover at a time
        champion = aliases(client, "genmodels-gan").get(CHAMPION)
        move_alias(client, "genmodels-gan", CHAMPION, "3", entry={"action": "promote", ...})
    history = audit_trail(client, "genmodels-gan")                 # [{"seq": 1, "action": ..., ...}]

MLflow has no compare-and-set on aliases and keeps no alias history. So:
- The lock is a registered model named `<name>.promotion-lock`: creating a registered model is
  atomic and fails when the name exists. Its tags say who holds it. A lock whose holder is a dead
  process on this host (and pid namespace), or older than `stale_s`, is broken, and only by the
  one process that creates the break marker `<lock>.break-<holder token>` (also atomic); it
  checks the token again before deleting. For a dead holder that is exact. A holder alive past
  `stale_s` (10 minutes; a move takes about a second) may have its lock broken, and warns.
- The audit trail is one registered-model tag per move, `audit.NNNNNN` = JSON (SQL stores cap a
  tag value at 5,000 characters, so one growing tag would not do), written under the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
import warnings
from typing import Callable, Iterator

from genmodels.tracking import TrackingError

CANDIDATE, CHAMPION = "candidate", "champion"
LOCK_SUFFIX = ".promotion-lock"
AUDIT_PREFIX = "audit."
LOCK_TIMEOUT_S = 120.0
LOCK_STALE_S = 600.0
_POLL_S = 0.2


def _already_exists(err: Exception) -> bool:
    return getattr(err, "error_code", None) == "RESOURCE_ALREADY_EXISTS"


def _missing(err: Exception) -> bool:
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


@contextlib.contextmanager
def promotion_lock(client, name: str, *, timeout_s: float = LOCK_TIMEOUT_S, stale_s: float = LOCK_STALE_S,
                   on_wait: Callable[[str], None] = lambda message: None) -> Iterator[str]:
    """Hold the promotion lock of registered model `name`; yields this holder's token."""
    from mlflow.exceptions import MlflowException

    lock, token = name + LOCK_SUFFIX, uuid.uuid4().hex
    tags = {"token": token, **_identity(), "pid": str(os.getpid()), "acquired_at": f"{time.time():.3f}"}
    deadline, said = time.monotonic() + timeout_s, set()

    def say_once(message: str) -> None:
        if message not in said:
            said.add(message)
            on_wait(message)

    while True:
        try:
            client.create_registered_model(lock, tags=tags, description=f"lock: {tags['host']} pid {tags['pid']} is moving aliases of {name}")
            break
        except MlflowException as err:
            if not _already_exists(err):
                raise
        holder = _holder(client, lock)
        if holder is None:
            continue  # released between our attempt and the read
        if holder.get("token") == token:
            break  # our create succeeded, and a retry of it (the REST client retries) found it
        who = f"pid {holder.get('pid')} on {holder.get('host')}"
        if time.monotonic() > deadline:
            raise TrackingError(f"the promotion lock of {name} is still held by {who} after {timeout_s:.0f} s; if that "
                                f"process is gone, delete the registered model {lock!r}")
        if _is_stale(holder, stale_s):
            say_once(f"breaking the stale promotion lock of {name} ({who})")
            _break(client, lock, holder.get("token", ""), stale_s)
        else:
            say_once(f"waiting for the promotion lock of {name}, held by {who}")
        time.sleep(_POLL_S)  # MLflow has no blocking wait: poll the lock's existence
    try:
        yield token
    finally:
        with contextlib.suppress(MlflowException):
            if (_holder(client, lock) or {}).get("token") == token:
                client.delete_registered_model(lock)
            else:  # broken as stale while held (older than stale_s): another mover may have overlapped
                warnings.warn(f"the promotion lock of {name} was broken while this process held it", stacklevel=3)


def _identity() -> dict[str, str]:
    """Host, and the pid namespace (a container sharing the host's name has pids of its own)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "pid_namespace": namespace}


def _holder(client, lock: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock)
    except MlflowException as err:
        if _missing(err):
            return None
        raise
    return {**model.tags, "created_ms": str(model.creation_timestamp or 0)}


def _is_stale(holder: dict, stale_s: float) -> bool:
    """A holder older than `stale_s` (by its own clock), or a dead process in this pid namespace."""
    try:
        acquired_at, pid = float(holder.get("acquired_at", "0")), int(holder.get("pid", "0"))
    except ValueError:
        return True  # not a lock this code wrote
    if time.time() - acquired_at > stale_s:
        return True
    same = {k: holder.get(k) for k in ("host", "pid_namespace")} == _identity()
    if same and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
    return False


def _break(client, lock: str, stale_token: str, stale_s: float) -> None:
    """Delete the stale lock `stale_token` unless another process is doing so (it holds the
    marker); a marker left by a breaker that died is itself removed once older than `stale_s`."""
    from mlflow.exceptions import MlflowException

    marker = f"{lock}.break-{stale_token or 'unknown'}"
    try:
        client.create_registered_model(marker)
    except MlflowException as err:
        if not _already_exists(err):
            raise
        left = _holder(client, marker)
        if left is not None and time.time() * 1000 - float(left["created_ms"]) > stale_s * 1000:
            client.delete_registered_model(marker)
        return
    try:
        if (_holder(client, lock) or {}).get("token") == stale_token:
            client.delete_registered_model(lock)
    finally:
        client.delete_registered_model(marker)


def aliases(client, name: str) -> dict[str, str]:
    """alias -> version of registered model `name`."""
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def audit_trail(client, name: str) -> list[dict]:
    """The recorded alias moves of `name`, oldest first, each with its "seq"."""
    tags = client.get_registered_model(name).tags
    entries = [{**json.loads(value), "seq": int(key[len(AUDIT_PREFIX):])}
               for key, value in tags.items() if key.startswith(AUDIT_PREFIX) and key[len(AUDIT_PREFIX):].isdigit()]
    return sorted(entries, key=lambda entry: entry["seq"])


def move_alias(client, name: str, alias: str, version: str, *, entry: dict) -> dict:
    """Point `alias` at `version` and record `entry` as the next audit tag (hold the lock)."""
    seq = max((e["seq"] for e in audit_trail(client, name)), default=0) + 1
    record = {**entry, "alias": alias, "to_version": str(version), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    key = f"{AUDIT_PREFIX}{seq:06d}"
    client.set_registered_model_tag(name, key, json.dumps(record, sort_keys=True))
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except BaseException:
        client.delete_registered_model_tag(name, key)  # no entry for a move that did not happen
        raise
    return {**record, "seq": seq}


def champion_history(entries: list[dict]) -> list[str]:
    """The champion versions the trail leaves, oldest first: a move pushes, a rollback pops."""
    stack: list[str] = []
    for entry in entries:
        if entry.get("alias", CHAMPION) != CHAMPION:
            continue
        if entry["action"] == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(str(entry["to_version"]))
    return stack


def who(project_dir) -> dict:
    """The audit entry's user and the git commit of the code that moved the alias."""
    import getpass

    from genmodels.tracking import git_tags

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no USER/LOGNAME and no passwd entry (containers)
        user = f"uid {os.getuid()}"
    return {"user": user, "host": socket.gethostname(), "git_commit": git_tags(project_dir)["git.commit"]}
