"""Convolutional VAE (Kingma & Welling 2014): the "conv" preset and the corrected "seed" blog net.

Pure ``nn.Module``s. Images are [B, channels, image_size, image_size] in [-1, 1]. The decoder
output depends on ``likelihood``: Bernoulli logits, or a Gaussian mean in [-1, 1] with a learned
scalar ``log_sigma``; ``genmodels.losses.reconstruction_nll`` turns either into nats per image.
"""

import math

import torch
from torch import nn

from .dcgan import check_choice, conv_decoder, conv_encoder, seed_decoder

LIKELIHOODS = ("bernoulli", "gaussian")
PRIORS = ("normal", "flow")
_LOG_2PI = math.log(2 * math.pi)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.square() + _LOG_2PI).sum(-1)


class FlowPrior(nn.Module):
    """A learned prior p(z): z = f(eps) with eps ~ N(0, I) and f a stack of RealNVP affine
    couplings (Dinh et al. 2017), so the prior can take the shape of the aggregate posterior
    instead of leaving regions of N(0, I) that no image encodes ("holes", which decode to
    non-digits). Sampling still takes standard normal noise, and log p(z) is exact:
    log N(f^-1(z); 0, I) + log |det df^-1/dz|. Every coupling starts as the identity, so a fresh
    model is the standard-normal VAE. Works on [..., latent_dim] tensors."""

    def __init__(self, latent_dim: int, num_layers: int = 4, hidden: int = 64):
        super().__init__()
        if latent_dim < 2:
            raise ValueError(f"a flow prior needs latent_dim >= 2 (couplings split z in two); got {latent_dim}")
        halves = torch.arange(latent_dim) % 2
        self.register_buffer("masks", torch.stack([(halves == i % 2).float() for i in range(num_layers)]))
        self.nets = nn.ModuleList()
        for _ in range(num_layers):
            net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                nn.Linear(hidden, 2 * latent_dim))
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
            self.nets.append(net)

    def _scale_shift(self, i: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-scale (tanh-bounded) and shift for the half that coupling i changes; 0 on the kept half."""
        s, t = self.nets[i](kept).chunk(2, dim=-1)
        free = 1 - self.masks[i]
        return torch.tanh(s) * free, t * free

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        """Standard normal noise -> prior draws."""
        z = eps
        for i, mask in enumerate(self.masks):
            s, t = self._scale_shift(i, z * mask)
            z = z * torch.exp(s) + t  # the kept half has s = t = 0
        return z

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) over the last dimension, in nats."""
        log_det = torch.zeros(z.shape[:-1], device=z.device, dtype=z.dtype)
        for i in reversed(range(len(self.masks))):
            s, t = self._scale_shift(i, z * self.masks[i])
            z = (z - t) * torch.exp(-s)
            log_det = log_det - s.sum(-1)
        return log_standard_normal(z) + log_det


class VAE(nn.Module):
    """Encoder -> (mu, logvar) -> z = mu + exp(0.5 * logvar) * eps -> decoder.

    ``encoder`` maps images to [B, 2 * latent_dim] (mu and logvar concatenated); ``decoder`` maps
    z to an unbounded [B, C, S, S] tensor. For "gaussian" a tanh puts the mean in data space and
    ``log_sigma`` is one learned scalar shared by all pixels; for "bernoulli" ``log_sigma`` is None.
    ``prior`` "normal" is N(0, I) with the analytic KL; "flow" is a learned ``FlowPrior`` and the
    KL is estimated from the posterior draw, log q(z | x) - log p(z) (unbiased, as the ELBO).
    Either way ``generate`` and ``sample`` take standard normal noise.
    """

    def __init__(self, *, encoder: nn.Module, decoder: nn.Module, latent_dim: int, likelihood: str,
                 prior: str = "normal"):
        super().__init__()
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_choice("prior", prior, PRIORS)
        self.encoder, self.decoder = encoder, decoder
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.log_sigma = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None
        self.prior = FlowPrior(latent_dim) if prior == "flow" else None

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) over the last dimension, in nats."""
        return log_standard_normal(z) if self.prior is None else self.prior.log_prob(z)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """KL(q(z | x) || p(z)) per image, [B], in nats: analytic for N(0, I) (Kingma & Welling 2014
        appendix B), else log q(z | x) - log p(z) at the posterior draw ``z``. Computed in fp32."""
        mu, logvar, z = mu.float(), logvar.float(), z.float()
        if self.prior is None:  # `genmodels.losses.gaussian_kl`, written out: this package imports no genmodels
            return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        with torch.autocast(z.device.type, enabled=False):
            log_q = -0.5 * ((z - mu).square() * torch.exp(-logvar) + logvar + _LOG_2PI).sum(-1)
            return log_q - self.prior.log_prob(z)

    def from_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """Standard normal noise -> prior draws of z."""
        return eps if self.prior is None else self.prior(eps)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, C, S, S] -> (mu, logvar), each [B, latent_dim]."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(mu, exp(logvar)) as a differentiable function of (mu, logvar) (Kingma & Welling
        2014 sec. 2.4), so the ELBO gradient reaches the encoder."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent_dim] -> Bernoulli logits, or the Gaussian mean in [-1, 1]."""
        out = self.decoder(z)
        return torch.tanh(out) if self.likelihood == "gaussian" else out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (decoder output for one posterior draw z, KL per image): everything the ELBO
        needs from one forward (the flow prior's weights too, so DDP sees them used)."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu.float(), logvar.float())  # fp32 under autocast: the KL's log q needs z exactly
        return self.decode(z), self.kl(mu, logvar, z)

    def to_image(self, decoder_out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image in [-1, 1]: the likelihood's mean, not a random draw
        (a Bernoulli draw would be binary noise on grey-level data)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(decoder_out) * 2 - 1
        return decoder_out

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Latent noise [N, latent_dim] -> images [N, C, S, S] in [-1, 1] (every generator has it)."""
        return self.to_image(self.decode(self.from_noise(z))).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode ``num_samples`` draws z ~ N(0, I) into images in [-1, 1]. ``generator`` must
        live on the model's device."""
        ref = next(self.parameters())
        return self.generate(torch.randn(num_samples, self.latent_dim, generator=generator, device=ref.device, dtype=ref.dtype))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> reconstructions in [-1, 1], decoded from the posterior mean (deterministic)."""
        mu, _ = self.encode(x)
        return self.to_image(self.decode(mu))


def conv_vae(*, image_size: int, channels: int, latent_dim: int, width: int = 64,
             likelihood: str = "bernoulli", decoder_norm: str = "batch", prior: str = "normal") -> VAE:
    """VAE whose encoder is the DCGAN discriminator body (no normalisation) and whose decoder is
    the DCGAN generator body, so it covers 28, 32 and 64 pixel images.

    ``decoder_norm`` "none" drops the generator body's BatchNorm: a VAE decoder meets posterior
    draws in the ELBO and prior draws when sampling, and no one set of BatchNorm statistics fits
    both (bench/RESULTS.md); without it, samples and ELBO both improve (bench/RESULTS.md's probes). The
    default "batch" is what models exported before the option existed hold."""
    body, num_features = conv_encoder(image_size=image_size, channels=channels, width=width, norm="none")
    encoder = nn.Sequential(body, nn.Linear(num_features, 2 * latent_dim))
    decoder = conv_decoder(image_size=image_size, channels=channels, latent_dim=latent_dim, width=width, norm=decoder_norm)
    return VAE(encoder=encoder, decoder=decoder, latent_dim=latent_dim, likelihood=likelihood, prior=prior)


def seed_vae(*, image_size: int, channels: int, latent_dim: int, width: int = 64,
             likelihood: str = "bernoulli", decoder_norm: str = "none", prior: str = "normal") -> VAE:
    """VAE of the blog post we correct: two stride-2 convs -> dense -> (mu, logvar); the decoder
    is the seed GAN generator body (dense -> 4x4x8w -> three stride-2 ConvTranspose), cropped to
    the data size (28 or 32).

    Fixes: the blog decoded the encoder output directly (no sampling of z) and trained on the
    reconstruction error alone (no KL term), i.e. a plain autoencoder whose decoder was never
    trained on draws from the prior, so ``sample`` produced garbage. We sample z with the
    reparameterisation trick and train on the negative ELBO, reconstruction NLL + KL
    (``genmodels.losses.negative_elbo``, Kingma & Welling 2014 eq. 10).
    """
    check_choice("image_size", image_size, (28, 32))
    check_choice("decoder_norm of the seed preset", decoder_norm, ("none",))  # the blog's decoder has none
    feature_size = image_size // 4  # 28 -> 7, 32 -> 8 after two stride-2 convs
    encoder = nn.Sequential(
        nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(2 * width * feature_size**2, 2 * latent_dim),
    )
    decoder = seed_decoder(image_size=image_size, channels=channels, latent_dim=latent_dim, width=width)
    return VAE(encoder=encoder, decoder=decoder, latent_dim=latent_dim, likelihood=likelihood, prior=prior)
