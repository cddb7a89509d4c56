"""Kernel Inception Distance (Binkowski et al. 2018, sec. 3.3 / appendix D).

    kid_mean, kid_std = kernel_inception_distance(feats_real, feats_gen)

Unlike FID, KID has an unbiased estimator, so values at different sample sizes are comparable.
"""

from __future__ import annotations

import numpy as np
import torch

from genmodels.metrics.fid import ArrayLike, _as_float64


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / d + 1)^3 for all pairs, [n, m]: the cubic kernel Binkowski et al. 2018
    recommend, for which the MMD compares the first three moments of the feature distributions."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 between samples x [m, d] and y [n, d] with ``polynomial_kernel`` (Gretton
    et al. 2012, eq. 3): the within-set means leave out the diagonal k(x_i, x_i)."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k_xy.mean()


def kernel_inception_distance(feats_real: ArrayLike, feats_gen: ArrayLike, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over ``num_subsets`` random subsets, float64.

    Each subset draws ``subset_size`` rows without replacement from each set; ``subset_size`` is
    clipped to min(n_real, n_gen), as in Binkowski et al.'s reference code. ``std`` is the sample
    standard deviation (ddof=1) over subsets (torch-fidelity reports ddof=0: a factor
    sqrt((s - 1) / s) smaller). Deterministic given ``seed``. Papers often report KID x 1000.
    """
    real, gen = _as_float64(feats_real, "feats_real"), _as_float64(feats_gen, "feats_gen")
    gen = gen.to(real.device)
    if real.dim() != 2 or gen.dim() != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f"feats_real and feats_gen must be [n, d] with the same d; got {tuple(real.shape)} "
                         f"and {tuple(gen.shape)}")
    if num_subsets < 2:
        raise ValueError(f"num_subsets must be >= 2 for a standard deviation; got {num_subsets}")
    size = min(subset_size, real.shape[0], gen.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set; got n_real={real.shape[0]}, "
                         f"n_gen={gen.shape[0]}, subset_size={subset_size}")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        real_index = torch.randperm(real.shape[0], generator=generator)[:size].to(real.device)
        gen_index = torch.randperm(gen.shape[0], generator=generator)[:size].to(real.device)
        values.append(float(mmd2_unbiased(real[real_index], gen[gen_index])))
    return float(np.mean(values)), float(np.std(values, ddof=1))
