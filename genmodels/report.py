"""`genmodels report`: one self-contained HTML page to look at, per trained family: its samples
beside real images, the loss curves and the periodic FID / ELBO curve, the evaluation table with
its protocol signature, and the data lineage. Pictures are PNGs (matplotlib for the curves)
embedded as data URIs: the page opens anywhere, offline, and is logged to MLflow as one file.

    from genmodels.report import write_report
    write_report(params, "report.html")           # the families that exist under models/
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import subprocess
from pathlib import Path

from genmodels.config import Params
from genmodels.families import FAMILIES, get_family
from genmodels.files import read_json, write_text
from genmodels.progress import number

NUM_IMAGES = 64


def write_report(params: Params, out: str | Path = "report.html", *, project_dir: str | Path = ".", models_dir: str | Path = "models",
                 shards: str | Path = "data/shards", metrics_dir: str | Path = "metrics") -> list[str]:
    """Write the page (atomically); returns the families it covers."""
    from genmodels.tracking import impatient_requests

    project = Path(project_dir)
    families = [f for f in FAMILIES if (Path(models_dir) / f / "config.json").is_file()]
    if not families:
        raise FileNotFoundError(f"no trained model under {models_dir}/ (models/<family>/config.json): "
                                "run `make run` or `dvc repro train@gan` first")
    with impatient_requests():
        sections = [_family_section(params, family, Path(models_dir), Path(shards), Path(metrics_dir)) for family in families]
    page = _PAGE.format(title=html.escape(f"genmodels report: {', '.join(families)}"),
                        when=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        project=html.escape(str(project.resolve())), commit=html.escape(_git_commit(project)),
                        nav=" · ".join(f'<a href="#{f}">{f}</a>' for f in families), sections="\n".join(sections))
    write_text(Path(out), page)
    return families


def _family_section(params: Params, family: str, models_dir: Path, shards: Path, metrics_dir: Path) -> str:
    from genmodels.data.loader import read_split
    from genmodels.data.shards import load_manifest, manifest_sha256
    from genmodels.data.transforms import image_grid
    from genmodels.families import load_exported
    from genmodels.stages.evaluate import generate

    spec = get_family(family)
    exported = load_exported(models_dir / family)
    samples = generate(spec, exported.model, NUM_IMAGES, spec.latent_dim(exported.params), params.evaluate.seed)
    manifest = load_manifest(shards)
    split = "val" if manifest.split("val").num_samples else "train"
    real = next(read_split(manifest, split, limit=NUM_IMAGES, batch_size=NUM_IMAGES))[0]
    mlflow = read_json(models_dir / family / "mlflow.json") or {}
    record = read_json(metrics_dir / f"eval_{family}.json")
    train = read_json(metrics_dir / f"train_{family}.json") or {}
    curves = _curves(metrics_dir / f"train_{family}_curve.csv", f"{family}: training losses")
    periodic = _periodic(spec, mlflow)
    config = exported.config
    lineage = {
        "data": f"{manifest.source}, {manifest.image_size}x{manifest.image_size}x{manifest.channels}, manifest sha256 "
                f"{manifest_sha256(manifest)}",
        "trained": f"{train.get('step', '?')} steps in {train.get('wall_s', '?')} s on {train.get('world_size', '?')} "
                   f"worker(s); run {config.get('run_name')}",
        "data of the training run": config.get("data", {}).get("manifest_sha256", "?"),
        "git commit of the training run": _run_tag(mlflow, "git.commit"),
        "weights sha256": config.get("weights_sha256", "?"),
        "MLflow run": f"{mlflow.get('run_id', '?')} in {mlflow.get('tracking_uri', '?')}",
    }
    parts = [f'<section id="{family}"><h2>{html.escape(family)}</h2>',
             '<div class="row">',
             _figure(_png_of_array(image_grid(samples)), f"{NUM_IMAGES} samples (evaluate.seed {params.evaluate.seed})", "grid"),
             _figure(_png_of_array(image_grid(real)), f"{NUM_IMAGES} real images ({split} split)", "grid"),
             "</div>", '<div class="row">']
    if curves:
        parts.append(_figure(curves, "training losses (metrics/train_%s_curve.csv)" % family, "plot"))
    if periodic:
        parts.append(_figure(periodic, f"periodic {spec.metric} during training", "plot"))
    parts.append("</div>")
    parts.append(_eval_tables(family, record, config))
    parts.append("<h3>Lineage</h3>" + _table(lineage.items()))
    parts.append("</section>")
    return "\n".join(parts)


def _eval_tables(family: str, record: dict | None, config: dict) -> str:
    from genmodels.metrics.protocol import signature_sha256

    if record is None:
        return f"<p>Not evaluated yet: <code>dvc repro evaluate@{family}</code>.</p>"
    stale = "" if record.get("weights_sha256") == config.get("weights_sha256") else \
        "<p class=warn>These numbers were measured on other weights than the ones above.</p>"
    numbers = [(k, number(v)) for k, v in sorted(record.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    signature = record.get("signature", {})
    return (f'<div class="row"><div><h3>Evaluation (metrics/eval_{family}.json)</h3>{stale}' + _table(numbers)
            + f"</div><div><h3>Protocol signature {signature_sha256(signature)[:12]}</h3>"
            + _table((k, json.dumps(v)) for k, v in sorted(signature.items())) + "</div></div>")


def _curves(path: Path, title: str) -> bytes | None:
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.read_text().splitlines()))
    keys = [k for k in (rows[0] if rows else {}) if k != "step"]
    if not keys:
        return None
    figure, axes = _figure_axes(len(keys))
    for ax, key in zip(axes, keys):
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        ax.plot([s for s, _ in points], [v for _, v in points], lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    figure.suptitle(title, fontsize=10)
    return _png_of_figure(figure)


def _periodic(spec, mlflow: dict) -> bytes | None:
    """The family's periodic metric from the training run's history (MLflow)."""
    if not _reachable(mlflow):
        return None
    try:
        from genmodels.tracking import metric_history

        rows = metric_history(mlflow["tracking_uri"], mlflow["run_id"], [spec.metric])
    except Exception:  # noqa: BLE001 - the page shows what it can reach; the store may be down
        return None
    if not rows:
        return None
    figure, (ax,) = _figure_axes(1)
    ax.plot([r["step"] for r in rows], [r[spec.metric] for r in rows], marker="o", lw=1.2, ms=3)
    ax.set_title(f"{spec.metric} ({'lower' if spec.mode == 'min' else 'higher'} is better)", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    return _png_of_figure(figure)


def _figure_axes(count: int):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(3.2 * count, 2.8), layout="constrained")
    return figure, list(figure.subplots(1, count, squeeze=False)[0])


def _png_of_figure(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _png_of_array(array) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _figure(png: bytes, caption: str, kind: str) -> str:
    data = base64.b64encode(png).decode()
    return (f'<figure><img class="{kind}" alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _reachable(mlflow: dict) -> bool:
    from genmodels.tracking import store_exists

    return bool(mlflow.get("run_id")) and store_exists(mlflow.get("tracking_uri", ""))


def _run_tag(mlflow: dict, key: str) -> str:
    if not _reachable(mlflow):
        return "?"
    try:
        from mlflow import MlflowClient

        return MlflowClient(mlflow["tracking_uri"]).get_run(mlflow["run_id"]).data.tags.get(key, "?")
    except Exception:  # noqa: BLE001 - see _periodic
        return "?"


def _git_commit(project: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=project, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "not a git repository"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }}
.row {{ display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }}
figure {{ margin: 0; }} figcaption {{ font-size: 12px; color: #555; }}
img.grid {{ width: 320px; image-rendering: pixelated; border: 1px solid #ddd; }}
img.plot {{ max-width: 100%; }}
table {{ border-collapse: collapse; margin: 4px 0 12px; font-size: 13px; }}
th, td {{ border: 1px solid #ddd; padding: 2px 8px; text-align: left; }} th {{ background: #f6f6f6; font-weight: 600; }}
.warn {{ color: #a40; }} section {{ border-top: 2px solid #eee; margin-top: 20px; }}
</style></head><body>
<h1>{title}</h1>
<p>Written {when} from {project} (git {commit}). Families: {nav}.</p>
{sections}
</body></html>
"""
