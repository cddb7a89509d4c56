"""Convolutional VAE (Kingma & Welling 2014): the "conv" preset and the corrected "seed" blog net.

Pure ``nn.Module``s. Images are [B, channels, image_size, image_size] in [-1, 1]. The decoder
output depends on ``likelihood``: Bernoulli logits, or a Gaussian mean in [-1, 1] with a learned
scalar ``log_sigma``; ``genmodels.losses.reconstruction_nll`` turns either into nats per image.
"""

import torch
from torch import nn

from .dcgan import check_choice, conv_decoder, conv_encoder, seed_decoder

LIKELIHOODS = ("bernoulli", "gaussian")


class VAE(nn.Module):
    """Encoder -> (mu, logvar) -> z = mu + exp(0.5 * logvar) * eps -> decoder.

    ``encoder`` maps images to [B, 2 * latent_dim] (mu and logvar concatenated); ``decoder`` maps
    z to an unbounded [B, C, S, S] tensor. For "gaussian" a tanh puts the mean in data space and
    ``log_sigma`` is one learned scalar shared by all pixels; for "bernoulli" ``log_sigma`` is None.
    """

    def __init__(self, *, encoder: nn.Module, decoder: nn.Module, latent_dim: int, likelihood: str):
        super().__init__()
        check_choice("likelihood", likelihood, LIKELIHOODS)
        self.encoder, self.decoder = encoder, decoder
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.log_sigma = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None

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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> (decoder output for one posterior sample z, mu, logvar)."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    def to_image(self, decoder_out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image in [-1, 1]: the likelihood's mean, not a random draw
        (a Bernoulli draw would be binary noise on grey-level data)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(decoder_out) * 2 - 1
        return decoder_out

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Latent noise [N, latent_dim] -> images [N, C, S, S] in [-1, 1] (every generator has it)."""
        return self.to_image(self.decode(z)).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode ``num_samples`` draws z ~ N(0, I) into images in [-1, 1]. ``generator`` must
        live on the model's device."""
        ref = next(self.parameters())
        z = torch.randn(num_samples, self.latent_dim, generator=generator, device=ref.device, dtype=ref.dtype)
        return self.to_image(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> reconstructions in [-1, 1], decoded from the posterior mean (deterministic)."""
        mu, _ = self.encode(x)
        return self.to_image(self.decode(mu))


def conv_vae(*, image_size: int, channels: int, latent_dim: int, width: int = 64,
             likelihood: str = "bernoulli") -> VAE:
    """VAE whose encoder is the DCGAN discriminator body (no normalisation) and whose decoder is
    the DCGAN generator body, so it covers 28, 32 and 64 pixel images."""
    body, num_features = conv_encoder(image_size=image_size, channels=channels, width=width, norm="none")
    encoder = nn.Sequential(body, nn.Linear(num_features, 2 * latent_dim))
    decoder = conv_decoder(image_size=image_size, channels=channels, latent_dim=latent_dim, width=width)
    return VAE(encoder=encoder, decoder=decoder, latent_dim=latent_dim, likelihood=likelihood)


def seed_vae(*, image_size: int, channels: int, latent_dim: int, width: int = 64,
             likelihood: str = "bernoulli") -> VAE:
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
    feature_size = image_size // 4  # 28 -> 7, 32 -> 8 after two stride-2 convs
    encoder = nn.Sequential(
        nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(2 * width * feature_size**2, 2 * latent_dim),
    )
    decoder = seed_decoder(image_size=image_size, channels=channels, latent_dim=latent_dim, width=width)
    return VAE(encoder=encoder, decoder=decoder, latent_dim=latent_dim, likelihood=likelihood)
