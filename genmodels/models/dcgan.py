"""GAN generators and discriminators: DCGAN (Radford et al. 2015) and the corrected "seed" blog net.

Pure ``nn.Module``s: no I/O, logging, ranks or Ray. Images live in [-1, 1] with shape
[B, channels, image_size, image_size]; discriminators return raw logits of shape [B] because the
losses in ``genmodels.losses`` apply the sigmoid (or none, for hinge/WGAN) in a stable form.
The conv trunks are also the VAE encoder/decoder bodies (``genmodels.models.vae``).
"""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

# Side of the first feature map: 28 = 7 * 2**2, while 32 and 64 start from the 4x4 map of DCGAN.
DCGAN_BASE_SIZES = {28: 7, 32: 4, 64: 4}
SEED_IMAGE_SIZES = (28, 32)
D_NORMS = ("batch", "layer", "none")


def check_choice(name: str, value, allowed) -> None:
    """Raise a ValueError naming ``name``, the allowed values and the value given."""
    if value not in allowed:
        raise ValueError(f"expected {name} in {{{', '.join(map(str, allowed))}}}, got {value!r}")


def norm2d(kind: str, num_channels: int) -> nn.Module:
    """Feature normalisation for D (and the VAE decoder). "layer" is GroupNorm with one group, i.e. LayerNorm over
    (C, H, W) per image: Gulrajani et al. 2017 sec. 4 recommend it for WGAN-GP, whose per-sample
    gradient penalty is invalid when BatchNorm mixes the samples of a batch."""
    check_choice("d_norm", kind, D_NORMS)
    if kind == "batch":
        return nn.BatchNorm2d(num_channels)
    if kind == "layer":
        return nn.GroupNorm(1, num_channels)
    return nn.Identity()


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral-normalise every conv and linear weight in ``module`` (Miyato et al. 2018)."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:  # listed first: registering a parametrization adds submodules
        _spectral_norm(layer)
    return module


