"""Two checks that FID alone hides: which classes the samples cover, and whether they copy the
training set.

    coverage = class_coverage(sample_classes, real_classes, num_classes)
    memo = memorisation(generated_features, train_features, val_features)

Class coverage: the domain classifier's class histogram of the samples against the real class
histogram, and the number of classes whose share among the samples is under half their real
share, so mode collapse is a number.

Memorisation: the fraction of generated samples whose nearest training image (in the feature
space of the FID) is closer than the 1st percentile of the held-out (val) images' own
nearest-training-image distances. A held-out real image is that close to the training set 1% of
the time by construction; a generator that returns training images is that close almost always.
"""

from __future__ import annotations

import torch

MEMORISATION_PERCENTILE = 1.0


def class_coverage(sample_classes: torch.Tensor, real_classes: torch.Tensor, num_classes: int) -> dict:
    """`sample_classes` and `real_classes`: class indices [n]. Shares sum to 1 over the classes."""
    samples = torch.bincount(sample_classes.long(), minlength=num_classes).double() / max(len(sample_classes), 1)
    real = torch.bincount(real_classes.long(), minlength=num_classes).double() / max(len(real_classes), 1)
    under = int(((samples < real / 2) & (real > 0)).sum())
    return {"classes_under_half_share": under,
            "class_share_tv": float((samples - real).abs().sum() / 2),  # total variation: 0 = same histogram
            "sample_class_share": samples.tolist(), "real_class_share": real.tolist()}


def nearest_distances(queries: torch.Tensor, points: torch.Tensor, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query's nearest point, Euclidean in float64, chunked. Computed
    directly, not through the matrix-product identity, which leaves an exact duplicate ~1e-7
    away instead of 0."""
    points = points.double()
    distances, indices = [], []
    for chunk in queries.double().split(chunk_size):
        nearest = torch.cdist(chunk, points, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
        distances.append(nearest.values)
        indices.append(nearest.indices)
    return torch.cat(distances), torch.cat(indices)


def memorisation(generated: torch.Tensor, train: torch.Tensor, val: torch.Tensor, *, num_pairs: int = 8,
                 chunk_size: int = 1024) -> dict:
    """Features [n, d] of generated, train and val images -> the memorised fraction, the
    threshold, and the `num_pairs` closest (generated index, train index, distance)."""
    if len(val) == 0 or len(train) == 0:
        raise ValueError("the memorisation check needs train and val images")
    val_distances, _ = nearest_distances(val, train, chunk_size)
    threshold = float(torch.quantile(val_distances, MEMORISATION_PERCENTILE / 100))
    distances, nearest = nearest_distances(generated, train, chunk_size)
    closest = distances.argsort()[:num_pairs]
    # `<=`: when over 1% of val has an exact duplicate in train, the threshold is 0 and a copy must still count.
    return {"memorised_fraction": float((distances <= threshold).double().mean()), "memorisation_threshold": threshold,
            "closest_pairs": [(int(i), int(nearest[i]), float(distances[i])) for i in closest]}
