"""One VAE training step: negative ELBO (recon + beta * KL) in nats per image."""

from __future__ import annotations

import copy

import torch

from genmodels.config import TrainParams
from genmodels.losses import elbo, gaussian_kl, reconstruction_nll
from genmodels.models import build_vae
from genmodels.train.ema import ema_decay, ema_update
from genmodels.train.gan import NUM_SAMPLES, amp_context, grad_norm, grad_scaler, unwrap, wrap


class VAETask:
    family = "vae"

    def __init__(self, params: TrainParams, *, image_size: int, channels: int, device: torch.device, world_size: int):
        v = params.vae
        self.params, self.device = params, device
        model = build_vae(v.preset, image_size=image_size, channels=channels, latent_dim=v.latent_dim,
                          width=v.width, likelihood=v.likelihood)
        self.ema = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self.model = wrap(model, params, device, world_size)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=v.lr)
        self.scaler = grad_scaler(params, device)
        self.z_fixed = torch.randn(NUM_SAMPLES, v.latent_dim, generator=torch.Generator().manual_seed(params.seed)).to(device)
        self.recon_batch: torch.Tensor | None = None  # fixed val images for the reconstruction grid

    def state(self) -> dict[str, object]:
        return {"vae": unwrap(self.model), "ema": self.ema, "opt": self.opt, "scaler": self.scaler}

    def train_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        v = self.params.vae
        with amp_context(self.params, self.device):
            decoded, mu, logvar = self.model(images)
        # The likelihood and KL in fp32: sums over pixels lose precision in half types.
        log_sigma = unwrap(self.model).log_sigma
        recon = reconstruction_nll(decoded.float(), images, v.likelihood, log_sigma)
        kl = gaussian_kl(mu.float(), logvar.float())
        loss = elbo(recon, kl, v.beta).mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        norm = grad_norm(self.model.parameters())
        self.scaler.step(self.opt)
        self.scaler.update()
        ema_update(self.ema, self.model, ema_decay(v.ema_decay, step))
        return {"loss": loss.detach(), "recon_nll": recon.detach().mean(), "kl": kl.detach().mean(),
                "elbo": -(recon.detach() + kl.detach()).mean(), "grad_norm": norm}

    @torch.no_grad()
    def sample_grid_images(self) -> dict[str, torch.Tensor]:
        model = self.ema  # with ema_decay 0 the EMA is a copy of the latest weights
        grids = {"samples": model.to_image(model.decode(self.z_fixed))}
        if self.recon_batch is not None:
            grids["reconstructions"] = torch.cat([self.recon_batch, model.reconstruct(self.recon_batch)])
        return grids
