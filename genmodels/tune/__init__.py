"""Ray Tune sweeps over `train` params: every trial a full Ray Train (DDP) run.

    from genmodels.tune import tune
    summary = tune(params, "gan", shards="data/shards", out_dir="tune")     # or resume=True

The `tune` section of params.yaml says what is searched (`space`), how (`search`: random or
Optuna TPE; `scheduler`: FIFO, ASHA or synchronous PBT) and for how long (`num_steps` per
trial, `num_samples` trials). The metric is the family's own unless set: FID (min) for GANs,
val ELBO (max) for VAEs, from the periodic evaluation that every trial runs as `genmodels
train` does (`train.eval_every_steps`); Tune's time is the training step.

Tracking: one MLflow parent run per sweep (space, search, scheduler and budget as params; the
best trial's values and metric; `trials.csv`; `metric_vs_step.png`) and one nested child run per
trial that logs what a training run logs. Every run ends FINISHED, FAILED or KILLED, also when
ASHA stops a trial (the driver's `ChildRuns` callback ends it) and on Ctrl-C / SIGTERM (Tune
stops gracefully and saves its state; `--resume` continues).

Outputs: `<out_dir>/<family>_best.yaml`, a params overlay:
`genmodels train gan --overlay tune/gan_best.yaml`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune as ray_tune
from ray.tune import Callback
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from genmodels.cluster import check_shared, ensure_ray, preflight
from genmodels.config import Distribution, Params, apply_overrides, check_space
from genmodels.families import Family, get_family
from genmodels.files import run_lock
from genmodels.progress import number, verbose
from genmodels.tune.trial import Sweep, run_trial


# The trial function needs no CPU: its Train workers hold the trial's resources. Ray 2.60 refuses a
# request that is all zeros ({"CPU": 0}: "empty head and zero worker bundles"), so it asks for one
# byte of the `memory` resource, which every node has.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}


class SweepError(RuntimeError):
    """The sweep cannot run as configured, or all of its trials failed."""


def tune(params: Params, family: str, *, shards: str | Path = "data/shards", out_dir: str | Path = "tune",
         project_dir: str | Path = ".", featurizer_dir: str | Path = "models/featurizer", resume: bool | None = False) -> dict:
    """Run (or with `resume`, continue; None: continue if it exists) the sweep of `family`."""
    from genmodels.tracking import finish_run, git_tags, open_run, resolve_tracking, runtime_tags
    from genmodels.train.loop import code_digest
    from genmodels.train.run import Interrupted, _DriverSignals, _resolve

    spec, tp = get_family(family), params.tune
    metric, mode = tp.metric or spec.metric, tp.mode or spec.mode
    space = tp.space.get(family, {})
    if not space:
        raise SweepError(f"tune.space.{family} is empty: nothing to search")
    budget = tp.num_steps or spec.params(params.train).num_steps
    _check_schedule(params, spec, metric, budget)
    base = params.model_copy(update={"train": apply_overrides(params.train, {f"train.{family}.num_steps": budget})})
    project_dir = Path(project_dir).resolve()
    tracking = resolve_tracking(project_dir)
    resolved = _resolve(base, spec, shards, project_dir, tracking.uri, Path(featurizer_dir))  # fails before Ray starts
    key = _sweep_key(family, tp, resolved.job, code_digest())
    name = tp.name or f"{family}-tune-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}"
    path = f"{resolved.storage.rstrip('/')}/{name}"
    # Held from before the exists check to the end: two sweeps of one name at once would both
    # start it, or both resume it, into the same trial directories.
    with run_lock(resolved.storage, name, f"tune {family}: sweep"):
        exists = ray_tune.Tuner.can_restore(path)
        if resume is None:  # auto
            resume = exists
        if resume and tp.scheduler == "pbt":
            # Tune 2.60 does not save its scheduler: a restored synchronous PBT restarts its timers from
            # step 0, and its next sync point can fall behind the paused trials, which then wait for ever.
            raise SweepError(f"a PBT sweep cannot be resumed (Ray Tune does not restore PBT's state; seen to hang): "
                             f"start it again under another tune.name, or delete {path}")
        if resume and not exists:
            raise SweepError(f"no sweep {name!r} to resume at {path}" + ("" if tp.name else
                             " (the default name hashes the data, the params and the genmodels code: set tune.name "
                             "to a sweep's name to resume it after a change)"))
        if exists and not resume:
            raise SweepError(f"sweep {name!r} already exists at {path}: continue it with --resume, "
                             "or set tune.name (or delete that directory) to start another")
        key_file = f"{resolved.storage.rstrip('/')}/{name}.trials/sweep.json"
        if resume:  # Tuner.restore brings back the saved space, search and scheduler: the params must be the same
            _check_same_sweep(key_file, key, name)

        ensure_ray()
        check_shared({"train.storage_path": resolved.storage, "shards": resolved.job.shards, "tracking store": tracking.uri,
                      "tracking artifacts": tracking.artifact_location})
        concurrency = _concurrency(base, tp.max_concurrent_trials)
        if tp.scheduler == "pbt" and not 2 <= tp.num_samples <= concurrency:
            raise SweepError(f"scheduler pbt runs its population side by side: tune.num_samples ({tp.num_samples}) must be "
                             f"at least 2 and at most the {concurrency} trial(s) that run at once; lower tune.num_samples or "
                             "train.num_workers, or add nodes")
        if not resume:
            _write(key_file, json.dumps(key, indent=2, sort_keys=True, default=str))
        print(f"tune {family}: sweep {name!r}: {tp.num_samples} trials of {budget} steps, {tp.search} search, {tp.scheduler}, "
              f"{metric} ({mode}); {concurrency} concurrent trial(s) of {base.train.num_workers} worker(s)", flush=True)

        run_key = path
        tags = {**git_tags(project_dir), **runtime_tags(), "data.manifest_sha256": resolved.job.manifest_sha256,
                "data.source": resolved.manifest.source}
        parent_id, _ = open_run(tracking, experiment=base.train.experiment, run_key=run_key, run_name=name,
                                params=_parent_params(family, tp, space, metric, mode, budget, concurrency),
                                tags={**tags, "genmodels.family": family, "tune.sweep": name})
        sweep = Sweep(name=name, job=resolved.job, keys=tuple(space), metric=metric, mode=mode, pbt=tp.scheduler == "pbt",
                      storage=resolved.storage, tracking_uri=tracking.uri, experiment=base.train.experiment, run_key=run_key,
                      parent_run_id=parent_id, data=resolved.config["data"], tags=tags)
        trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, sweep=sweep), TRIAL_RESOURCES)
        with _DriverSignals() as signals, _tune_sigint_off():
            signals.deferred = True  # Tune stops gracefully (trials stopped, state saved); then we end the runs
            signals.abort = lambda: _stop_tune(len(signals.received))
            try:
                if resume:
                    tuner = ray_tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
                else:
                    tuner = ray_tune.Tuner(trainable, param_space={k: _domain(d) for k, d in space.items()},
                                           tune_config=_tune_config(tp, space, metric, mode, budget, concurrency),
                                           run_config=ray_tune.RunConfig(name=name, storage_path=resolved.storage,
                                                                         callbacks=[ChildRuns(sweep, budget), TrialEvents(sweep, budget, tp.num_samples)],
                                                                         checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=4),  # PBT's donors (a copy each)
                                                                         failure_config=ray_tune.FailureConfig(max_failures=0),
                                                                         verbose=2 if verbose() else 0))
                results = tuner.fit()
                if signals.received:
                    raise KeyboardInterrupt
                summary = _finish(spec, sweep, results, Path(out_dir), budget)
                _close_children(sweep, "FINISHED")  # any the callback could not end (a tracking-store hiccup)
                if signals.received:
                    raise KeyboardInterrupt
            except BaseException as err:
                killed = bool(signals.received) or isinstance(err, KeyboardInterrupt)
                _close_children(sweep, "KILLED" if killed else "FAILED")
                finish_run(tracking.uri, parent_id, "KILLED" if killed else "FAILED")
                if killed:
                    raise Interrupted(signals.received[0] if signals.received else signal.SIGINT) from None
                raise
        finish_run(tracking.uri, parent_id, "FINISHED")
        return summary


def _check_schedule(params: Params, spec: Family, metric: str, budget: int) -> None:
    """What the sweep needs from `train`'s schedule and the family, checked before anything runs."""
    tr, tp = params.train, params.tune
    reported = (spec.metric, *spec.curve_keys)
    if metric not in reported:
        raise SweepError(f"tune.metric {metric!r} is not reported by {spec.name} training (expected one of: {', '.join(reported)})")
    if not tr.eval_every_steps:
        raise SweepError("a sweep reports to Tune at the periodic evaluation: set train.eval_every_steps > 0")
    if tp.scheduler == "asha" and tp.grace_period > budget:
        raise SweepError(f"tune.grace_period {tp.grace_period} exceeds the per-trial budget of {budget} steps")
    if tp.scheduler == "pbt":
        try:
            check_space(params.train, spec.name, tp.space.get(spec.name, {}), pbt=True)
        except ValueError as err:
            raise SweepError(str(err)) from None
        if tr.eval_every_steps % tr.checkpoint_every_steps:
            raise SweepError(f"scheduler pbt: train.eval_every_steps ({tr.eval_every_steps}) must be a multiple of "
                             f"train.checkpoint_every_steps ({tr.checkpoint_every_steps}), so that every result PBT "
                             "acts on has a checkpoint to exploit")
        if tp.perturbation_interval % tr.eval_every_steps:
            raise SweepError(f"tune.perturbation_interval ({tp.perturbation_interval}) must be a multiple of "
                             f"train.eval_every_steps ({tr.eval_every_steps})")


