import pytest
import torch

from genmodels.metrics.coverage import class_coverage, memorisation


def test_a_collapsed_generator_misses_classes_and_a_faithful_one_does_not():
    real = torch.arange(10).repeat(50)  # 10 classes, 50 each
    collapsed = torch.tensor([3] * 300 + [7] * 200)
    result = class_coverage(collapsed, real, 10)
    assert result["classes_under_half_share"] == 8
    assert result["class_share_tv"] == pytest.approx(0.8)
    assert sum(result["sample_class_share"]) == pytest.approx(1.0) and result["real_class_share"][0] == pytest.approx(0.1)
    faithful = class_coverage(torch.arange(10).repeat(40)[torch.randperm(400)], real, 10)
    assert faithful["classes_under_half_share"] == 0 and faithful["class_share_tv"] == pytest.approx(0.0)


def test_a_class_just_under_half_its_share_counts():
    real = torch.tensor([0] * 50 + [1] * 50)
    assert class_coverage(torch.tensor([0] * 76 + [1] * 24), real, 2)["classes_under_half_share"] == 1
    assert class_coverage(torch.tensor([0] * 75 + [1] * 25), real, 2)["classes_under_half_share"] == 0  # exactly half


def _split_data(seed=0):
    """A 'dataset' of 3,000 points in 16 dimensions: train, val and a further held-out set from one distribution."""
    points = torch.randn(3000, 16, generator=torch.Generator().manual_seed(seed))
    return points[:2000], points[2000:2500], points[2500:]


def test_a_generator_that_returns_training_images_is_flagged():
    train, val, _ = _split_data()
    copies = train[torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:500]]
    result = memorisation(copies, train, val, chunk_size=64)  # several chunks of queries
    assert result["memorised_fraction"] == 1.0
    assert all(distance == 0.0 for _, _, distance in result["closest_pairs"])  # exact distances: a copy is at 0
    for generated, nearest, _ in result["closest_pairs"]:
        assert torch.equal(copies[generated], train[nearest])


def test_copies_are_flagged_when_val_itself_overlaps_train():
    """Over 1% of val duplicated in train puts the threshold at 0: copies are still at or under it."""
    train, val, held_out = _split_data()
    val = torch.cat([train[:50], val[50:]])  # 10% of val are training images
    result = memorisation(torch.cat([train[100:200], held_out[:100]]), train, val)
    assert result["memorisation_threshold"] == 0.0
    assert result["memorised_fraction"] == 0.5


def test_held_out_real_images_are_not_flagged():
    train, val, held_out = _split_data()
    result = memorisation(held_out, train, val)
    assert result["memorised_fraction"] < 0.05  # ~1% by construction (the 1st percentile of val's own distances)
    assert len(result["closest_pairs"]) == 8 and result["memorisation_threshold"] > 0


def test_slightly_perturbed_copies_are_still_flagged():
    train, val, _ = _split_data()
    noisy = train[:500] + 0.01 * torch.randn(500, 16, generator=torch.Generator().manual_seed(2))
    assert memorisation(noisy, train, val)["memorised_fraction"] > 0.95


def test_no_val_images_is_a_clear_error():
    train, _, held_out = _split_data()
    with pytest.raises(ValueError, match="needs train and val images"):
        memorisation(held_out, train, train[:0])