class CenterCrop(nn.Module):
    """Crop the spatial centre of a [B, C, H, W] batch to [B, C, size, size]."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = (x.shape[-2] - self.size) // 2
        left = (x.shape[-1] - self.size) // 2
        return x[..., top : top + self.size, left : left + self.size]

    def extra_repr(self) -> str:
        return f"size={self.size}"


def conv_decoder(*, image_size: int, channels: int, latent_dim: int, width: int, norm: str = "batch") -> nn.Sequential:
    """DCGAN generator body: z [B, latent_dim] -> unbounded image [B, channels, S, S].

    Projects z to a base map (7x7 for 28, 4x4 for 32/64) with ``width * 2**(n-1)`` channels,
    then n stride-2 ConvTranspose blocks (``norm``, BatchNorm in DCGAN, + ReLU, Radford et al.
    2015 sec. 3) halve the channels down to ``width``; a 3x3 conv maps to ``channels``.
    """
    check_choice("image_size", image_size, tuple(DCGAN_BASE_SIZES))
    check_choice("decoder norm", norm, D_NORMS)
    base = DCGAN_BASE_SIZES[image_size]
    num_upsamples = (image_size // base).bit_length() - 1
    widths = [width * 2**k for k in reversed(range(num_upsamples))] + [width]
    layers: list[nn.Module] = [
        nn.Linear(latent_dim, widths[0] * base * base, bias=norm == "none"),
        nn.Unflatten(1, (widths[0], base, base)),
        norm2d(norm, widths[0]),
        nn.ReLU(),
    ]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        # No bias before a normalisation: its shift makes a conv bias redundant.
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=norm == "none"),
                   norm2d(norm, c_out), nn.ReLU()]
    layers.append(nn.Conv2d(width, channels, 3, padding=1))
    return nn.Sequential(*layers)


def conv_encoder(*, image_size: int, channels: int, width: int, norm: str = "none") -> tuple[nn.Sequential, int]:
    """DCGAN discriminator body: image [B, C, S, S] -> features [B, F]; returns (body, F).

    Stride-2 4x4 convs with LeakyReLU(0.2) double the channels from ``width`` until the map is
    the generator's base size; the input layer is not normalised (Radford et al. 2015 sec. 3).
    """
    check_choice("image_size", image_size, tuple(DCGAN_BASE_SIZES))
    base = DCGAN_BASE_SIZES[image_size]
    num_downsamples = (image_size // base).bit_length() - 1
    layers: list[nn.Module] = []
    c_in, c_out = channels, width
    for i in range(num_downsamples):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
                   nn.Identity() if i == 0 else norm2d(norm, c_out), nn.LeakyReLU(0.2)]
        c_in, c_out = c_out, c_out * 2
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), c_in * base * base


def seed_decoder(*, image_size: int, channels: int, latent_dim: int, width: int) -> nn.Sequential:
    """Seed blog generator body: z -> dense 16w -> dense 16w -> dense to 4x4x8w -> three stride-2
    ConvTranspose (4 -> 8 -> 16 -> 32) -> centre crop to ``image_size``; unbounded output.
    ``width=64`` gives the blog's 1024-unit dense layers and 512-channel 4x4 map."""
    check_choice("image_size", image_size, SEED_IMAGE_SIZES)
    hidden, c0 = 16 * width, 8 * width
    return nn.Sequential(
        nn.Linear(latent_dim, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, c0 * 4 * 4), nn.ReLU(),
        nn.Unflatten(1, (c0, 4, 4)),
        nn.ConvTranspose2d(c0, c0 // 2, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(c0 // 2, c0 // 4, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(c0 // 4, channels, 4, stride=2, padding=1),
        CenterCrop(image_size),  # 32 -> 28 drops 2 border pixels per side; identity for 32
    )


class _TanhGenerator(nn.Module):
    """z [B, latent_dim] -> image [B, C, S, S] in [-1, 1]: tanh over an unbounded body."""

    body: nn.Sequential

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(z))

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Latent noise [N, latent_dim] -> images [N, C, S, S] in [-1, 1] (every generator has it)."""
        return self(z)


class DCGANGenerator(_TanhGenerator):
    """DCGAN generator (Radford et al. 2015) for 28, 32 or 64 pixel images; see ``conv_decoder``."""

    def __init__(self, *, image_size: int, channels: int, latent_dim: int, width: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.body = conv_decoder(image_size=image_size, channels=channels, latent_dim=latent_dim, width=width)


class SeedGenerator(_TanhGenerator):
    """Generator of the blog post we correct, kept as published (see ``seed_decoder``).

    The blog drew 32x32 images for 28x28 data; we centre-crop to the data size instead of
    comparing images of different sizes. 64x64 is unsupported: the body stops at 32.
    """

    def __init__(self, *, image_size: int, channels: int, latent_dim: int, width: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.body = seed_decoder(image_size=image_size, channels=channels, latent_dim=latent_dim, width=width)


class _LogitDiscriminator(nn.Module):
    """image [B, C, S, S] -> raw logit [B]: feature body + linear head, optional spectral norm."""

    def __init__(self, body: nn.Sequential, num_features: int, spectral_norm: bool):
        super().__init__()
        self.body = body
        self.head = nn.Linear(num_features, 1)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(1)


class DCGANDiscriminator(_LogitDiscriminator):
    """DCGAN discriminator (Radford et al. 2015); see ``conv_encoder``.

    ``d_norm`` is "batch" (DCGAN), "layer" or "none"; use "layer"/"none" with WGAN-GP
    (Gulrajani et al. 2017 sec. 4). Returns logits: no sigmoid, the loss applies it stably.
    """

    def __init__(self, *, image_size: int, channels: int, width: int = 64,
                 spectral_norm: bool = False, d_norm: str = "batch"):
        body, num_features = conv_encoder(image_size=image_size, channels=channels, width=width, norm=d_norm)
        super().__init__(body, num_features, spectral_norm)


class SeedDiscriminator(_LogitDiscriminator):
    """Discriminator of the blog post we correct: three stride-2 convs -> dense -> one logit.

    Fixes: the blog ended in a sigmoid and used ``D(real) + D(fake)`` as the D loss, which is
    minimised by D scoring everything as fake and so teaches D nothing about real data. We return
    the logit and train with the BCE objective of Goodfellow et al. 2014 (``losses.d_loss("bce")``),
    computed from logits for numerical stability. 3x3 kernels bring both 28 and 32 to a 4x4 map.
    """

    def __init__(self, *, image_size: int, channels: int, width: int = 64,
                 spectral_norm: bool = False, d_norm: str = "none"):
        check_choice("image_size", image_size, SEED_IMAGE_SIZES)
        layers: list[nn.Module] = []
        c_in = channels
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                       nn.Identity() if i == 0 else norm2d(d_norm, c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers.append(nn.Flatten())
        super().__init__(nn.Sequential(*layers), c_in * 4 * 4, spectral_norm)
