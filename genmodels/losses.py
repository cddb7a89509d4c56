"""Losses as plain functions of tensors: GAN objectives, WGAN-GP penalty, VAE likelihood terms.

GAN losses take raw discriminator logits of shape [B] and return scalar means. VAE terms return
one value per image, shape [B], in nats; images are in [-1, 1].
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F

# softplus(-l) = -log sigmoid(l) and softplus(l) = -log(1 - sigmoid(l)), computed without overflow.
_D_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # Goodfellow et al. 2014 eq. 1: BCE with label 1 for real, 0 for fake.
    "bce": lambda real, fake: F.softplus(-real).mean() + F.softplus(fake).mean(),
    # Lim & Ye 2017; Miyato et al. 2018 eq. 16.
    "hinge": lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
    # Arjovsky et al. 2017: D (the critic) maximises E[D(real)] - E[D(fake)].
    "wgan": lambda real, fake: fake.mean() - real.mean(),
}
_G_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # Non-saturating -log D(G(z)) (Goodfellow et al. 2014 sec. 3): strong gradients early on,
    # when D rejects fakes confidently and log(1 - D(G(z))) saturates.
    "bce": lambda fake: F.softplus(-fake).mean(),
    "hinge": lambda fake: -fake.mean(),
    "wgan": lambda fake: -fake.mean(),
}
GAN_LOSS_KINDS = tuple(_D_LOSSES)


def _check_kind(kind: str) -> None:
    if kind not in _D_LOSSES:
        raise ValueError(f"unknown GAN loss kind {kind!r}; expected one of {list(GAN_LOSS_KINDS)}")


def d_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss (scalar, to minimise) for ``kind`` in "bce", "hinge", "wgan"."""
    _check_kind(kind)
    return _D_LOSSES[kind](logits_real, logits_fake)


def g_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss (scalar, to minimise) for ``kind`` in "bce", "hinge", "wgan"."""
    _check_kind(kind)
    return _G_LOSSES[kind](logits_fake)


def interpolate(real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random points on the lines between real and fake images (Gulrajani et al. 2017 alg. 1),
    one uniform alpha per image; detached leaf with ``requires_grad`` so D can be differentiated
    with respect to it. ``fake`` is cast to ``real``'s dtype: under autocast G returns bf16/fp16
    while the data stays fp32, and ``torch.lerp`` (not an autocast op) refuses mixed dtypes."""
    alpha_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(alpha_shape, generator=generator, device=real.device, dtype=real.dtype)
    return torch.lerp(real.detach(), fake.detach().to(real.dtype), alpha).requires_grad_(True)


def gradient_penalty(d_out_interp: torch.Tensor, interp: torch.Tensor, loss_scale: float = 1.0) -> torch.Tensor:
    """WGAN-GP penalty mean((||dD/dx||_2 - 1)^2) over interpolates (Gulrajani et al. 2017 eq. 3).

    Takes D's output on ``interp`` rather than D itself so the caller can run D once on
    ``cat(real, fake, interp)``: a second D forward in the same step breaks DDP (its BatchNorm
    buffers and the reducer's one-backward-per-forward assumption). ``create_graph=True`` lets
    the penalty itself be back-propagated into D's weights. Multiply by lambda (10 in the paper).
    Under fp16 autocast pass the GradScaler's scale: the input gradient is taken of the scaled
    output (so it does not underflow) and unscaled before the norm (PyTorch AMP recipe).
    """
    (grad,) = torch.autograd.grad(d_out_interp.sum() * loss_scale, interp, create_graph=True)
    grad = grad / loss_scale
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image, shape [B], in nats (Kingma & Welling 2014
    appendix B): 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def reconstruction_nll(decoder_out: torch.Tensor, x: torch.Tensor, likelihood: str,
                       log_sigma: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(x | z) per image, shape [B], in nats, for images ``x`` in [-1, 1].

    "bernoulli": ``decoder_out`` are logits and the targets are the grey levels (x + 1) / 2 in
    [0, 1], used as soft labels in the binary cross-entropy. On grey-level data this is a
    cross-entropy, not a normalised density (the continuous Bernoulli of Loaiza-Ganem &
    Cunningham 2019 adds a constant per pixel); it equals the exact Bernoulli NLL only for binary
    data, which is why evaluation binarises the images elsewhere before reporting likelihoods.

    "gaussian": ``decoder_out`` is the mean in [-1, 1] space and ``log_sigma`` a scalar (or
    broadcastable) log standard deviation; the full NLL including 0.5 * log(2 pi) per pixel. It is
    a density in [-1, 1] space: converting to [0, 255] adds D * log(127.5) nats for D pixels.
    """
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(decoder_out, (x + 1) / 2, reduction="none")
    elif likelihood == "gaussian":
        if log_sigma is None:
            raise ValueError("reconstruction_nll with likelihood 'gaussian' needs log_sigma (the VAE's log_sigma)")
        nll = 0.5 * ((x - decoder_out) * torch.exp(-log_sigma)) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of ['bernoulli', 'gaussian']")
    return nll.flatten(1).sum(1)


def negative_elbo(recon_nll: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per-image training loss recon_nll + beta * kl, shape [B], in nats (to minimise).

    With beta = 1 this is the negative ELBO; the ELBO itself is -(recon_nll + kl) whatever beta,
    since beta (Higgins et al. 2017) only re-weights the training objective.
    """
    return recon_nll + beta * kl
