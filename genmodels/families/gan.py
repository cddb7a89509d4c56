"""The GAN family: DCGAN/seed presets, BCE/hinge/WGAN-GP, EMA generator, periodic FID.

Training step under DDP: G and D are wrapped separately (`train.ddp.wrap`).
- D step: fakes are drawn under no_grad (G's reducer is not involved) and D sees ONE forward of
  cat(real, fake[, interpolates]): two D forwards in one step would make DDP broadcast BatchNorm
  buffers in between and mark parameters ready twice. The WGAN-GP penalty is taken on the
  interpolates' slice of that same forward (create_graph).
- G step: the fake batch goes through the unwrapped D and back-propagates into G's parameters
  only (`backward(inputs=...)`): D's reducer never sees a half-finished iteration, and D's
  gradients are not all-reduced for nothing. It too feeds D cat(real, fake): with BatchNorm in
  D, a fake-only batch is normalised by other statistics than the mixed batch D was trained on,
  and G would chase a different function (seen: loss_g collapsing to ~0.2 while D scored the
  same fakes 0.015).
- D and G each have their own GradScaler: with d_steps_per_g_step > 1 a shared one would be
  unscaled twice between two updates.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from genmodels.augment import diff_augment
from genmodels.config import GANParams, TrainParams
from genmodels.families.base import NUM_GRID_SAMPLES, Family
from genmodels.losses import d_loss, g_loss, gradient_penalty, interpolate
from genmodels.models import build_gan
from genmodels.train.ddp import Precision, grad_norm, unwrap, wrap
from genmodels.train.ema import ema_decay, ema_update, standing_batchnorm_stats

EVAL_BATCH_SIZE = 500


class GANTask:
    def __init__(self, params: TrainParams, *, image_size: int, channels: int, device: torch.device, world_size: int,
                 precision: Precision):
        g = params.gan
        self.params, self.device, self.precision = params, device, precision
        self.loss = "wgan" if g.loss == "wgan-gp" else g.loss
        generator, discriminator = GANFamily.build_models(g, image_size=image_size, channels=channels)
        self.ema = copy.deepcopy(generator).to(device).eval().requires_grad_(False)
        self.G = wrap(generator, params, device, world_size)
        self.D = wrap(discriminator, params, device, world_size)
        betas = (g.beta1, g.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=g.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=g.lr_d, betas=betas)
        self.scaler_g, self.scaler_d = precision.scaler(), precision.scaler()
        self.z_fixed = torch.randn(NUM_GRID_SAMPLES, g.latent_dim, generator=torch.Generator().manual_seed(params.seed)).to(device)

    def state(self) -> dict[str, object]:
        return {"generator": unwrap(self.G), "discriminator": unwrap(self.D), "ema": self.ema,
                "opt_g": self.opt_g, "opt_d": self.opt_d, "scaler_g": self.scaler_g, "scaler_d": self.scaler_d}

    def _noise(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, self.params.gan.latent_dim, device=self.device)

    def train_step(self, real: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        g, batch = self.params.gan, real.shape[0]
        for _ in range(g.d_steps_per_g_step):
            with self.precision.autocast():
                with torch.no_grad():
                    fake = self.G(self._noise(batch))
                parts = [real, fake]
                if g.loss == "wgan-gp":
                    parts.append(interpolate(real, fake))
                logits = self.D(diff_augment(torch.cat(parts), g.augment)).float()
                real_logits, fake_logits = logits[:batch], logits[batch : 2 * batch]
                loss_d = d_loss(self.loss, real_logits, fake_logits)
                if g.loss == "wgan-gp":
                    scale = self.scaler_d.get_scale() if self.scaler_d.is_enabled() else 1.0
                    loss_d = loss_d + g.gp_weight * gradient_penalty(logits[2 * batch :], parts[2], scale)
            norm_d = _optimise(loss_d, self.opt_d, self.scaler_d, self.D.parameters())

        with self.precision.autocast():
            both = diff_augment(torch.cat([real, self.G(self._noise(batch))]), g.augment)
            fake_logits_g = unwrap(self.D)(both)[batch:].float()
            loss_g = g_loss(self.loss, fake_logits_g)
        norm_g = _optimise(loss_g, self.opt_g, self.scaler_g, self.G.parameters(), inputs=list(self.G.parameters()))
        ema_update(self.ema, self.G, ema_decay(g.ema_decay, step))

        score = torch.sigmoid if self.loss == "bce" else (lambda t: t)  # D(x) as a probability for BCE
        return {
            "loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_real": score(real_logits.detach()).mean(), "d_fake": score(fake_logits.detach()).mean(),
            "grad_norm_d": norm_d, "grad_norm_g": norm_g,
        }

    def refresh_ema(self) -> None:
        """Standing statistics over noise batches of the training batch size: the inputs the
        generator meets when sampling."""
        shape = (self.params.batch_size_per_worker, self.params.gan.latent_dim)
        standing_batchnorm_stats(self.ema, lambda g: self.ema(torch.randn(shape, generator=g, device=self.device)),
                                 seed=self.params.seed)

    @torch.no_grad()
    def sample_grid_images(self) -> dict[str, torch.Tensor]:
        return {"samples": self.ema(self.z_fixed)}


def _optimise(loss, optimizer, scaler, parameters, inputs=None) -> torch.Tensor:
    """zero_grad, (scaled) backward, unscale, gradient norm, step, update: one scaler per optimizer."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward(inputs=inputs)
    scaler.unscale_(optimizer)
    norm = grad_norm(parameters)
    scaler.step(optimizer)
    scaler.update()
    return norm


