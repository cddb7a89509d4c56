"""What a user sees while a stage runs: one progress display per run, and Ray kept quiet.

    with Progress("train gan", total=1000) as bar:
        bar.update(40, {"loss_d": 1.21, "img/s": 812.0})

On a terminal `Progress` is a tqdm bar (step / total, rate, ETA and the numbers); otherwise (CI,
`dvc repro` into a file) it prints one compact line per update. Training runs on Ray workers,
whose output is not the user's terminal: rank 0 puts its numbers on a Ray queue (`channel`) and
the driver draws them (`follow`).

Quiet by default, through Ray's own logging configuration, never by filtering text; `--verbose`
or GENMODELS_VERBOSE=1 shows everything (`verbose()`):
- Train's controller logs its banners ("Requesting resources", "Started training worker group")
  on the `ray.train` logger, whose console level is RunConfig's `LoggingConfig` (`train_logging`).
- "Reporting training result ..." is logged at INFO by a logger named after Train's own
  execution/context.py, which propagates to the worker's root logger (INFO under Train):
  `quiet_train_worker` raises that one logger, in the worker, after Train configured logging.
- Train's PreemptionWatcher actor makes Ray core log an error about restartable actors whose
  arguments live in the object store (ray-project/ray#53727). The watcher only matters where
  nodes can be drained (a cloud cluster): a Ray that genmodels starts on this host has none, so
  `local_ray_env` switches it off there, and it stays on for every cluster run.
- MLflow's INFO lines and its artifact download bars: MLFLOW_LOGGING_LEVEL and
  MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR, MLflow's own switches (`quiet_libraries`).
Warnings and errors of any logger, and everything a worker prints, still reach the terminal.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import IO

VERBOSE_ENV = "GENMODELS_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_libraries() -> None:
    """Before MLflow is imported (it reads its level then): its INFO lines (e.g. "Creating initial
    MLflow database tables") only when verbose; an explicit MLFLOW_LOGGING_LEVEL wins."""
    if not verbose():
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file of a few kB


def local_ray_env() -> dict[str, str]:
    """Environment for a Ray that genmodels starts on this host (its workers inherit it)."""
    return {} if verbose() else {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def train_logging(verbose_: bool | None = None):
    from ray.train.v2.api.config import LoggingConfig

    return LoggingConfig(log_level="INFO" if (verbose() if verbose_ is None else verbose_) else "WARNING")


def quiet_train_worker() -> None:
    """In a Train worker, after Train configured logging: drop its per-report INFO line."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def number(value: float) -> str:
    """Compact: 4 significant digits, no exponent for everyday sizes."""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


class Progress:
    """A progress display for `total` units of work."""

    def __init__(self, title: str, total: int, *, unit: str = "step", eta: bool = True, stream: IO[str] | None = None):
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread: updates come from one place, at a known pace
        self.title, self.total, self.unit, self.eta = title, total, unit, eta
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._tqdm = tqdm
        self.bar = None  # made at the first update, which says where a resumed run starts
        self._first: tuple[float, int] | None = None  # (time, done) then: the rate leaves start-up out
        self._lock = threading.Lock()

    def update(self, done: int, numbers: dict[str, float] | None = None, *, note: str = "", start: bool = False) -> None:
        """`done` units so far, what was done (`note`) and the numbers to show; `start`: where the
        work begins (nothing shown)."""
        shown = "  ".join([note] * bool(note) + [f"{k} {number(v)}" for k, v in (numbers or {}).items()])
        with self._lock:
            now = time.monotonic()
            if self._first is None:
                self._first = (now, done)
                if self.tty:
                    self.bar = self._tqdm(total=self.total, initial=done, desc=self.title, unit=self.unit, file=self.stream,
                                          dynamic_ncols=True, mininterval=0.5)
            elif start:  # the work began again: a worker group restarted from its last checkpoint
                self._say(f"{self.title}: restarted at {self.unit} {done}")
            if start:
                return
            if self.bar is not None:
                self.bar.update(done - self.bar.n)
                self.bar.set_postfix_str(shown, refresh=True)
                if done >= self.total:
                    self.bar.close()  # now: its rate and time leave out what follows the work
                return
            start_t, start_done = self._first
            rate = (done - start_done) / (now - start_t) if now > start_t and done > start_done else None
            eta = "" if not self.eta else f"eta {_interval((self.total - done) / rate)}" if rate else "eta ?"
            percent = f"{100 * done / self.total:.0f}%" if self.total else ""
            line = "  ".join(part for part in (f"{self.title}  {self.unit} {done}/{self.total} {percent}", shown, eta) if part)
            print(line, file=self.stream, flush=True)

    def say(self, text: str) -> None:
        """A line of its own, above the bar on a terminal."""
        with self._lock:
            self._say(text)

    def _say(self, text: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _interval(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def channel():
    """A Ray queue for progress updates from a worker to the driver (an actor of no CPU)."""
    from ray.util.queue import Queue

    return Queue(maxsize=1000, actor_options={"num_cpus": 0})


def send(queue, update: dict) -> None:
    """From a worker: never blocks training, never fails it. An update the driver has not taken in
    time is dropped, and so is one whose queue is gone (the driver stopped following)."""
    try:
        queue.put_nowait(update)
    except Exception:  # noqa: BLE001 - ray.util.queue.Full, or the queue actor died
        pass


def train_display(curve_keys: tuple[str, ...], metric: str):
    """A training update (rank 0's reported numbers) -> `Progress.update`'s arguments: the curves,
    img/s, and the periodic metric (FID, ELBO) as last measured."""
    last: dict[str, float] = {}
    shown = [*curve_keys, "train/img_per_s", metric]

    def render(update: dict) -> dict:
        last.update({k: v for k, v in update.items() if isinstance(v, float)})
        numbers = {k.split("/")[-1].replace("img_per_s", "img/s"): last[k] for k in shown if k in last}
        return {"done": update["step"], "numbers": numbers, "start": bool(update.get("start"))}

    return render


class follow:
    """On the driver, as a context: a thread that draws the updates of `queue` on `progress`.
    `render(update)` maps an update to `Progress.update`'s arguments (a dict); an update
    {"say": text} is a line of its own."""

    def __init__(self, queue, progress: Progress, render):
        self.queue, self.progress, self.render = queue, progress, render
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genmodels-progress", daemon=True)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                update = self.queue.get(block=True, timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue's actor is gone (Ray shut down): nothing more will come
                return
            try:
                if "say" in update:
                    self.progress.say(update["say"])
                else:
                    self.progress.update(**self.render(update))
            except Exception as err:  # noqa: BLE001 - a display error must not end the display
                self.progress.say(f"(progress display: {err!r})")

    def __enter__(self) -> follow:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # it drains what is queued, then sees the stop
        try:
            self.queue.shutdown()  # a `get` still waiting on a slow actor now fails, and the thread ends
        except Exception:  # noqa: BLE001 - Ray may be going down already
            pass
        self._thread.join(timeout=5)  # never left inside a Ray call when Ray shuts down
        self.progress.close()
