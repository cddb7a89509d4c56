"""The VAE family: conv/seed presets, negative ELBO (recon + beta * KL) in nats per image,
periodic val ELBO, offline ELBO/IWAE and reconstruction metrics."""

from __future__ import annotations

import copy
import itertools

import torch
import torch.distributed as dist

from genmodels.config import TrainParams, VAEParams
from genmodels.data.loader import read_images
from genmodels.data.transforms import to_float
from genmodels.families.base import NUM_GRID_SAMPLES, Family
from genmodels.losses import negative_elbo, reconstruction_nll
from genmodels.train.ddp import Precision, grad_norm, unwrap, wrap
from genmodels.train.ema import STANDING_STATS_NUM_BATCHES, ema_decay, ema_update, standing_batchnorm_stats

NUM_RECON_IMAGES = 32
ELBO_CHUNK_SIZE = 250


class VAETask:
    def __init__(self, params: TrainParams, *, image_size: int, channels: int, device: torch.device, world_size: int,
                 precision: Precision):
        v = params.vae
        self.params, self.device, self.precision = params, device, precision
        model = VAE.build_generator(v, image_size=image_size, channels=channels)
        self.ema = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.model = wrap(model, params, device, world_size)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=v.lr)
        self.scaler = precision.scaler()
        self.z_fixed = torch.randn(NUM_GRID_SAMPLES, v.latent_dim, generator=torch.Generator().manual_seed(params.seed)).to(device)
        self.recon_batch: torch.Tensor | None = None  # fixed val images for the reconstruction grid (None: no val data)
        self.standing_images: torch.Tensor | None = None  # fixed train images (uint8, CPU) for the EMA's statistics

    def state(self) -> dict[str, object]:
        return {"vae": unwrap(self.model), "ema": self.ema, "opt": self.opt, "scaler": self.scaler}

    def train_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        v = self.params.vae
        with self.precision.autocast():
            decoded, kl = self.model(images)  # the KL in fp32 (`VAE.kl`)
        # The likelihood in fp32: sums over pixels lose precision in half types.
        log_sigma = unwrap(self.model).log_sigma
        recon = reconstruction_nll(decoded.float(), images, v.likelihood, log_sigma)
        loss = negative_elbo(recon, kl, v.beta).mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        norm = grad_norm(self.model.parameters())
        self.scaler.step(self.opt)
        self.scaler.update()
        ema_update(self.ema, self.model, ema_decay(v.ema_decay, step))
        return {"loss": loss.detach(), "recon_nll": recon.detach().mean(), "kl": kl.detach().mean(),
                "elbo": -(recon.detach() + kl.detach()).mean(), "grad_norm": norm}

    def refresh_ema(self) -> None:
        """Standing statistics over posterior draws z ~ q(z | x) of a fixed set of training images
        (`standing_images`): the inputs the decoder meets in the ELBO, the family's metric, and in
        reconstructions. Prior draws instead gave better-looking samples but a val ELBO 4.7 nats
        worse on mnist5k (bench/RESULTS.md). Without attached images (unit tests): prior draws."""
        ema, images, batch = self.ema, self.standing_images, self.params.batch_size_per_worker
        batches = itertools.cycle(images.split(batch) if images is not None else [None])

        def forward(generator: torch.Generator) -> None:
            x = next(batches)
            if x is None:
                z = ema.from_noise(torch.randn(batch, self.params.vae.latent_dim, generator=generator, device=self.device))
            else:
                mu, logvar = ema.encode(to_float(x.to(self.device)))
                z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, device=self.device)
            ema.decode(z)

        standing_batchnorm_stats(ema, forward, seed=self.params.seed)

    @torch.no_grad()
    def sample_grid_images(self) -> dict[str, torch.Tensor]:
        model = self.ema  # with ema_decay 0 the EMA is a copy of the latest weights
        grids = {"samples": model.generate(self.z_fixed)}
        if self.recon_batch is not None:
            grids["reconstructions"] = torch.cat([self.recon_batch, model.reconstruct(self.recon_batch)])
        return grids


