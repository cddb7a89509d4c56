"""Unit tests for genmodels.losses against hand-computed values and torch references.

    .venv/bin/python -m pytest -q tests/unit/test_losses.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

from genmodels.losses import d_loss, negative_elbo, g_loss, gaussian_kl, gradient_penalty, interpolate, reconstruction_nll

REAL = torch.tensor([0.5, 2.0, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 0.5])


def _softplus(v):
    return math.log1p(math.exp(v))


def test_bce_losses_match_hand_values():
    expected_d = sum(_softplus(-r) for r in REAL.tolist()) / 3 + sum(_softplus(f) for f in FAKE.tolist()) / 3
    expected_g = sum(-math.log(1 / (1 + math.exp(-f))) for f in FAKE.tolist()) / 3  # non-saturating -log D(G(z))
    assert d_loss("bce", REAL, FAKE).item() == pytest.approx(expected_d, rel=1e-6)
    assert g_loss("bce", FAKE).item() == pytest.approx(expected_g, rel=1e-6)


def test_bce_is_stable_for_huge_logits():
    assert torch.isfinite(d_loss("bce", torch.tensor([-1e4]), torch.tensor([1e4])))


def test_hinge_losses_match_hand_values():
    # relu(1 - real) = [0.5, 0, 2], relu(1 + fake) = [0, 1, 1.5]
    assert d_loss("hinge", REAL, FAKE).item() == pytest.approx(2.5 / 3 + 2.5 / 3)
    assert g_loss("hinge", FAKE).item() == pytest.approx(0.5)


def test_wgan_losses_match_hand_values():
    assert d_loss("wgan", REAL, FAKE).item() == pytest.approx(-1.5 / 3 - 1.5 / 3)
    assert g_loss("wgan", FAKE).item() == pytest.approx(0.5)


@pytest.mark.parametrize("call", [lambda: d_loss("lsgan", REAL, FAKE), lambda: g_loss("lsgan", FAKE)])
def test_unknown_loss_kind_is_named(call):
    with pytest.raises(ValueError) as info:
        call()
    assert "'lsgan'" in str(info.value)
    assert all(kind in str(info.value) for kind in ("bce", "hinge", "wgan"))


def test_interpolate_lies_on_the_segment_and_is_a_grad_leaf():
    real, fake = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    interp = interpolate(real, fake, generator=torch.Generator().manual_seed(0))
    assert interp.is_leaf and interp.requires_grad
    alpha = interp.flatten(1)
    assert torch.equal(alpha, alpha[:, :1].expand_as(alpha))  # one alpha per image
    assert (alpha >= 0).all() and (alpha <= 1).all() and alpha[:, 0].unique().numel() == 4
    again = interpolate(real, fake, generator=torch.Generator().manual_seed(0))
    assert torch.equal(interp, again)


def test_gradient_penalty_of_linear_critic_is_exact_from_a_single_forward():
    torch.manual_seed(0)
    w = torch.randn(12, requires_grad=True)
    real, fake = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2)
    interp = interpolate(real, fake)
    d_out = torch.cat([real, fake, interp]).flatten(1) @ w  # one D forward on all three parts
    penalty = gradient_penalty(d_out[6:], interp)
    w_norm = w.detach().norm()
    torch.testing.assert_close(penalty, (w_norm - 1) ** 2)
    penalty.backward()  # create_graph=True: the penalty trains D's weights
    torch.testing.assert_close(w.grad, 2 * (w_norm - 1) * w.detach() / w_norm)


def test_gaussian_kl_is_zero_at_the_prior():
    torch.testing.assert_close(gaussian_kl(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))


def test_gaussian_kl_matches_monte_carlo():
    mu = torch.tensor([[0.5, -0.3, 1.0], [0.0, 0.2, -0.7]])
    logvar = torch.tensor([[0.2, -0.5, 0.1], [-1.0, 0.3, 0.0]])
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.manual_seed(0)
    z = q.sample((50_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    kl = gaussian_kl(mu, logvar)
    assert kl.shape == (2,)
    torch.testing.assert_close(kl, monte_carlo, rtol=0.03, atol=0.01)


def test_bernoulli_nll_is_bce_with_logits_summed_per_image():
    torch.manual_seed(0)
    logits, x = torch.randn(3, 1, 4, 4), torch.rand(3, 1, 4, 4) * 2 - 1
    nll = reconstruction_nll(logits, x, "bernoulli")
    expected = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(nll, expected)
    binary = (x > 0).float() * 2 - 1  # on binary data it is the exact Bernoulli NLL
    exact = -torch.distributions.Bernoulli(logits=logits).log_prob((binary + 1) / 2).sum((1, 2, 3))
    torch.testing.assert_close(reconstruction_nll(logits, binary, "bernoulli"), exact)


def test_gaussian_nll_matches_normal_log_prob():
    torch.manual_seed(0)
    mean, x = torch.rand(3, 3, 2, 2) * 2 - 1, torch.rand(3, 3, 2, 2) * 2 - 1
    log_sigma = torch.tensor(-1.3)
    nll = reconstruction_nll(mean, x, "gaussian", log_sigma=log_sigma)
    expected = -torch.distributions.Normal(mean, log_sigma.exp()).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(nll, expected)


def test_reconstruction_nll_errors_name_the_problem():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="log_sigma"):
        reconstruction_nll(x, x, "gaussian")
    with pytest.raises(ValueError, match="'laplace'"):
        reconstruction_nll(x, x, "laplace")


def test_elbo_loss_weights_only_the_kl():
    recon, kl = torch.tensor([10.0, 20.0]), torch.tensor([4.0, 6.0])
    torch.testing.assert_close(negative_elbo(recon, kl), torch.tensor([14.0, 26.0]))
    torch.testing.assert_close(negative_elbo(recon, kl, beta=0.5), torch.tensor([12.0, 23.0]))
