"""Lower bounds on a VAE's log-likelihood, in nats per image.

    x = binarize(images, generator)          # Bernoulli VAEs: evaluate on binary data
    elbo = elbo_per_image(vae, x)            # [B]
    iwae = iwae_bound(vae, x, num_samples=5000)   # [B], tighter: ELBO <= IWAE_k <= log p(x)

``model`` is anything with ``encode(x) -> (mu, logvar)``, ``decode(z) -> decoder_out``,
``latent_dim``, ``likelihood`` ("bernoulli" or "gaussian") and ``log_sigma`` (tensor or None), such
as ``genmodels.models.vae.VAE``. Put the model in eval mode first; the bounds run under no_grad.
Gaussian likelihoods are densities in [-1, 1] pixel space (see ``reconstruction_nll``).
"""

from __future__ import annotations

import math

import torch

from genmodels.losses import gaussian_kl, reconstruction_nll
from genmodels.models.vae import log_standard_normal

_LOG_2PI = math.log(2 * math.pi)


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarisation (Salakhutdinov & Murray 2008): each pixel is independently 1 with
    probability (x + 1) / 2, the grey level in [0, 1], and 0 otherwise.

    Takes and returns data space: ``x`` in [-1, 1], the result in {-1, 1} (1 and 0 mapped to 1
    and -1), so ``reconstruction_nll``'s Bernoulli targets (x + 1) / 2 become exactly {0, 1} and
    the ELBO is a bound on a normalised discrete likelihood. ``generator`` must live on x's device.
    """
    if x.numel() and (x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6):
        raise ValueError(f"binarize expects images in [-1, 1]; got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
    probability = ((x + 1) / 2).clamp(0, 1)
    return torch.bernoulli(probability, generator=generator) * 2 - 1


def log_px_given_z(decoder_out: torch.Tensor, x: torch.Tensor, likelihood: str,
                   log_sigma: torch.Tensor | None) -> torch.Tensor:
    """log p(x | z) per image, [B], in nats: minus ``genmodels.losses.reconstruction_nll``."""
    return -reconstruction_nll(decoder_out, x, likelihood, log_sigma)


@torch.no_grad()
def elbo_per_image(model, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ELBO per image, [B], in nats (Kingma & Welling 2014 eq. 10): log p(x | z) for one posterior
    sample z ~ q(z | x), minus KL(q(z | x) || p(z)): analytic for N(0, I), the model's own `kl`
    (estimated at the same z) for a learned prior. Unbiased for the ELBO."""
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    kl = model.kl(mu, logvar, z) if hasattr(model, "kl") else gaussian_kl(mu, logvar)
    return log_px_given_z(model.decode(z), x, model.likelihood, model.log_sigma) - kl


@torch.no_grad()
def iwae_bound(model, x: torch.Tensor, num_samples: int = 100, generator: torch.Generator | None = None,
               chunk_size: int = 50) -> torch.Tensor:
    """Importance-weighted bound per image, [B], in nats (Burda et al. 2016 eq. 8):

        log (1/k) sum_i p(x, z_i) / q(z_i | x),   z_1..z_k ~ q(z | x),  k = ``num_samples``,

    with log p(x, z) = log p(x | z) + log p(z) (the model's `log_prior`, else N(0, I)) and log q written out, combined with
    logsumexp. k = 1 is the single-sample ELBO (in expectation); the bound increases with k to
    log p(x) (Burda et al. theorem 1). ``chunk_size`` posterior samples are decoded per forward
    (batch chunk_size * B), so memory is bounded whatever k.
    """
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples and chunk_size must be >= 1; got {num_samples} and {chunk_size}")
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    batch_size = x.shape[0]
    log_weights = []
    for start in range(0, num_samples, chunk_size):
        count = min(chunk_size, num_samples - start)
        eps = torch.randn((count,) + mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + std * eps  # [count, B, latent_dim]
        # log N(z; mu, std^2) with (z - mu) / std = eps exactly.
        log_q = -0.5 * (eps.square() + logvar + _LOG_2PI).sum(-1)
        decoder_out = model.decode(z.reshape(count * batch_size, -1))
        x_repeated = x.expand((count,) + x.shape).reshape((count * batch_size,) + x.shape[1:])
        log_px = log_px_given_z(decoder_out, x_repeated, model.likelihood, model.log_sigma).view(count, batch_size)
        log_pz = model.log_prior(z) if hasattr(model, "log_prior") else log_standard_normal(z)
        log_weights.append((log_px + log_pz - log_q).to(torch.float64))
    log_weights = torch.cat(log_weights)  # [k, B]
    return torch.logsumexp(log_weights, dim=0) - math.log(num_samples)
