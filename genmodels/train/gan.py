"""One GAN training step under DDP: D update(s), then G update, then the EMA of G.

DDP rules this file follows (each broke real runs):
* D runs ONCE per D update, on cat(real, fake[, interpolates]): two D forwards before one
  backward make DDP's in-place BatchNorm buffer broadcast invalidate the first graph.
* The G update calls D's inner module, not the DDP wrapper, and back-propagates into G's
  parameters only (`backward(inputs=...)`): D's reducer never sees a half-finished iteration,
  and D's gradients are not all-reduced for nothing. It too feeds D cat(real, fake): with
  BatchNorm in D, a fake-only batch is normalised by other statistics than the mixed batch D
  was trained on, and G would chase a different function (seen: loss_g collapsing to ~0.2
  while D scored the same fakes 0.015).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from genmodels.config import TrainParams
from genmodels.losses import d_loss, g_loss, gradient_penalty, interpolate
from genmodels.models import build_gan
from genmodels.train.ema import ema_decay, ema_update

NUM_SAMPLES = 64


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DDP) else module


def wrap(module: nn.Module, params: TrainParams, device: torch.device, world_size: int) -> nn.Module:
    module = module.to(device)
    if world_size == 1:
        return module
    if params.sync_batchnorm:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def amp_context(params: TrainParams, device: torch.device):
    """Autocast on GPU when `train.amp` asks for it (the loop warns that CPU ignores it)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(params.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")


def grad_scaler(params: TrainParams, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only (bf16 has fp32's range); disabled, it passes values through."""
    return torch.amp.GradScaler(device.type, enabled=params.amp == "fp16" and device.type == "cuda")


def grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad.detach().flatten() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads)) if grads else torch.zeros(())


class GANTask:
    family = "gan"

    def __init__(self, params: TrainParams, *, image_size: int, channels: int, device: torch.device, world_size: int):
        g = params.gan
        self.params, self.device = params, device
        self.loss = "wgan" if g.loss == "wgan-gp" else g.loss
        generator, discriminator = build_gan(
            g.preset, image_size=image_size, channels=channels, latent_dim=g.latent_dim, width=g.width,
            spectral_norm=g.spectral_norm, d_norm=g.d_norm,
        )
        self.ema = copy.deepcopy(generator).to(device).eval().requires_grad_(False)
        self.G = wrap(generator, params, device, world_size)
        self.D = wrap(discriminator, params, device, world_size)
        betas = (g.beta1, g.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=g.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=g.lr_d, betas=betas)
        self.scaler = grad_scaler(params, device)
        self.z_fixed = torch.randn(NUM_SAMPLES, g.latent_dim, generator=torch.Generator().manual_seed(params.seed)).to(device)

    def state(self) -> dict[str, object]:
        """Everything a resume needs, by name (one bundle: see checkpoint.py)."""
        return {"generator": unwrap(self.G), "discriminator": unwrap(self.D), "ema": self.ema,
                "opt_g": self.opt_g, "opt_d": self.opt_d, "scaler": self.scaler}

    def _noise(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, self.params.gan.latent_dim, device=self.device)

    def train_step(self, real: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        g, batch, scaler = self.params.gan, real.shape[0], self.scaler
        for _ in range(g.d_steps_per_g_step):
            with amp_context(self.params, self.device):
                with torch.no_grad():
                    fake = self.G(self._noise(batch))
                parts = [real, fake]
                if g.loss == "wgan-gp":
                    parts.append(interpolate(real, fake))
                logits = self.D(torch.cat(parts)).float()
                real_logits, fake_logits = logits[:batch], logits[batch : 2 * batch]
                loss_d = d_loss(self.loss, real_logits, fake_logits)
                if g.loss == "wgan-gp":
                    loss_d = loss_d + g.gp_weight * gradient_penalty(logits[2 * batch :], parts[2], scaler.get_scale() if scaler.is_enabled() else 1.0)
            self.opt_d.zero_grad(set_to_none=True)
            scaler.scale(loss_d).backward()
            scaler.unscale_(self.opt_d)
            norm_d = grad_norm(self.D.parameters())
            scaler.step(self.opt_d)

        with amp_context(self.params, self.device):
            fake_logits_g = unwrap(self.D)(torch.cat([real, self.G(self._noise(batch))]))[batch:].float()
            loss_g = g_loss(self.loss, fake_logits_g)
        self.opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward(inputs=list(self.G.parameters()))
        scaler.unscale_(self.opt_g)
        norm_g = grad_norm(self.G.parameters())
        scaler.step(self.opt_g)
        scaler.update()
        ema_update(self.ema, self.G, ema_decay(g.ema_decay, step))

        score = torch.sigmoid if self.loss == "bce" else (lambda t: t)  # D(x) as a probability for BCE
        return {
            "loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_real": score(real_logits.detach()).mean(), "d_fake": score(fake_logits.detach()).mean(),
            "grad_norm_d": norm_d, "grad_norm_g": norm_g,
        }

    @torch.no_grad()
    def sample_grid_images(self) -> dict[str, torch.Tensor]:
        return {"samples": self.ema(self.z_fixed)}
