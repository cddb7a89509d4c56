"""Fault injection, a supported chaos option: make a rank fail at a chosen step, once.

    GENMODELS_CHAOS=raise:1:10:/tmp/once genmodels train gan   # rank 1 raises at step 10
    GENMODELS_CHAOS=kill:1:10:/tmp/once genmodels train gan    # rank 1 SIGKILLs itself at step 10
    GENMODELS_CHAOS=stop:1:10:/tmp/once genmodels train gan    # rank 1 SIGSTOPs itself at step 10
    GENMODELS_CHAOS=tear:0:12:/tmp/once genmodels train gan    # rank 0 dies while writing step 12's checkpoint
    GENMODELS_CHAOS=pause:0:5:/tmp/once genmodels train gan    # rank 0 holds at step 5 until /tmp/once is rewritten

Format `ACTION:RANK:STEP:MARKER_FILE`, ACTION `raise` (the worker's code fails: the run fails,
or restarts if `train.max_failures` allows), `kill` (the worker process dies as on an
out-of-memory kill), `stop` (the process freezes, as a rank stuck in a driver or on a dead
link: `train.collective_timeout_s` surfaces it), `tear` (at a checkpoint step: the process
dies with its share of that checkpoint half written) or `pause` (the rank holds at that step,
the others at their next collective, until the marker file is rewritten or removed, for up to
PAUSE_TIMEOUT_S: a fault elsewhere, such as the tracking server going down, then lands at a
known step). The marker file makes it one-shot: the fault fires only while the marker
does not exist, and creates it, so the restarted or resumed run goes on. Read once by the driver
(`Chaos.from_env`), checked by the loop at each step only when set; this is the only place that
knows about it. The resume and failure tests use it; so can users rehearsing a recovery.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ENV_VAR = "GENMODELS_CHAOS"
PAUSE_TIMEOUT_S = 600.0  # a test that forgot to release the pause fails instead of hanging
POLL_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Chaos:
    action: Literal["raise", "kill", "stop", "tear", "pause"]
    rank: int
    step: int
    marker: str

    @classmethod
    def from_env(cls) -> Chaos | None:
        spec = os.environ.get(ENV_VAR, "")
        if not spec:
            return None
        action, _, rest = spec.partition(":")
        rank, _, rest = rest.partition(":")
        step, _, marker = rest.partition(":")
        if action not in ("raise", "kill", "stop", "tear", "pause") or not rank.isdigit() or not step.isdigit() or not marker:
            raise ValueError(f"{ENV_VAR}={spec!r}: expected ACTION:RANK:STEP:MARKER_FILE with ACTION raise, kill, stop, "
                             "tear or pause")
        return cls(action, int(rank), int(step), marker)

    def _fires(self, rank: int, step: int, actions: tuple[str, ...]) -> bool:
        if self.action not in actions or rank != self.rank or step != self.step or os.path.exists(self.marker):
            return False
        Path(self.marker).write_text(f"{self.action} at step {step}\n")
        return True

    def at_step(self, rank: int, step: int) -> None:
        if not self._fires(rank, step, ("raise", "kill", "stop", "pause")):
            return
        if self.action == "pause":
            self._hold(f"pause at step {step}\n")  # what _fires wrote
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen until someone sends SIGCONT or SIGKILL
            return
        raise RuntimeError(f"{ENV_VAR}: injected failure on rank {rank} at step {step}")

    def in_checkpoint(self, rank: int, step: int, directory: Path) -> None:
        """`tear`: cut this rank's largest checkpoint file to half, as a crash mid-write leaves it,
        and die before the checkpoint is handed to Ray."""
        if not self._fires(rank, step, ("tear",)):
            return
        largest = max(Path(directory).iterdir(), key=lambda p: p.stat().st_size)
        with open(largest, "r+b") as f:
            f.truncate(largest.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def _hold(self, text: str) -> None:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while _read(self.marker) == text:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ENV_VAR}: paused for {PAUSE_TIMEOUT_S:.0f} s and nobody rewrote {self.marker}")
            time.sleep(POLL_INTERVAL_S)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None
