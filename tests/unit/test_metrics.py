"""Unit tests for genmodels.metrics against independent references: scipy's sqrtm for FID,
explicit loops for KID and PRDC, and the closed-form log p(x) of a linear-Gaussian model for the
VAE bounds.

    .venv/bin/python -m pytest -q tests/unit/test_metrics.py
"""

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist

from genmodels.metrics.fid import FeatureStats, bootstrap_fid, fid_from_stats, frechet_distance
from genmodels.metrics.kid import kernel_inception_distance
from genmodels.metrics.likelihood import binarize, elbo_per_image, iwae_bound
from genmodels.metrics.prdc import equal_size, prdc
from genmodels.models import build_vae


def scipy_fid(mu1, sigma1, mu2, sigma2) -> float:
    """The classic pytorch-fid formula: sqrtm of the non-symmetric product, real part kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on (nearly) singular inputs
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def gaussian_of(features: np.ndarray):
    return features.mean(0), np.cov(features, rowvar=False)


# ---------------------------------------------------------------------------------------- FID


def test_fid_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 64))
    b = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) * 0.3 + 0.5
    expected = scipy_fid(*gaussian_of(a), *gaussian_of(b))
    assert frechet_distance(*gaussian_of(a), *gaussian_of(b)) == pytest.approx(expected, rel=1e-6)
    # torch inputs give the same value
    torch_args = [torch.from_numpy(v) for v in (*gaussian_of(a), *gaussian_of(b))]
    assert frechet_distance(*torch_args) == pytest.approx(expected, rel=1e-6)


def test_fid_matches_scipy_sqrtm_on_nearly_singular_covariances():
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    scales = np.logspace(0, -7, 64)  # covariance eigenvalues from 1 down to ~1e-14
    a = (rng.standard_normal((500, 64)) * scales) @ rotation
    b = (rng.standard_normal((500, 64)) * scales * 1.3) @ rotation.T + 0.1
    assert np.linalg.cond(np.cov(a, rowvar=False)) > 1e12
    expected = scipy_fid(*gaussian_of(a), *gaussian_of(b))
    assert frechet_distance(*gaussian_of(a), *gaussian_of(b)) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_gaussian_with_itself_is_zero():
    rng = np.random.default_rng(2)
    for features in (rng.standard_normal((500, 64)), rng.standard_normal((40, 64))):  # full rank, rank 39
        mu, sigma = gaussian_of(features)
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="feature dimensions differ: 3 vs 4"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"covariance \[d, d\]"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_feature_stats_merged_from_chunks_equal_stats_of_the_whole():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float32) + 2
    whole = FeatureStats.from_features(features)
    chunks = [FeatureStats.from_features(chunk) for chunk in features.split([1, 99, 200])]
    merged = chunks[0] + chunks[1].merge(chunks[2])
    streamed = FeatureStats.zeros(16)
    for chunk in features.split(64):
        streamed.update(chunk)
    reference = features.double().numpy()
    for stats in (merged, streamed):
        assert stats.num_samples == 300 and stats.sum.dtype == torch.float64
        assert torch.allclose(stats.mean(), whole.mean(), rtol=1e-12, atol=1e-12)
        assert torch.allclose(stats.covariance(), whole.covariance(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(whole.covariance().numpy(), np.cov(reference, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(whole.mean().numpy(), reference.mean(0), rtol=1e-12)


def test_feature_stats_save_load_round_trip(tmp_path):
    stats = FeatureStats.from_features(torch.randn(10, 4))
    stats.save(tmp_path / "ref" / "stats.pt")
    loaded = FeatureStats.load(tmp_path / "ref" / "stats.pt")
    assert loaded.num_samples == 10
    assert torch.equal(loaded.sum_outer, stats.sum_outer)
    assert FeatureStats.from_dict(stats.to_dict()).num_samples == 10
    with pytest.raises(ValueError, match="lacks keys"):
        FeatureStats.from_dict({"sum": stats.sum})


def test_feature_stats_all_reduce(tmp_path):
    stats = FeatureStats.from_features(torch.randn(10, 4))
    expected = stats.to_dict()
    assert stats.all_reduce_() is stats  # no process group: unchanged
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        stats.all_reduce_()  # one rank: the sum over ranks is the rank's own stats
    finally:
        dist.destroy_process_group()
    assert stats.num_samples == 10
    assert torch.equal(stats.sum_outer, expected["sum_outer"])


def test_fid_from_stats_and_bootstrap():
    generator = torch.Generator().manual_seed(3)
    ref = FeatureStats.from_features(torch.randn(400, 8, generator=generator, dtype=torch.float64))
    generated = torch.randn(300, 8, generator=generator, dtype=torch.float64) * 1.2 + 0.3
    direct = fid_from_stats(FeatureStats.from_features(generated), ref)
    assert direct == pytest.approx(frechet_distance(ref.mean(), ref.covariance(),
                                                    generated.mean(0), torch.cov(generated.T)), rel=1e-10)
    mean, std = bootstrap_fid(generated, ref, num_resamples=10, seed=0)
    assert std > 0 and 0.5 * direct < mean < 2 * direct
    assert bootstrap_fid(generated, ref, num_resamples=10, seed=0) == (mean, std)
    assert bootstrap_fid(generated, ref, num_resamples=10, seed=1) != (mean, std)


# ---------------------------------------------------------------------------------------- KID


def test_kid_matches_explicit_loops_on_three_points():
    x = [[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]
    y = [[1.0, 1.0], [-1.0, 0.0], [3.0, 2.0]]

    def k(u, v):
        return ((u[0] * v[0] + u[1] * v[1]) / 2 + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(3) for j in range(3) if i != j) / (3 * 2)
    across = sum(k(x[i], y[j]) for i in range(3) for j in range(3)) / 9
    mean, std = kernel_inception_distance(np.array(x), np.array(y), num_subsets=4)  # subset_size clips to 3
    assert mean == pytest.approx(within - 2 * across, rel=1e-12)
    assert std == pytest.approx(0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(400, 16, generator=generator)
    same = torch.randn(400, 16, generator=generator)
    same_mean, same_std = kernel_inception_distance(real, same, num_subsets=20, subset_size=200)
    self_mean, _ = kernel_inception_distance(real, real, num_subsets=20, subset_size=200)
    shifted_mean, shifted_std = kernel_inception_distance(real, same + 0.5, num_subsets=20, subset_size=200)
    assert shifted_mean > 10 * shifted_std > 0
    assert abs(same_mean) < 3 * same_std
    # Subsets of one set share points, whose large k(x, x) enter only the cross term: a small
    # negative bias, about -2 k(x, x) * num_shared / subset_size^2, not a distance.
    assert -0.05 * shifted_mean < self_mean < 0
    assert kernel_inception_distance(real, same, num_subsets=20, subset_size=200) == (same_mean, same_std)


# --------------------------------------------------------------------------------------- PRDC


def test_prdc_hand_computed_on_a_line():
    # k = 1. Real radii (distance to the nearest other real point): 0 -> 1, 1 -> 1, 3 -> 2, 6 -> 3.
    # Fake radii: 0.4 -> 0.2, 0.6 -> 0.2, 0.9 -> 0.3, 12 -> 11.1.
    real = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    fake = torch.tensor([[0.4], [0.6], [0.9], [12.0]])
    scores = prdc(real, fake, k=1)
    # Fakes 0.4, 0.6, 0.9 each lie in the balls of reals 0 and 1; fake 12 in none.
    assert scores["precision"] == 3 / 4
    assert scores["density"] == (2 + 2 + 2 + 0) / (1 * 4)
    # Real 0 is in no fake ball (0.4 > 0.2); 1 is in fake 0.9's ball; 3 and 6 in fake 12's ball.
    assert scores["recall"] == 3 / 4
    # Nearest fakes: 0 -> 0.4 (<= 1), 1 -> 0.9 (<= 1), 3 -> 0.9 (2.1 > 2), 6 -> 0.9 (5.1 > 3).
    assert scores["coverage"] == 2 / 4


def test_equal_size_subsamples_the_larger_set_without_replacement_and_deterministically():
    real, fake = torch.arange(40.0).view(20, 2), torch.arange(12.0).view(6, 2)
    a, b = equal_size(real, fake, seed=1)
    assert a.shape == b.shape == (6, 2) and torch.equal(b, fake.double())
    assert len({tuple(row.tolist()) for row in a}) == 6 and all((real.double() == row).all(1).any() for row in a)
    assert torch.equal(equal_size(real, fake, seed=1)[0], a) and not torch.equal(equal_size(real, fake, seed=2)[0], a)


def test_image_metrics_score_prdc_on_equal_numbers_of_real_and_generated_features():
    from genmodels.config import EvaluateParams
    from genmodels.metrics.features import Extractor
    from genmodels.metrics.protocol import Reference, image_metrics

    generator = torch.Generator().manual_seed(0)
    real, images = torch.randn(400, 4, generator=generator), torch.randn(60, 1, 2, 2, generator=generator) * 1.3
    extractor = Extractor(name="flat", weights_sha256="-", resize_rule="-", dim=4, features=lambda x: x.flatten(1).double())
    params = EvaluateParams(kid_subset_size=50, kid_num_subsets=2, bootstrap_resamples=2, seed=3)
    scores = image_metrics(extractor, images, Reference(FeatureStats.from_features(real), real, "-"), params)
    expected = prdc(*equal_size(real, images.flatten(1), seed=3), k=params.prdc_k)
    assert {k: scores[k] for k in expected} == expected
    assert expected != prdc(real, images.flatten(1), k=params.prdc_k)  # 400 vs 60 points would differ


def test_prdc_matches_loops_with_chunking():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 3, generator=generator), torch.randn(25, 3, generator=generator) + 0.5
    k = 3

    def radius(points, i):
        return sorted(float((points[i] - points[j]).norm()) for j in range(len(points)) if j != i)[k - 1]

    real_radii = [radius(real, i) for i in range(len(real))]
    fake_radii = [radius(fake, j) for j in range(len(fake))]
    dist_rf = [[float((real[i] - fake[j]).norm()) for j in range(len(fake))] for i in range(len(real))]
    counts = [sum(dist_rf[i][j] <= real_radii[i] for i in range(len(real))) for j in range(len(fake))]
    expected = {
        "precision": sum(c > 0 for c in counts) / len(fake),
        "recall": sum(any(dist_rf[i][j] <= fake_radii[j] for j in range(len(fake))) for i in range(len(real))) / len(real),
        "density": sum(counts) / (k * len(fake)),
        "coverage": sum(min(dist_rf[i]) <= real_radii[i] for i in range(len(real))) / len(real),
    }
    assert prdc(real, fake, k=k, chunk_size=7) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="k=25"):
        prdc(real, fake, k=25)


# --------------------------------------------------------------------------------- likelihood


class LinearGaussianVAE:
    """z ~ N(0, I_2), x | z ~ N(W z + b, sigma^2 I_2), so log p(x) = log N(x; b, W W^T + sigma^2 I).

    The encoder is deliberately wrong (mean-field, shrunk mean, inflated variance) so the ELBO is
    strictly below log p(x) and the IWAE bound has something to close."""

    latent_dim = 2
    likelihood = "gaussian"

    def __init__(self):
        self.weight = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=torch.float64)
        self.bias = torch.tensor([0.2, -0.1], dtype=torch.float64)
        self.log_sigma = torch.tensor(math.log(0.5), dtype=torch.float64)
        noise_var = math.exp(2 * self.log_sigma.item())
        posterior_cov = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + self.weight.T @ self.weight / noise_var)
        self.posterior_gain = posterior_cov @ self.weight.T / noise_var  # exact posterior mean = gain (x - b)
        self.q_logvar = posterior_cov.diagonal().log() + 0.4

    def encode(self, x):
        mu = 0.8 * (x - self.bias) @ self.posterior_gain.T
        return mu, self.q_logvar.expand_as(mu)

    def decode(self, z):
        return z @ self.weight.T + self.bias

    def log_px(self, x):
        cov = self.weight @ self.weight.T + math.exp(2 * self.log_sigma.item()) * torch.eye(2, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.bias, cov).log_prob(x)

    def exact_elbo(self, x):
        """E_q[log p(x | z)] - KL(q || p), both in closed form."""
        mu, logvar = self.encode(x)
        noise_var = math.exp(2 * self.log_sigma.item())
        residual = x - self.decode(mu)
        trace_term = (self.weight.square() * logvar.exp()[:, None, :]).sum((1, 2))  # tr(W diag(v) W^T)
        expected_log_lik = (-math.log(2 * math.pi * noise_var)
                            - 0.5 * (residual.square().sum(1) + trace_term) / noise_var)
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)
        return expected_log_lik - kl


def _toy_data(model, num_images, seed):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_images, 2, generator=generator, dtype=torch.float64)
    return model.decode(z) + 0.5 * torch.randn(num_images, 2, generator=generator, dtype=torch.float64)


def test_iwae_approaches_the_exact_log_likelihood():
    model = LinearGaussianVAE()
    x = _toy_data(model, 8, seed=0)
    log_px = model.log_px(x)
    generator = torch.Generator().manual_seed(1)
    iwae = iwae_bound(model, x, num_samples=2000, generator=generator, chunk_size=512)
    assert iwae.shape == (8,)
    assert (iwae - log_px).abs().max() < 0.05
    elbo = model.exact_elbo(x)
    assert (log_px - elbo).mean() > 0.2  # the wrong encoder leaves a real gap for IWAE to close
    assert iwae_bound(model, x, num_samples=50, generator=generator).mean() > elbo.mean()


def test_single_sample_iwae_and_elbo_estimate_the_exact_elbo():
    model = LinearGaussianVAE()
    x = _toy_data(model, 1, seed=2).expand(4000, 2)
    exact = model.exact_elbo(x[:1]).item()
    generator = torch.Generator().manual_seed(3)
    for estimate in (iwae_bound(model, x, num_samples=1, generator=generator), elbo_per_image(model, x, generator)):
        standard_error = estimate.std().item() / math.sqrt(len(estimate))
        assert abs(estimate.mean().item() - exact) < 4 * standard_error


def test_bounds_run_on_the_conv_vae_with_chunks():
    torch.manual_seed(0)
    vae = build_vae("conv", image_size=28, channels=1, latent_dim=4, width=8, likelihood="bernoulli").eval()
    generator = torch.Generator().manual_seed(0)
    x = binarize(torch.rand(2, 1, 28, 28, generator=generator) * 2 - 1, generator)
    elbo = elbo_per_image(vae, x, generator)
    iwae = iwae_bound(vae, x, num_samples=7, generator=generator, chunk_size=3)
    assert elbo.shape == iwae.shape == (2,)
    assert torch.isfinite(iwae).all() and (iwae < 0).all() and not iwae.requires_grad


def test_binarize_is_bernoulli_with_the_grey_level_as_probability():
    generator = torch.Generator().manual_seed(0)
    x = torch.full((100, 200), 0.5)  # probability (0.5 + 1) / 2 = 0.75
    binary = binarize(x, generator)
    assert set(binary.unique().tolist()) <= {-1.0, 1.0}
    assert ((binary + 1) / 2).mean().item() == pytest.approx(0.75, abs=0.01)  # 5 standard errors
    assert (binarize(torch.tensor([-1.0, 1.0]), generator) == torch.tensor([-1.0, 1.0])).all()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        binarize(torch.tensor([0.0, 255.0]), generator)
