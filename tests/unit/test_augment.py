"""DiffAugment transforms (Zhao et al. 2020): what each keeps, what it changes, and that G's
gradient passes through them."""

import pytest
import torch

from genmodels.augment import POLICIES, diff_augment


def _dots(batch: int = 64) -> torch.Tensor:
    """Background -1 with one bright pixel at the centre of each 28x28 image."""
    x = torch.full((batch, 1, 28, 28), -1.0)
    x[:, :, 14, 14] = 1.0
    return x


def test_the_empty_policy_is_the_identity():
    x = torch.rand(4, 1, 28, 28)
    assert diff_augment(x, ()) is x


def test_translation_moves_each_image_by_at_most_an_eighth_of_its_side_and_differently_per_image():
    torch.manual_seed(0)
    out = diff_augment(_dots(), ["translation"])
    assert out.shape == (64, 1, 28, 28)
    positions = torch.stack([torch.nonzero(img[0] == 1.0)[0] for img in out])  # the dot, still one pixel
    assert ((positions - 14).abs() <= 4).all()
    assert len({tuple(p.tolist()) for p in positions}) > 10
    assert set(out.unique().tolist()) <= {-1.0, 0.0, 1.0}  # the border fills with 0, nothing else changes


def test_cutout_zeroes_one_square_of_half_the_side_per_image_clipped_at_the_border():
    torch.manual_seed(0)
    out = diff_augment(torch.ones(64, 1, 28, 28), ["cutout"])
    zeros = out[:, 0] == 0
    assert (zeros.flatten(1).sum(1) > 0).all() and (zeros.flatten(1).sum(1) <= 14 * 14).all()
    assert (zeros.flatten(1).sum(1) == 14 * 14).any()
    for mask in zeros:  # one axis-aligned rectangle: its bounding box is all zero
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_color_changes_brightness_and_contrast_per_image():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    out = diff_augment(x, ["color"])
    shift = (out - x).mean(dim=(1, 2, 3))
    assert shift.std() > 0.1


@pytest.mark.parametrize("name", POLICIES)
def test_gradients_reach_the_input_through_every_transform(name):
    x = (torch.rand(8, 1, 28, 28) * 2 - 1).requires_grad_(True)
    diff_augment(x, [name]).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_same_seed_draws_the_same_augmentation():
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(5)
    a = diff_augment(x, POLICIES)
    torch.manual_seed(5)
    assert torch.equal(a, diff_augment(x, POLICIES))
