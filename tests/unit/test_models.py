"""Unit tests for genmodels.models and genmodels.train.ema: tiny widths, CPU, < 1 s each.

    .venv/bin/python -m pytest -q tests/unit/test_models.py
"""

import ast
import copy
import pathlib

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import genmodels.models.dcgan
import genmodels.models.vae
from genmodels.config import VAEParams, load_params
from genmodels.models import GAN_PRESETS, VAE_PRESETS, build_gan, build_vae
from genmodels.train.ema import ema_update, standing_batchnorm_stats
from genmodels.losses import gaussian_kl
from genmodels.models.vae import FlowPrior, log_standard_normal

WIDTH, LATENT_DIM, BATCH = 8, 6, 2
GAN_CASES = [("dcgan", s, c) for s in (28, 32, 64) for c in (1, 3)] + [("seed", s, c) for s in (28, 32) for c in (1, 3)]
VAE_CASES = [("conv", s, c) for s in (28, 32, 64) for c in (1, 3)] + [("seed", s, c) for s in (28, 32) for c in (1, 3)]


def tiny_gan(preset="dcgan", image_size=32, channels=3, **kwargs):
    kwargs = {"latent_dim": LATENT_DIM, "width": WIDTH, **kwargs}
    return build_gan(preset, image_size=image_size, channels=channels, **kwargs)


def tiny_vae(preset="conv", image_size=28, channels=1, likelihood="bernoulli"):
    return build_vae(preset, image_size=image_size, channels=channels, latent_dim=LATENT_DIM,
                     width=WIDTH, likelihood=likelihood)


@pytest.mark.parametrize("preset,image_size,channels", GAN_CASES)
@pytest.mark.parametrize("d_norm", ["batch", "layer", "none"])
def test_gan_shapes(preset, image_size, channels, d_norm):
    generator, discriminator = tiny_gan(preset, image_size, channels, d_norm=d_norm)
    images = generator(torch.randn(BATCH, LATENT_DIM))
    assert images.shape == (BATCH, channels, image_size, image_size)
    assert images.abs().max() <= 1.0
    assert discriminator(images).shape == (BATCH,)


def test_seed_generator_crops_the_centre_of_its_32_pixel_output():
    torch.manual_seed(0)
    generator, _ = tiny_gan("seed", image_size=28, channels=1)
    z = torch.randn(BATCH, LATENT_DIM)
    full = torch.tanh(generator.body[:-1](z))  # body without the crop
    assert full.shape[-1] == 32
    torch.testing.assert_close(generator(z), full[..., 2:30, 2:30])


@pytest.mark.parametrize("build", [lambda: tiny_gan("seed", image_size=64), lambda: tiny_vae("seed", image_size=64)])
def test_seed_rejects_64_pixels(build):
    with pytest.raises(ValueError, match=r"image_size in \{28, 32\}, got 64"):
        build()


def test_dcgan_rejects_unsupported_size():
    with pytest.raises(ValueError, match=r"image_size in \{28, 32, 64\}, got 48"):
        tiny_gan("dcgan", image_size=48)


def test_discriminator_returns_unbounded_logits():
    _, discriminator = tiny_gan(d_norm="none")
    with torch.no_grad():
        discriminator.head.bias.fill_(5.0)  # a sigmoid output could never exceed 1
    assert (discriminator(torch.randn(BATCH, 3, 32, 32)) > 1).all()