def _sweep_key(family: str, tp, job, code: str) -> dict:
    """What makes a sweep the same sweep: its tune settings and space, the trials' data, family and
    params (step budget included), and the code. Its digest names the sweep; a resume checks it."""
    return {"tune": tp.model_dump(exclude={"space", "name"}),
            "space": {k: d.model_dump(exclude_none=True) for k, d in tp.space.get(family, {}).items()},
            "trial": job.identity(), "num_steps": job.family_params.num_steps, "code": code}


def _check_same_sweep(key_file: str, key: dict, name: str) -> None:
    import pyarrow.fs

    from genmodels.train.checkpoint import config_changes

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(key_file if "://" in key_file else Path(key_file).as_uri())
    try:
        with filesystem.open_input_stream(inner) as f:
            saved = json.loads(f.read())
    except FileNotFoundError:
        return  # a driver that died before writing it: nothing to compare
    current = json.loads(json.dumps(key, default=str))
    saved.pop("code", None), current.pop("code", None)  # a fixed bug does not make it another sweep (as for train)
    if saved != current:
        raise SweepError(f"sweep {name!r} was started with other settings (changed: {', '.join(config_changes(saved, current))}); "
                         "resume it with the params it started with, or set tune.name to start another")


def _write(uri: str, text: str) -> None:
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else Path(uri).as_uri())
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as f:
        f.write(text.encode())


