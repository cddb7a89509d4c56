"""What a finished sweep leaves: the best config as a params overlay, and on the MLflow parent run
the best values and metric, `trials.csv` and `metric_vs_step.png`."""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from pathlib import Path

import yaml

from genmodels.config import set_dotted
from genmodels.files import write_text


def overlay(values: dict) -> dict:
    """{"train.gan.lr_g": 1e-4} -> {"train": {"gan": {"lr_g": 1e-4}}}: a params file fragment."""
    nested: dict = {}
    for key, value in values.items():
        set_dotted(nested, key, value)
    return nested


def write_best(path: Path, family: str, sweep, best) -> Path:
    header = (f"# Best trial of sweep {sweep.name} ({best.trial_id}): {sweep.metric} {best.last:.6g} ({sweep.mode}) "
              f"at step {best.last_step}.\n# Train with it:  genmodels train {family} --overlay {path}\n")
    write_text(path, header + yaml.safe_dump(overlay(best.config), sort_keys=True))
    return path


def trials_csv(rows, keys: tuple[str, ...], metric: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial_id", "status", "last_step", f"last {metric}", f"best {metric}", *keys])
    for row in rows:
        writer.writerow([row.trial_id, row.status, row.last_step, row.last, row.best, *[row.config.get(k) for k in keys]])
    return buffer.getvalue()


def plot(rows, metric: str, best_id: str, path: Path) -> None:
    """Every trial's metric against the training step; the best trial drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for row in rows:
        if not row.history:
            continue
        steps, values = zip(*row.history)
        best = row.trial_id == best_id
        ax.plot(steps, values, marker="o", markersize=3, linewidth=2.5 if best else 1.0, alpha=1.0 if best else 0.7,
                label=f"{row.trial_id}{' (best)' if best else ''}{' stopped' if row.status == 'STOPPED' else ''}")
    values = [v for row in rows for _, v in row.history]
    if values and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")  # a diverged trial's FID would flatten every other curve
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_sweep(sweep, rows, best, best_file: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    params = [Param(f"best.{key}", str(value)) for key, value in best.config.items()]
    existing = client.get_run(sweep.parent_run_id).data.params
    params = [p for p in params if existing.get(p.key) in (None, p.value)]  # a resumed sweep that found another best keeps the first in params; tags say the last
    tags = [RunTag("tune.best_trial", best.trial_id), RunTag("tune.best_config", json.dumps(best.config, sort_keys=True))]
    metrics = [Metric(f"best/{sweep.metric}", best.last, int(time.time() * 1000), best.last_step)]
    client.log_batch(sweep.parent_run_id, metrics=metrics, params=params, tags=tags)
    with tempfile.TemporaryDirectory(prefix="genmodels-sweep-") as tmp:
        (Path(tmp) / "trials.csv").write_text(trials_csv(rows, sweep.keys, sweep.metric))
        plot(rows, sweep.metric, best.trial_id, Path(tmp) / "metric_vs_step.png")
        for name in ("trials.csv", "metric_vs_step.png"):
            client.log_artifact(sweep.parent_run_id, str(Path(tmp) / name))
    client.log_artifact(sweep.parent_run_id, str(best_file))
