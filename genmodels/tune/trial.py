"""One Tune trial is one Ray Train run, built by a Tune function trainable (the Ray 2.60 Train V2 pattern).

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), TRIAL_RESOURCES)

The trial function holds no CPU (`genmodels.tune.TRIAL_RESOURCES`): the Train workers hold the
trial's resources (a trial asking for a CPU next to two 1-CPU workers would never be placed on a
2-CPU machine).

Why not the stock `TuneReportCallback`: it forwards metrics only (a checkpoint becomes a
`checkpoint_path` metric), so Tune holds no checkpoint and PBT can never exploit; it forwards
reports that lack the sweep's metric, which Tune rejects; and the workers train on while Tune
decides, so a trial that Tune stops or pauses has already trained (and logged) past the result
the decision was about. `ReportToTune` does the same job (a `UserCallback` in the Train
controller) but hands every report, with its checkpoint, through a queue to the trial function,
which reports it to Tune itself while `fit()` runs in a thread (under PBT with a copy of the
Train checkpoint plus `source.json`, where it came from, which then lives as long as Tune keeps
it) and only then lets rank 0 go on (`tune_gate`). A trial is thus always stopped or paused
exactly at the step Tune saw.

Names are deterministic, so a restored sweep finds everything again: the MLflow child run by
its run key `<sweep run key>/<trial id>`, the Train run `<sweep>-<trial id>` (a rerun resumes
from its latest checkpoint), and a run started from a Tune checkpoint (PBT's exploit, or a
paused trial continued) `<sweep>-<trial id>-from-<source trial id>-<step>`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ray.train import UserCallback

from genmodels.config import apply_overrides
from genmodels.train.checkpoint import StartFrom
from genmodels.train.loop import TUNE_GATE_KEY, TrainJob, tracking_stop_error

SOURCE_FILE = "source.json"


class TrialError(RuntimeError):
    """A trial's training failed; the message carries the worker's own error."""


@dataclass(frozen=True)
class Sweep:
    """What every trial needs, built once by the driver and handed to Tune by value."""

    name: str
    job: TrainJob
    """The template: the sweep's data, family and base params (step budget applied); run_id "-"."""
    keys: tuple[str, ...]
    """The search-space keys (dotted `train.*`), as in each trial's config."""
    metric: str
    mode: str
    pbt: bool
    storage: str
    """Train runs live under `<storage>/<name>.trials/`; Tune's own state under `<storage>/<name>/`."""
    tracking_uri: str
    experiment: str
    run_key: str
    """The parent run's key; a child's is `<run_key>/<trial id>`."""
    parent_run_id: str
    data: dict
    """The data part of the resolved config (`train.run.run_config`)."""
    tags: dict = field(default_factory=dict)
    """git / runtime / data tags, as on a training run."""

    @property
    def trials_storage(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}.trials"

    def child_key(self, trial_id: str) -> str:
        return f"{self.run_key}/{trial_id}"


class ReportToTune(UserCallback):
    """In the Train controller: every report, with its checkpoint, into the trial function's queue;
    `for_tune` when it carries the sweep's metric (the others are only acknowledged)."""

    def __init__(self, queue, metric: str):
        self.queue, self.metric = queue, metric

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({"metrics": dict(metrics[0]), "checkpoint": checkpoint, "for_tune": self.metric in metrics[0]}, block=True)


def run_trial(config: dict, sweep: Sweep) -> None:
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    values = {key: config[key] for key in sweep.keys}
    params = apply_overrides(sweep.job.params, values)
    job = sweep.job.model_copy(update={"params": params})
    run_id = _open_child(sweep, job, trial_id, values)
    job = job.model_copy(update={"run_id": run_id})
    name, start_from = _start(sweep, trial_id, run_id, values)
    _fit_and_forward(sweep, job, name, trial_id, start_from)