@pytest.mark.parametrize("preset", ["dcgan", "seed"])
def test_spectral_norm_is_applied_to_every_discriminator_layer(preset):
    _, plain = tiny_gan(preset, spectral_norm=False)
    _, normed = tiny_gan(preset, spectral_norm=True)
    layers = [m for m in normed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 4  # three convs and the head
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    assert not any(parametrize.is_parametrized(m, "weight") for m in plain.modules())
    normed(torch.randn(BATCH, 3, 32, 32))  # one power iteration; exact for the vector-shaped head
    torch.testing.assert_close(normed.head.weight.norm(), torch.tensor(1.0))


@pytest.mark.parametrize("d_norm,norm_type", [("batch", nn.BatchNorm2d), ("layer", nn.GroupNorm), ("none", None)])
def test_d_norm_selects_the_normalisation(d_norm, norm_type):
    _, discriminator = tiny_gan(d_norm=d_norm)
    found = {type(m) for m in discriminator.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}
    assert found == ({norm_type} if norm_type else set())


def test_bad_d_norm_is_named():
    with pytest.raises(ValueError, match="'instance'"):
        tiny_gan(d_norm="instance")


@pytest.mark.parametrize("build,presets", [(build_gan, GAN_PRESETS), (build_vae, VAE_PRESETS)])
def test_unknown_preset_names_the_preset_and_the_valid_ones(build, presets):
    with pytest.raises(ValueError) as info:
        build("stylegan9", image_size=32, channels=3, latent_dim=4)
    assert "'stylegan9'" in str(info.value)
    assert all(name in str(info.value) for name in presets)


def test_latent_dim_comes_from_the_caller_and_the_vae_default_is_set_once(repo_root):
    generator, _ = build_gan("seed", image_size=32, channels=1, latent_dim=7, width=WIDTH)
    vae = build_vae("seed", image_size=28, channels=1, latent_dim=5, width=WIDTH)
    assert generator.body[0].in_features == 7
    assert vae.latent_dim == 5 and vae.encode(torch.zeros(1, 1, 28, 28))[0].shape == (1, 5)
    with pytest.raises(TypeError, match="latent_dim"):
        build_vae("conv", image_size=28, channels=1)  # no preset default to silently differ from params.yaml
    assert VAEParams().latent_dim == load_params(repo_root / "params.yaml").train.vae.latent_dim


def _imported_modules(module) -> set[str]:
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", [genmodels.models.dcgan, genmodels.models.vae])
def test_model_files_import_no_infrastructure(module):
    imported = _imported_modules(module)
    assert "torch" in imported  # the parser sees the file's imports at all
    assert not imported & {"ray", "mlflow", "logging", "os", "pathlib"}


@pytest.mark.parametrize("preset,image_size,channels", VAE_CASES)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_shapes(preset, image_size, channels, likelihood):
    vae = tiny_vae(preset, image_size, channels, likelihood)
    x = torch.rand(BATCH, channels, image_size, image_size) * 2 - 1
    out, kl = vae(x)
    mu, logvar = vae.encode(x)
    assert out.shape == x.shape and vae.decode(mu).shape == x.shape and kl.shape == (BATCH,)
    assert mu.shape == logvar.shape == (BATCH, LATENT_DIM)
    assert vae.sample(3).shape == (3, channels, image_size, image_size)
    assert vae.reconstruct(x).shape == x.shape
    assert (vae.log_sigma is None) == (likelihood == "bernoulli")


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_sample_is_the_mean_image_in_range(likelihood):
    vae = tiny_vae(likelihood=likelihood).eval()
    with torch.no_grad():
        vae.decoder[-1].weight.mul_(1e3)  # raw decoder outputs far outside [-1, 1]
    samples = vae.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.min() >= -1 and samples.max() <= 1
    z = torch.randn(4, LATENT_DIM, generator=torch.Generator().manual_seed(0))
    raw = vae.decoder(z)
    assert raw.abs().max() > 1
    expected = torch.sigmoid(raw) * 2 - 1 if likelihood == "bernoulli" else torch.tanh(raw)
    torch.testing.assert_close(samples, expected.detach())


def test_bernoulli_sample_is_not_binary():
    samples = tiny_vae().eval().sample(4, generator=torch.Generator().manual_seed(0))
    assert ((samples > -0.99) & (samples < 0.99)).float().mean() > 0.5


def test_reparameterisation_is_differentiable_in_mu_and_logvar():
    mu = torch.tensor([[0.5, -1.0]], requires_grad=True)
    logvar = torch.tensor([[0.2, -0.4]], requires_grad=True)
    z = genmodels.models.vae.VAE.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(1, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_vae_forward_samples_z_and_gradient_reaches_encoder_logvar_head():
    torch.manual_seed(0)
    vae = tiny_vae("seed")
    x = torch.rand(BATCH, 1, 28, 28) * 2 - 1
    out, _ = vae(x)
    assert not torch.equal(out, vae(x)[0])  # a fresh eps each forward
    out.sum().backward()
    head = vae.encoder[-1]  # rows [:latent] -> mu, rows [latent:] -> logvar
    assert head.weight.grad[LATENT_DIM:].abs().sum() > 0
    assert vae.encoder[0].weight.grad.abs().sum() > 0


def test_reconstruct_is_deterministic():
    vae = tiny_vae().eval()
    x = torch.rand(BATCH, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(vae.reconstruct(x), vae.reconstruct(x))


def test_unknown_likelihood_is_named():
    with pytest.raises(ValueError, match="'poisson'"):
        tiny_vae(likelihood="poisson")


class _Wrapped(nn.Module):
    """Stands in for DistributedDataParallel, which exposes the model as ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _bn_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net[1].running_mean.normal_()
    return net


def test_ema_decay_zero_copies_and_one_keeps():
    model, ema = _bn_net(0), _bn_net(1)
    before = copy.deepcopy(ema.state_dict())
    ema_update(ema, _Wrapped(model), decay=1.0)
    for name, value in ema.named_parameters():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    ema_update(ema, _Wrapped(model), decay=0.0)
    for name, value in ema.named_parameters():
        torch.testing.assert_close(value, dict(model.named_parameters())[name], rtol=0, atol=0)


def test_ema_update_leaves_batchnorm_statistics_to_standing_stats():
    model, ema = _bn_net(0), _bn_net(1)
    before = ema[1].running_mean.clone()
    ema_update(ema, model, decay=0.5)
    # The live net's running stats describe the live weights, not the average.
    torch.testing.assert_close(ema[1].running_mean, before, rtol=0, atol=0)


def test_standing_stats_fit_the_ema_weights_and_leave_the_global_rng_alone():
    ema = _bn_net(1).eval()
    rng_before = torch.get_rng_state()
    standing_batchnorm_stats(ema, lambda g: ema(torch.randn(64, 3, generator=g)), seed=4, num_batches=5)
    assert torch.equal(torch.get_rng_state(), rng_before) and not ema.training
    generator = torch.Generator().manual_seed(4)
    activations = torch.cat([ema[0](torch.randn(64, 3, generator=generator)) for _ in range(5)]).detach()
    torch.testing.assert_close(ema[1].running_mean, activations.mean(0))
    batch_vars = torch.stack([chunk.var(0) for chunk in activations.split(64)])
    torch.testing.assert_close(ema[1].running_var, batch_vars.mean(0))


def test_ema_decay_interpolates():
    model, ema = _bn_net(0), _bn_net(1)
    expected = 0.9 * ema[0].weight.detach() + 0.1 * model[0].weight.detach()
    ema_update(ema, model, decay=0.9)
    torch.testing.assert_close(ema[0].weight.detach(), expected)
    with pytest.raises(ValueError, match="1.5"):
        ema_update(ema, model, decay=1.5)


def _random_flow(latent_dim: int = 4) -> FlowPrior:
    torch.manual_seed(0)
    flow = FlowPrior(latent_dim)
    for net in flow.nets:
        torch.nn.init.normal_(net[-1].weight, std=0.3)
    return flow


def test_a_fresh_flow_prior_is_the_standard_normal():
    flow, eps = FlowPrior(4), torch.randn(16, 4)
    assert torch.equal(flow(eps), eps)
    torch.testing.assert_close(flow.log_prob(eps), log_standard_normal(eps))


def test_flow_prior_density_is_the_change_of_variables_of_its_sampler():
    flow = _random_flow()
    for eps in torch.randn(5, 4):
        z = flow(eps[None])[0]
        jacobian = torch.autograd.functional.jacobian(lambda e: flow(e[None])[0], eps)
        expected = log_standard_normal(eps) - torch.linalg.slogdet(jacobian).logabsdet
        torch.testing.assert_close(flow.log_prob(z[None])[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(flow(torch.ones(1, 4)), torch.ones(1, 4))


def test_the_flow_prior_kl_estimate_is_unbiased_and_samples_go_through_the_flow():
    vae = build_vae("conv", image_size=28, channels=1, latent_dim=4, width=4, prior="flow")
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4) * 0.3
    z = mu + torch.exp(0.5 * logvar) * torch.randn(20000, 3, 4)
    estimate = vae.kl(mu, logvar, z).mean(0)  # the flow starts as the identity: N(0, I)
    torch.testing.assert_close(estimate, gaussian_kl(mu, logvar), atol=0.05, rtol=0.02)
    vae.prior = _random_flow()
    eps = torch.randn(2, 4)
    torch.testing.assert_close(vae.generate(eps), vae.to_image(vae.decode(vae.prior(eps))).clamp(-1, 1))


def test_the_flow_prior_kl_under_bf16_autocast_is_taken_at_an_fp32_draw():
    """log q(z | x) divides (z - mu)^2 by the posterior variance: a z rounded to bf16 biases it."""
    vae = build_vae("conv", image_size=28, channels=1, latent_dim=4, width=4, prior="flow")
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    with torch.autocast("cpu", torch.bfloat16):
        torch.manual_seed(0)
        _, kl = vae(x)
        mu, logvar = vae.encode(x)
    torch.manual_seed(0)
    eps = torch.randn(mu.shape, dtype=torch.float32)
    z = mu.float() + torch.exp(0.5 * logvar.float()) * eps
    torch.testing.assert_close(kl, vae.kl(mu, logvar, z))
