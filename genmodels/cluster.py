"""Ray start-up and preflight: one machine with no servers by default, a cluster by configuration.

With RAY_ADDRESS unset, `ensure_ray` starts a private local Ray instance (`address="local"`:
never attach by accident to another Ray on this machine); with it set, the same code connects
to that cluster.
"""

from __future__ import annotations

import logging
import os

import ray


def ensure_ray() -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        # The dashboard serves Ray's state API: without it Train's placement-group cleaner cannot
        # tell a dead controller from a live one (placement groups leak), and `ray job submit` has
        # nothing to talk to.
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)


def preflight(*, num_workers: int, cpus_per_worker: float, use_gpu: bool, what: str = "train") -> None:
    """Refuse within seconds what the cluster cannot place: Ray Train would otherwise wait for
    its placement group, time out and retry forever on a cluster without an autoscaler."""
    need = {"CPU": num_workers * cpus_per_worker}
    if use_gpu:
        need["GPU"] = float(num_workers)
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
    if short:
        raise RuntimeError(
            f"{what}.num_workers={num_workers} x cpus_per_worker={cpus_per_worker}"
            f"{' + 1 GPU each' if use_gpu else ''} needs {need}, but the Ray cluster has "
            f"{ {k: have.get(k, 0.0) for k in need} }; lower {what}.num_workers / {what}.cpus_per_worker"
            f"{f' / {what}.use_gpu' if use_gpu else ''} or add nodes"
        )
