"""FID of the EMA generator with the live generator's BatchNorm statistics (what the code did
before issue 8) vs. standing statistics recomputed for the EMA weights (what it does now), on the
same trained weights, side by side.

    python bench/ema_stats.py ray_results/gan-<hash>/step_00002000   # a GAN run's final checkpoint

Scored with the evaluate stage's protocol (params.yaml's `evaluate` section, the featurizer in
models/featurizer, the shards in data/shards).
"""

import argparse
import copy
from pathlib import Path

import torch

from genmodels.config import load_params
from genmodels.data.shards import load_manifest
from genmodels.families import get_family
from genmodels.metrics.features import load_extractor
from genmodels.metrics.protocol import image_metrics, reference_stats
from genmodels.stages.evaluate import generate
from genmodels.train.ema import standing_batchnorm_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    bundle = torch.load(args.checkpoint / "state.pt", map_location="cpu", weights_only=True)
    family, manifest = get_family("gan"), load_manifest("data/shards")
    gan_params = params.train.gan.model_validate(bundle["config"]["gan"] | {"num_steps": params.train.gan.num_steps})
    ema = family.build_generator(gan_params, image_size=manifest.image_size, channels=manifest.channels)
    ema.load_state_dict(bundle["objects"]["ema"])
    live = copy.deepcopy(ema)
    live_buffers = {k: v for k, v in bundle["objects"]["generator"].items() if "running_" in k or "num_batches" in k}
    live.load_state_dict({**ema.state_dict(), **live_buffers})  # EMA weights + rank 0's live BatchNorm statistics
    standing = copy.deepcopy(ema)
    standing_batchnorm_stats(standing, standing, latent_dim=gan_params.latent_dim, seed=params.train.seed)
    ep = params.evaluate
    extractor = load_extractor(ep.extractor, featurizer_dir="models/featurizer")
    reference = reference_stats(extractor, manifest, ep)
    rows = {}
    for name, model in (("live G statistics (before)", live.eval()), ("standing statistics (after)", standing.eval())):
        samples = generate(family, model, ep.num_samples, gan_params.latent_dim, ep.seed)
        rows[name] = image_metrics(extractor, samples, reference, ep)
    print(f"| EMA generator BatchNorm statistics | FID | bootstrap std | precision | recall |\n|---|---:|---:|---:|---:|")
    for name, m in rows.items():
        print(f"| {name} | {m['fid']:.2f} | {m['fid_bootstrap_std']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} |")
    before, after = (m["fid"] for m in rows.values())
    print(f"FID ratio after / before: {after / before:.3f}")


if __name__ == "__main__":
    main()
