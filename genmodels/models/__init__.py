"""Model registry: a preset name -> constructors. A new family or preset is one dict entry.

    G, D = build_gan("dcgan", image_size=32, channels=3, latent_dim=100, width=64,
                     spectral_norm=False, d_norm="batch")
    vae = build_vae("conv", image_size=28, channels=1, latent_dim=32, width=32, likelihood="bernoulli")

Every size comes from the caller (the typed `train.<family>` params): presets hold no defaults
of their own, so `params.yaml` is the one place a latent size is set.

This package imports only torch and itself (relative imports): the registered MLflow model
carries a copy of it under a name of its own (`genmodels.stages.register`), so the consumers of
`models:/genmodels-gan@champion` need torch and mlflow, not this repository.
`build_generator(builder, **kwargs)` rebuilds a registered generator; each has `generate(z)`.
"""

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .dcgan import DCGANDiscriminator, DCGANGenerator, SeedDiscriminator, SeedGenerator
from .vae import VAE, conv_vae, seed_vae


@dataclass(frozen=True, kw_only=True)
class GANPreset:
    generator: Callable[..., nn.Module]
    discriminator: Callable[..., nn.Module]


GAN_PRESETS: dict[str, GANPreset] = {
    "dcgan": GANPreset(generator=DCGANGenerator, discriminator=DCGANDiscriminator),
    "seed": GANPreset(generator=SeedGenerator, discriminator=SeedDiscriminator),
}

VAE_PRESETS: dict[str, Callable[..., VAE]] = {"conv": conv_vae, "seed": seed_vae}


def _lookup(kind: str, presets: dict, preset: str):
    if preset not in presets:
        raise ValueError(f"unknown {kind} preset {preset!r}; expected one of {sorted(presets)}")
    return presets[preset]


def build_gan(preset: str, *, image_size: int, channels: int, latent_dim: int,
              width: int = 64, spectral_norm: bool = False, d_norm: str = "batch") -> tuple[nn.Module, nn.Module]:
    """Return (generator, discriminator) for ``preset`` (see ``GAN_PRESETS``)."""
    generator = build_gan_generator(preset, image_size=image_size, channels=channels, latent_dim=latent_dim, width=width)
    discriminator = GAN_PRESETS[preset].discriminator(image_size=image_size, channels=channels, width=width,
                                       spectral_norm=spectral_norm, d_norm=d_norm)
    return generator, discriminator


def build_gan_generator(preset: str, *, image_size: int, channels: int, latent_dim: int, width: int = 64) -> nn.Module:
    """The generator of ``preset`` alone (what a registered GAN holds)."""
    spec = _lookup("GAN", GAN_PRESETS, preset)
    return spec.generator(image_size=image_size, channels=channels, latent_dim=latent_dim, width=width)


def build_vae(preset: str, *, image_size: int, channels: int, latent_dim: int,
              width: int = 64, likelihood: str = "bernoulli", decoder_norm: str | None = None, prior: str = "normal") -> VAE:
    """Return the VAE for ``preset`` (see ``VAE_PRESETS``); ``decoder_norm`` None: the preset's own."""
    build = _lookup("VAE", VAE_PRESETS, preset)
    norm = {} if decoder_norm is None else {"decoder_norm": decoder_norm}
    return build(image_size=image_size, channels=channels, latent_dim=latent_dim, width=width, likelihood=likelihood,
                 prior=prior, **norm)


GENERATORS: dict[str, Callable[..., nn.Module]] = {"gan_generator": build_gan_generator, "vae": build_vae}
"""Builder name -> constructor of a module with `generate(z)`: what a family's `generator_spec` names."""


def build_generator(builder: str, **kwargs) -> nn.Module:
    if builder not in GENERATORS:
        raise ValueError(f"unknown generator builder {builder!r}; expected one of {sorted(GENERATORS)}")
    return GENERATORS[builder](**kwargs)


__all__ = ["GAN_PRESETS", "GENERATORS", "VAE_PRESETS", "VAE", "build_gan", "build_gan_generator", "build_generator", "build_vae"]
