"""Fault injection, a supported chaos option: make a rank fail at a chosen step, once.

    GENMODELS_CHAOS=raise:1:10:/tmp/once genmodels train gan   # rank 1 raises at step 10
    GENMODELS_CHAOS=kill:1:10:/tmp/once genmodels train gan    # rank 1 SIGKILLs itself at step 10

Format `ACTION:RANK:STEP:MARKER_FILE`, ACTION `raise` (the worker's code fails: the run fails,
or restarts if `train.max_failures` allows) or `kill` (the worker process dies as on an
out-of-memory kill). The marker file makes it one-shot: the fault fires only while the marker
does not exist, and creates it, so the restarted or resumed run goes on. Read once by the driver
(`Chaos.from_env`), checked by the loop at each step only when set; this is the only place that
knows about it. The resume and failure tests use it; so can users rehearsing a recovery.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ENV_VAR = "GENMODELS_CHAOS"


@dataclass(frozen=True)
class Chaos:
    action: Literal["raise", "kill"]
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
        if action not in ("raise", "kill") or not rank.isdigit() or not step.isdigit() or not marker:
            raise ValueError(f"{ENV_VAR}={spec!r}: expected ACTION:RANK:STEP:MARKER_FILE with ACTION raise or kill")
        return cls(action, int(rank), int(step), marker)

    def at_step(self, rank: int, step: int) -> None:
        if rank != self.rank or step != self.step or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(f"{self.action} at step {step}\n")
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"{ENV_VAR}: injected failure on rank {rank} at step {step}")
