"""FID from statistics: our Cholesky + eigvalsh Frechet distance vs the classic scipy sqrtm formula, side by side.

    .venv/bin/python bench/fid.py [--dims 2048 128] [--num-samples 5000] [--repeats 3] [--threads 1]

For each feature dimension d: two random SPD covariances sigma = A A^T / n from A [d, n] (n =
``--num-samples``, as if fitted to n features) and random means. Times
``genmodels.metrics.fid.frechet_distance`` against pytorch-fid's formula (``scipy.linalg.sqrtm``
of sigma1 @ sigma2, real part kept), prints the median over repeats, the speed ratio and the
relative difference of the two FIDs. A cell stops repeating once it has used ``--cell-budget-s``
(d = 2048 takes seconds per call on one core). Also reports the images/s of
``genmodels.metrics.features.extract_features`` (the domain CNN, random weights).

Both libraries run ``--threads`` BLAS/OpenMP threads (default 1): on a 2-core machine shared with
a test run, two spin-waiting OpenMP threads per process made a 512 x 512 eigh 100x slower
(0.05 s -> 7 s), so multi-threaded timings there measure the scheduler, not the algorithm.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from genmodels.metrics.features import DomainClassifier, Extractor, extract_features
from genmodels.metrics.fid import frechet_distance


def scipy_frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance, without its eps-offset retry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def timed(fn, repeats: int, budget_s: float) -> tuple[float, float, int]:
    """(result, median seconds, number of runs): at least one run, at most ``repeats``."""
    times = []
    while len(times) < repeats and sum(times) < budget_s:
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times), len(times)


def random_gaussian(dim: int, num_samples: int, scale: float, generator: torch.Generator):
    a = torch.randn(dim, num_samples, generator=generator, dtype=torch.float64) * scale
    return torch.randn(dim, generator=generator, dtype=torch.float64) * 0.1, a @ a.T / num_samples


def bench_fid(dims: list[int], num_samples: int, repeats: int, budget_s: float) -> None:
    print(f"{'d':>6} {'ours s':>9} {'runs':>4} {'scipy s':>9} {'runs':>4} {'scipy/ours':>10} "
          f"{'FID ours':>14} {'rel diff':>9}")
    generator = torch.Generator().manual_seed(0)
    for dim in dims:
        mu1, sigma1 = random_gaussian(dim, num_samples, 1.0, generator)
        mu2, sigma2 = random_gaussian(dim, num_samples, 1.2, generator)
        numpy_args = [t.numpy() for t in (mu1, sigma1, mu2, sigma2)]
        ours, ours_s, ours_runs = timed(lambda: frechet_distance(mu1, sigma1, mu2, sigma2), repeats, budget_s)
        ref, ref_s, ref_runs = timed(lambda: scipy_frechet_distance(*numpy_args), repeats, budget_s)
        print(f"{dim:>6} {ours_s:>9.3f} {ours_runs:>4} {ref_s:>9.3f} {ref_runs:>4} {ref_s / ours_s:>10.2f} "
              f"{ours:>14.6f} {abs(ours - ref) / abs(ref):>9.1e}", flush=True)


def bench_features(num_images: int, repeats: int, budget_s: float) -> None:
    images = torch.rand(num_images, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # Throughput does not depend on the weights: an untrained classifier, no featurizer files needed.
    model = DomainClassifier(channels=1, num_classes=10).eval()
    extractor = Extractor(name="domain-cnn-random", weights_sha256="", resize_rule="none", dim=128,
                          features=torch.no_grad()(model.features))
    _, seconds, runs = timed(lambda: extract_features(extractor, images), repeats, budget_s)
    print(f"feature extraction: {num_images / seconds:,.0f} images/s (domain CNN, random weights, "
          f"{num_images} images of 1x28x28, median of {runs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 128])
    parser.add_argument("--num-samples", type=int, default=5000, help="n in sigma = A A^T / n")
    parser.add_argument("--repeats", type=int, default=3, help="most runs per cell; the median is reported")
    parser.add_argument("--cell-budget-s", type=float, default=10.0, help="stop repeating a cell after this long")
    parser.add_argument("--num-images", type=int, default=2000, help="images for the feature-extraction row")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for torch and scipy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        print(f"torch {torch.__version__}, scipy {scipy.__version__}, {args.threads} thread(s), float64")
        bench_fid(args.dims, args.num_samples, args.repeats, args.cell_budget_s)
        bench_features(args.num_images, args.repeats, args.cell_budget_s)


if __name__ == "__main__":
    main()