class GANPeriodicEval:
    """FID in the domain featurizer's space: each rank generates its share of
    `train.eval_num_samples` with the EMA generator; feature sums are all-reduced."""

    def __init__(self, job, task: GANTask, *, rank: int, world_size: int):
        from genmodels.metrics.features import domain_extractor
        from genmodels.metrics.fid import FeatureStats

        params = job.params
        self.task, self.rank, self.seed, self.latent_dim = task, rank, params.seed, params.gan.latent_dim
        self.extractor = domain_extractor(job.featurizer, device=task.device)
        self.reference = FeatureStats.from_bytes(job.eval_reference)
        self.num_local = params.eval_num_samples // world_size + (rank < params.eval_num_samples % world_size)

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        from genmodels.metrics.fid import FeatureStats, fid_from_stats

        device = self.task.device
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self.rank)
        stats = FeatureStats.zeros(self.reference.dim, device=device)
        for start in range(0, self.num_local, EVAL_BATCH_SIZE):
            z = torch.randn(min(EVAL_BATCH_SIZE, self.num_local - start), self.latent_dim, generator=generator, device=device)
            stats.update(self.extractor.features(self.task.ema(z)).to(device))
        stats.all_reduce_()
        return {"eval/fid": fid_from_stats(self.reference, stats.to("cpu")), "eval/num_generated": float(stats.num_samples)}


class GANFamily(Family):
    name = "gan"
    metric, mode = "eval/fid", "min"
    curve_keys = ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake")
    exported = {"generator": "ema", "discriminator": "discriminator"}
    generator_key = "generator"
    gate_metric, gate_mode = "fid", "min"
    truncation = True  # the truncation trick (Brock et al. 2019, BigGAN sec. 3.1): fidelity for variety

    @staticmethod
    def build_models(params: GANParams, *, image_size: int, channels: int) -> tuple[nn.Module, nn.Module]:
        return build_gan(params.preset, image_size=image_size, channels=channels, latent_dim=params.latent_dim,
                         width=params.width, spectral_norm=params.spectral_norm, d_norm=params.d_norm)

    def generator_spec(self, params: GANParams, *, image_size: int, channels: int) -> dict:
        return {"builder": "gan_generator", "kwargs": {"preset": params.preset, "image_size": image_size, "channels": channels,
                                                      "latent_dim": params.latent_dim, "width": params.width}}

    def build_task(self, train, *, image_size, channels, device, world_size, precision) -> GANTask:
        return GANTask(train, image_size=image_size, channels=channels, device=device, world_size=world_size, precision=precision)

    def needs_featurizer(self, train: TrainParams) -> bool:
        return train.eval_every_steps > 0

    def periodic_eval(self, job, task, *, rank, world_size) -> GANPeriodicEval:
        return GANPeriodicEval(job, task, rank=rank, world_size=world_size)


GAN = GANFamily()
