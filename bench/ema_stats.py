"""BatchNorm statistics of the EMA model, side by side on the same trained weights: the live
model's running statistics (what the code did before issue 8) vs. standing statistics recomputed
for the EMA weights (what it does now; for the VAE over posterior draws of training images, and
over prior draws for comparison).

    python bench/ema_stats.py ray_results/gan-<hash>/step_00002000 ray_results/vae-<hash>/step_00000800

Scored with the evaluate stage's protocol (params.yaml's `evaluate` section, models/featurizer,
data/shards): FID of 5,000 samples for both families, val ELBO/IWAE for the VAE.
"""

import argparse
import copy
from pathlib import Path

import torch

from genmodels.config import load_params, parse_params
from genmodels.data.loader import read_images
from genmodels.data.shards import load_manifest
from genmodels.families import get_family
from genmodels.families.vae import likelihoods
from genmodels.metrics.features import load_extractor
from genmodels.metrics.protocol import image_metrics, reference_stats
from genmodels.stages.evaluate import generate
from genmodels.train.ddp import Precision
from genmodels.train.loop import TrainJob


def variants(checkpoint: Path, manifest) -> tuple:
    bundle = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    identity = bundle["config"]
    family = get_family(identity["family"])
    train = parse_params({"train": {**identity["train"], family.name: identity[family.name]}}).train
    task = family.build_task(train, image_size=manifest.image_size, channels=manifest.channels, device=torch.device("cpu"),
                             world_size=1, precision=Precision())
    job = TrainJob(family=family.name, params=train, shards=manifest.location, manifest_sha256="-", image_size=manifest.image_size,
                   channels=manifest.channels, tracking_uri="-", run_id="-")
    family.attach_data(job, task, rank=0)
    live_source = {"gan": "generator", "vae": "vae"}[family.name]  # the live model behind the EMA
    live = copy.deepcopy(task.ema)
    buffers = {k: v for k, v in bundle["objects"][live_source].items() if "running_" in k or "num_batches" in k}
    live.load_state_dict({**bundle["objects"]["ema"], **buffers})
    out = {"live model's statistics (before)": live}
    task.ema.load_state_dict(bundle["objects"]["ema"])
    if family.name == "vae":
        images, task.standing_images = task.standing_images, None
        task.refresh_ema()
        out["standing, prior draws"] = copy.deepcopy(task.ema)
        task.standing_images = images
    task.refresh_ema()
    out["standing statistics (after)"] = task.ema
    return family, family.params(train), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ep = load_params(args.params).evaluate
    manifest = load_manifest("data/shards")
    extractor = load_extractor(ep.extractor, featurizer_dir="models/featurizer")
    reference = reference_stats(extractor, manifest, ep)
    val = read_images(manifest, "val")
    for checkpoint in args.checkpoints:
        family, params, models = variants(checkpoint, manifest)
        print(f"\n{family.name} ({checkpoint.name})\n| EMA BatchNorm statistics | FID | bootstrap std | val ELBO | val IWAE |\n|---|---:|---:|---:|---:|")
        for name, model in models.items():
            metrics = image_metrics(extractor, generate(family, model.eval(), ep.num_samples, params.latent_dim, ep.seed),
                                    reference, ep)
            bounds = likelihoods(model, val, ep) if family.name == "vae" else {"elbo": float("nan"), "iwae": float("nan")}
            print(f"| {name} | {metrics['fid']:.2f} | {metrics['fid_bootstrap_std']:.2f} | {bounds['elbo']:.2f} | {bounds['iwae']:.2f} |")


if __name__ == "__main__":
    main()
