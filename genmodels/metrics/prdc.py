"""Precision, recall, density and coverage of generated features against real ones.

    scores = prdc(real_features, fake_features, k=5)   # {"precision": ..., "recall": ..., ...}

Precision and recall follow Kynkaanniemi et al. 2019 (sec. 2, eq. 1-2): each set's manifold is
the union of balls around its points, of radius the distance to the point's k-th nearest
neighbour within the same set (itself excluded). Density and coverage follow Naeem et al. 2020
(sec. 3, the density and coverage equations), which use only the real manifold and so are less
sensitive to outliers among the fakes. Balls are closed (``<=``, Kynkaanniemi eq. 1); the `prdc`
package uses ``<``, which differs only on exact distance ties.
"""

from __future__ import annotations

import torch

from genmodels.metrics.fid import ArrayLike, _as_float64


def kth_neighbour_radii(points: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """Distance from each point [n, d] to its k-th nearest neighbour in ``points``, itself excluded
    (a duplicate point still counts as a neighbour at distance 0), [n]."""
    radii = []
    for start in range(0, points.shape[0], chunk_size):
        distances = torch.cdist(points[start:start + chunk_size], points)
        rows = torch.arange(distances.shape[0], device=points.device)
        distances[rows, start + rows] = float("inf")
        radii.append(distances.kthvalue(k, dim=1).values)
    return torch.cat(radii)


def prdc(real: ArrayLike, fake: ArrayLike, k: int = 5, chunk_size: int = 1024) -> dict[str, float]:
    """{"precision", "recall", "density", "coverage"} for real [n, d] and fake [m, d] features.

    precision = fraction of fakes inside some real point's k-NN ball;
    recall    = fraction of reals inside some fake point's k-NN ball;
    density   = (1 / (k m)) * sum over fakes of the number of real k-NN balls containing it
                (can exceed 1 when fakes crowd dense real regions);
    coverage  = fraction of reals whose k-NN ball contains at least one fake.
    Distances are Euclidean, float64, computed ``chunk_size`` rows at a time so memory stays
    O(chunk_size * max(n, m)).
    """
    real, fake = _as_float64(real, "real"), _as_float64(fake, "fake")
    fake = fake.to(real.device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be [n, d] with the same d; got {tuple(real.shape)} and {tuple(fake.shape)}")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be in [1, min(n_real, n_fake) - 1] so each point has k other neighbours; "
                         f"got k={k}, n_real={real.shape[0]}, n_fake={fake.shape[0]}")
    real_radii = kth_neighbour_radii(real, k, chunk_size)
    fake_radii = kth_neighbour_radii(fake, k, chunk_size)

    num_in_real_balls = []  # per fake: how many real balls contain it
    for start in range(0, fake.shape[0], chunk_size):
        inside = torch.cdist(fake[start:start + chunk_size], real) <= real_radii
        num_in_real_balls.append(inside.sum(1))
    num_in_real_balls = torch.cat(num_in_real_balls).to(torch.float64)

    in_fake_manifold, nearest_fake = [], []  # per real
    for start in range(0, real.shape[0], chunk_size):
        distances = torch.cdist(real[start:start + chunk_size], fake)
        in_fake_manifold.append((distances <= fake_radii).any(1))
        nearest_fake.append(distances.min(1).values)
    in_fake_manifold, nearest_fake = torch.cat(in_fake_manifold), torch.cat(nearest_fake)

    return {
        "precision": float((num_in_real_balls > 0).to(torch.float64).mean()),
        "recall": float(in_fake_manifold.to(torch.float64).mean()),
        "density": float(num_in_real_balls.mean() / k),
        "coverage": float((nearest_fake <= real_radii).to(torch.float64).mean()),
    }


def equal_size(real: ArrayLike, fake: ArrayLike, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, fake) with the larger set subsampled, without replacement and with a fixed seed, to
    the size of the smaller: k-NN radii shrink as a set grows, so PRDC of unequal sets mixes
    two scales (Naeem et al. 2020 use equal numbers of real and fake samples)."""
    real, fake = _as_float64(real, "real"), _as_float64(fake, "fake")
    size = min(real.shape[0], fake.shape[0])
    generator = torch.Generator().manual_seed(seed)
    pick = lambda x: x if x.shape[0] == size else x[torch.randperm(x.shape[0], generator=generator)[:size].to(x.device)]
    return pick(real), pick(fake)