def _open_child(sweep: Sweep, job: TrainJob, trial_id: str, values: dict) -> str:
    from genmodels.tracking import Tracking, open_run

    from genmodels.train.run import run_config

    base = f"{sweep.name}-{trial_id}"
    family = job.family
    tags = {**sweep.tags, "mlflow.parentRunId": sweep.parent_run_id, "tune.sweep": sweep.name, "tune.trial_id": trial_id,
            "ray.run_name": base, "ray.world_size": str(job.params.num_workers), "genmodels.family": family,
            **{f"tune.config.{k}": json.dumps(v) for k, v in values.items()}}
    run_id, _ = open_run(Tracking(sweep.tracking_uri, None), experiment=sweep.experiment, run_key=sweep.child_key(trial_id),
                         run_name=base, params=run_config(job, sweep.data), tags=tags)
    return run_id


def _start(sweep: Sweep, trial_id: str, run_id: str, values: dict) -> tuple[str, StartFrom | None]:
    """The Train run name, and the checkpoint it starts from when Tune restarts the trial from one."""
    import ray.tune

    base = f"{sweep.name}-{trial_id}"
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return base, None
    with checkpoint.as_directory() as directory:
        source = json.loads((Path(directory) / SOURCE_FILE).read_text())
        mutable = tuple(key.removeprefix("train.") for key in sweep.keys)  # train.gan.lr_g -> gan.lr_g (identity keys)
        exploit = source["trial_id"] != trial_id  # else a paused trial continues its own noise streams
        reseed = int(hashlib.sha256(f"{trial_id}:{source['step']}".encode()).hexdigest()[:8], 16) if exploit else None
        start_from = StartFrom.from_directory(Path(directory), may_differ=mutable, reseed=reseed,
                                              label=f"trial {source['trial_id']} step {source['step']} (Train run {source['run_name']})")
    step = source["step"]
    if exploit:  # MLflow params are immutable, so the change goes into tags
        from genmodels.tracking import RunLogger

        RunLogger(sweep.tracking_uri, run_id).set_tags({
            f"tune.exploit.{step}.donor": source["trial_id"], f"tune.exploit.{step}.config": json.dumps(values, sort_keys=True),
            f"tune.exploit.{step}.donor_weights_sha256": start_from.files.get("weights_rank0.sha256", b"").decode()})
    return f"{base}-from-{source['trial_id']}-{step:08d}", start_from


def _fit_and_forward(sweep: Sweep, job: TrainJob, name: str, trial_id: str, start_from: StartFrom | None) -> None:
    """Run the Train run in a thread and report what it reports to Tune from this one. When Tune
    stops the trial (ASHA, PBT), `ray.tune.report` ends this thread, rank 0 is still waiting at
    the gate, and Tune ends the actor, and with it the Train controller it owns, its workers and
    their placement group."""
    import ray.tune
    from ray.util.queue import Empty, Queue

    from genmodels.train.run import make_trainer, worker_error

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    gate = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = make_trainer(job, name=name, storage=sweep.trials_storage, callbacks=[ReportToTune(queue, sweep.metric)],
                           start_from=start_from, tune_gate=gate)
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the trial's thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name=f"fit-{name}", daemon=True)
    thread.start()
    while True:
        try:
            item = queue.get(block=True, timeout=1.0)
        except Empty:
            if thread.is_alive() or not queue.empty():
                continue
            break  # the controller has returned: every report is in
        token = item["metrics"].pop(TUNE_GATE_KEY)
        if item["for_tune"]:
            _report(sweep, item, name, trial_id, ray.tune)  # Tune may end this thread here (ASHA stop, PBT pause)
        gate.put(token)  # rank 0 trains on
    queue.shutdown()
    gate.shutdown()
    if "error" in outcome:
        raise TrialError(f"trial {trial_id} (Train run {name!r}) failed: {worker_error(outcome['error'])}")
    stopped = tracking_stop_error(outcome["result"].metrics or {}, job) if "result" in outcome else None
    if stopped:
        raise TrialError(f"trial {trial_id} (Train run {name!r}) stopped: {stopped}")


def _report(sweep: Sweep, item: dict, name: str, trial_id: str, tune) -> None:
    checkpoint, metrics = item["checkpoint"], item["metrics"]
    if not (sweep.pbt and checkpoint is not None):
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="genmodels-tune-ckpt-") as tmp:
        checkpoint.to_directory(tmp)
        source = {"trial_id": trial_id, "run_name": name, "step": metrics["step"]}
        (Path(tmp) / SOURCE_FILE).write_text(json.dumps(source))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