class VAEPeriodicEval:
    """Val ELBO in nats per image. The val set is cut into fixed chunks dealt round-robin to the
    ranks, each chunk with its own seeded noise, and the float64 sums are all-reduced: the number
    does not depend on the world size. Bernoulli decoders are scored on binarised images, the
    evaluate stage's rule."""

    def __init__(self, job, task: VAETask, *, rank: int, world_size: int):
        from genmodels.metrics.likelihood import binarize

        self.task, self.rank, self.world_size, self.seed = task, rank, world_size, job.params.seed
        images = read_images(job.shards, "val")
        if job.params.vae.likelihood == "bernoulli":
            images = binarize(images, torch.Generator().manual_seed(self.seed))
        self.chunks = list(enumerate(images.split(ELBO_CHUNK_SIZE)))[rank::world_size]
        self.num_val = len(images)

    @torch.no_grad()
    def local_sum(self) -> torch.Tensor:
        """This rank's sum of per-image ELBOs, float64."""
        from genmodels.metrics.likelihood import elbo_per_image

        device = self.task.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for index, chunk in self.chunks:
            generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + index)
            total += elbo_per_image(self.task.ema, chunk.to(device), generator).double().sum()
        return total

    def __call__(self, step: int) -> dict[str, float]:
        if self.num_val == 0:
            return {}  # no val split (prepare.val_fraction: 0): nothing to score
        total = self.local_sum()
        if self.world_size > 1:
            dist.all_reduce(total)
        return {"eval/elbo": float(total) / self.num_val, "eval/num_val": float(self.num_val)}


class VAEFamily(Family):
    name = "vae"
    metric, mode = "eval/elbo", "max"
    curve_keys = ("train/loss", "train/elbo", "train/kl", "train/recon_nll")
    exported = {"vae": "ema"}
    generator_key = "vae"
    gate_metric, gate_mode = "elbo", "max"

    def generator_spec(self, params: VAEParams, *, image_size: int, channels: int) -> dict:
        return {"builder": "vae", "kwargs": {"preset": params.preset, "image_size": image_size, "channels": channels,
                                            "latent_dim": params.latent_dim, "width": params.width,
                                            "likelihood": params.likelihood, "decoder_norm": params.decoder_norm,
                                            "prior": params.prior}}

    def build_task(self, train, *, image_size, channels, device, world_size, precision) -> VAETask:
        return VAETask(train, image_size=image_size, channels=channels, device=device, world_size=world_size, precision=precision)

    def attach_data(self, job, task: VAETask, *, rank: int) -> None:
        images = read_images(job.shards, "train", limit=job.params.batch_size_per_worker * STANDING_STATS_NUM_BATCHES)
        task.standing_images = images.add(1).mul(127.5).round().to(torch.uint8)  # exact: they were 8-bit
        if rank == 0:
            images = read_images(job.shards, "val", limit=NUM_RECON_IMAGES)
            task.recon_batch = images.to(task.device) if len(images) else None

    def periodic_eval(self, job, task, *, rank, world_size) -> VAEPeriodicEval:
        return VAEPeriodicEval(job, task, rank=rank, world_size=world_size)

    def offline_metrics(self, model, manifest, params, image_metrics) -> dict:
        """Sample metrics of reconstructions (`recon_*`), val ELBO and IWAE; nothing without val data."""
        val_images = read_images(manifest, "val")
        if len(val_images) == 0:
            return {"num_val": 0}
        with torch.no_grad():
            recon = torch.cat([model.reconstruct(chunk) for chunk in val_images.split(500)])
        return {**image_metrics(recon, "recon_"), **likelihoods(model, val_images, params)}


def likelihoods(model, images: torch.Tensor, params) -> dict[str, float]:
    """Val ELBO and IWAE in nats per image. Bernoulli decoders are scored on stochastically
    binarised images (pixel = 1 with probability of its grey level, fixed seed), the standard
    rule that makes the Bernoulli likelihood a proper density; Gaussian decoders on the images."""
    from genmodels.metrics.likelihood import binarize, elbo_per_image, iwae_bound

    generator = torch.Generator().manual_seed(params.seed)
    if model.likelihood == "bernoulli":
        images = binarize(images, generator)
    elbo, iwae = [], []
    with torch.no_grad():
        for chunk in images.split(100):
            elbo.append(elbo_per_image(model, chunk, generator))
            iwae.append(iwae_bound(model, chunk, num_samples=params.iwae_num_samples, generator=generator))
    return {"elbo": float(torch.cat(elbo).mean()), "iwae": float(torch.cat(iwae).mean()),
            "iwae_num_samples": params.iwae_num_samples, "num_val": len(images)}


VAE = VAEFamily()