def _concurrency(params: Params, requested: int) -> int:
    """Trials that run at once: `requested`, or (0) as many as the cluster's CPUs and GPUs fit. One
    trial that cannot fit at all fails here, in seconds, instead of staying PENDING forever."""
    tr = params.train
    try:
        preflight(num_workers=tr.num_workers, cpus_per_worker=tr.cpus_per_worker, use_gpu=tr.use_gpu)
    except RuntimeError as err:
        raise SweepError(f"one trial cannot be placed: {err}") from None
    have = ray.cluster_resources()
    fits = math.floor(have.get("CPU", 0.0) / (tr.num_workers * tr.cpus_per_worker) + 1e-9)
    if tr.use_gpu:
        fits = min(fits, math.floor(have.get("GPU", 0.0) / tr.num_workers + 1e-9))
    if requested and requested > fits:
        print(f"tune: max_concurrent_trials={requested}, but the cluster fits {fits} trial(s) now: "
              "the others wait for resources (or for the autoscaler)", flush=True)
    return requested or fits


def _domain(dist: Distribution):
    return {"choice": ray_tune.choice, "uniform": lambda v: ray_tune.uniform(*v), "loguniform": lambda v: ray_tune.loguniform(*v),
            "randint": lambda v: ray_tune.randint(*v), "grid": ray_tune.grid_search}[dist.kind](dist.value)


def _tune_config(tp, space: dict[str, Distribution], metric: str, mode: str, budget: int, concurrency: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    if tp.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        # TPE's random start-up phase: a quarter of the trials (Optuna's default of 10 would leave
        # a small sweep all random).
        sampler = optuna.samplers.TPESampler(seed=tp.seed, n_startup_trials=max(2, tp.num_samples // 4))
        search = OptunaSearch(sampler=sampler)
    else:
        # Tune applies max_concurrent_trials to a Searcher only (and warns otherwise): this generator limits itself.
        search = BasicVariantGenerator(random_state=tp.seed, max_concurrent=concurrency)
    if tp.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=budget, grace_period=tp.grace_period, reduction_factor=tp.reduction_factor)
    elif tp.scheduler == "pbt":
        # A choice mutates to a neighbouring value as a list; a range is perturbed by 0.8 / 1.2 and
        # clamped back into the space (PBT does not clamp: beta2 0.999 x 1.2 would leave the schema).
        mutations = {k: (list(d.value) if d.kind == "choice" else _domain(d)) for k, d in space.items()}
        bounds = {k: (d.kind, d.value) for k, d in space.items() if d.kind in ("uniform", "loguniform", "randint")}
        scheduler = BudgetPBT(budget, time_attr="step", perturbation_interval=tp.perturbation_interval, synch=True,
                              hyperparam_mutations=mutations, resample_probability=tp.resample_probability,
                              custom_explore_fn=functools.partial(clamp_to_space, bounds=bounds))
    else:
        scheduler = FIFOScheduler()
    limiter = concurrency if tp.search == "optuna" else None
    return ray_tune.TuneConfig(metric=metric, mode=mode, num_samples=tp.num_samples, max_concurrent_trials=limiter,
                               search_alg=search, scheduler=scheduler, reuse_actors=False)


def clamp_to_space(config: dict, bounds: dict) -> dict:
    """PBT's `custom_explore_fn`: a perturbed value back inside its distribution's range."""
    for key, (kind, (low, high)) in bounds.items():
        if key in config:
            config[key] = min(max(int(round(config[key])), low), high - 1) if kind == "randint" else min(max(config[key], low), high)
    return config


class BudgetPBT(PopulationBasedTraining):
    """Synchronous PBT that leaves a trial's last result (at the step budget) alone: an exploit
    there would only copy another trial's finished model and train nothing."""

    def __init__(self, budget: int, **kwargs):
        super().__init__(**kwargs)
        self.budget = budget

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("step", 0) >= self.budget:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def _parent_params(family: str, tp, space: dict[str, Distribution], metric: str, mode: str, budget: int, concurrency: int) -> dict:
    return {"family": family, "tune": {
        "search": tp.search, "scheduler": tp.scheduler, "num_samples": tp.num_samples, "max_concurrent_trials": concurrency,
        "metric": metric, "mode": mode, "num_steps": budget, "seed": tp.seed,
        **({"grace_period": tp.grace_period, "reduction_factor": tp.reduction_factor} if tp.scheduler == "asha" else {}),
        **({"perturbation_interval": tp.perturbation_interval, "resample_probability": tp.resample_probability}
           if tp.scheduler == "pbt" else {}),
        "space": {key: f"{d.kind}{json.dumps(d.value)}" for key, d in space.items()}}}


def _stop_tune(signals_received: int) -> None:
    """The first Ctrl-C / SIGTERM asks a running `Tuner.fit()` to stop gracefully through SIGUSR1,
    its own stop signal (trials stopped, state saved); a second one, or one before Tune has
    installed that handler (SIGUSR1 would kill the process), stops at once."""
    if signals_received == 1 and callable(signal.getsignal(signal.SIGUSR1)):
        signal.raise_signal(signal.SIGUSR1)
    else:
        raise KeyboardInterrupt


class _tune_sigint_off:
    """Tune's SIGINT handler would swallow Ctrl-C unseen; with it off, ours (`_DriverSignals`)
    records the signal and raises SIGUSR1, Tune's other graceful-stop signal."""

    def __enter__(self):
        self._previous = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        self._usr1 = signal.getsignal(signal.SIGUSR1)
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

    def __exit__(self, *exc):
        if self._previous is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._previous
        signal.signal(signal.SIGUSR1, self._usr1)  # Tune leaves its handler installed: a later sweep's early Ctrl-C would go to it


class ChildRuns(Callback):
    """On the driver: ends each trial's MLflow child run, which a trial stopped by the scheduler
    cannot do itself (it never returns from `fit()`): FINISHED (tagged `tune.stopped_early` when
    it stopped before the budget) or FAILED with the error. The driver ends the rest as KILLED
    when the sweep is stopped (`_close_children`)."""

    def __init__(self, sweep: Sweep, budget: int):
        self.sweep, self.budget = sweep, budget

    def _finish(self, trial, status: str, tags: dict[str, str]) -> None:
        from genmodels.tracking import RunLogger, find_run, finish_run

        try:
            run_id = find_run(self.sweep.tracking_uri, self.sweep.experiment, self.sweep.child_key(trial.trial_id))
            if run_id is None:  # never started
                return
            RunLogger(self.sweep.tracking_uri, run_id).set_tags({"tune.status": status, **tags})
            finish_run(self.sweep.tracking_uri, run_id, status)
        except Exception as err:  # noqa: BLE001 - the tracking store must not stop the sweep; the driver closes leftovers
            warnings.warn(f"tune: could not end the MLflow run of trial {trial.trial_id}: {err}", stacklevel=1)

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = int((trial.last_result or {}).get("step", 0))
        self._finish(trial, "FINISHED", {"tune.stopped_early": str(step < self.budget).lower(), "tune.last_step": str(step)})

    def on_trial_error(self, iteration, trials, trial, **info):
        error = Path(trial.error_file) if trial.error_file else None
        text = error.read_text(errors="replace") if error and error.is_file() else "see the trial's error file"
        self._finish(trial, "FAILED", {"tune.error": text[-1000:]})  # a traceback ends with the message



class TrialEvents(Callback):
    """On the driver: one line per trial event (started, finished, stopped early, failed), in place
    of Tune's status tables (shown with --verbose)."""

    def __init__(self, sweep: Sweep, budget: int, num_trials: int):
        self.sweep, self.budget, self.num_trials = sweep, budget, num_trials

    def _say(self, trial, text: str) -> None:
        print(f"tune {self.sweep.job.family}: trial {trial.trial_id} {text}", flush=True)

    def _ended(self, trials, trial) -> str:
        ended = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {trial.trial_id}
        return f"({len(ended)} of {self.num_trials} trials ended)"

    def on_trial_start(self, iteration, trials, trial, **info):
        values = ", ".join(f"{k.split('.')[-1]} {_shown(trial.config.get(k))}" for k in self.sweep.keys)
        self._say(trial, f"started: {values}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        step, value = int(result.get("step", 0)), result.get(self.sweep.metric)
        how = "finished" if step >= self.budget else "stopped early"
        metric = f": {self.sweep.metric} {_shown(value)}" if value is not None else ""
        self._say(trial, f"{how} at step {step}{metric} {self._ended(trials, trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(trial, f"failed {self._ended(trials, trial)}; its error: {trial.error_file or '?'}")


def _shown(value) -> str:
    return number(value) if isinstance(value, float) else str(value)


def _close_children(sweep: Sweep, status: str) -> None:
    """End the child runs a stopped sweep leaves RUNNING (Tune's clean-up does not report the
    trials it stops as complete)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.experiment)
    running = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}' "
                                 "and attributes.status = 'RUNNING'")
    for run in running:
        client.set_tag(run.info.run_id, "tune.status", status)
        client.set_terminated(run.info.run_id, status=status)


@dataclass(frozen=True)
class _Row:
    trial_id: str
    status: str
    config: dict
    last_step: int
    last: float
    best: float
    history: list[tuple[int, float]]


def _finish(spec: Family, sweep: Sweep, results, out_dir: Path, budget: int) -> dict:
    """Best config file, and on the parent run: best params and metric, trials.csv, the plot."""
    from genmodels.tune.outputs import log_sweep, write_best

    rows = []
    for result in results:
        frame = result.metrics_dataframe
        history = [] if frame is None or sweep.metric not in frame else [
            (int(s), float(v)) for s, v in zip(frame["step"], frame[sweep.metric]) if not math.isnan(v)]
        metrics = result.metrics or {}
        values = [v for _, v in history]
        pick = min if sweep.mode == "min" else max
        rows.append(_Row(trial_id=metrics.get("trial_id", result.path.rsplit("/", 1)[-1]),
                         status="ERROR" if result.error else ("STOPPED" if int(metrics.get("step", 0)) < budget else "DONE"),
                         config={k: result.config.get(k) for k in sweep.keys}, last_step=int(metrics.get("step", 0)),
                         last=float(metrics.get(sweep.metric, math.nan)), best=pick(values) if values else math.nan, history=history))
    scored = [r for r in rows if not math.isnan(r.last)]
    if not scored:
        errors = [str(r.error) for r in results if r.error]
        raise SweepError(f"no trial of sweep {sweep.name!r} reported {sweep.metric}"
                         + (f"; first error: {errors[0][:2000]}" if errors else ""))
    best = (min if sweep.mode == "min" else max)(scored, key=lambda r: r.last)
    best_file = write_best(out_dir / f"{spec.name}_best.yaml", spec.name, sweep, best)
    log_sweep(sweep, rows, best, best_file)
    command = f"genmodels train {spec.name} --overlay {best_file}"
    print(f"tune {spec.name}: best trial {best.trial_id}: {sweep.metric} {best.last:.4g} at step {best.last_step}; "
          f"{best.config}\n  -> {best_file}\n  train with it: {command}", flush=True)
    return {"sweep": sweep.name, "parent_run_id": sweep.parent_run_id, "best_trial": best.trial_id, "best_config": best.config,
            "metric": sweep.metric, "best_metric": best.last, "num_trials": len(rows),
            "stopped_early": sum(r.status == "STOPPED" for r in rows), "errors": sum(r.status == "ERROR" for r in rows),
            "best_file": str(best_file), "command": command}
