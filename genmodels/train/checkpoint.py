"""One state bundle per checkpoint, written by `bundle_dir`, restored by one `load_latest`.

Layout of a checkpoint directory (Ray merges what every rank reports into one directory):
    state.pt           rank 0: every module/optimizer state by name, global step, epoch, the
                       resolved job config and the MLflow run id
    rng_rank<R>.pt     each rank: its torch (and CUDA) RNG state, so a resumed run draws the
                       same noise it would have drawn had it never stopped
    weights_rank<R>.sha256   each rank: a digest of its module weights and of the EMA model's
                       buffers; the driver checks that all ranks agree (DDP keeps them
                       identical; a mismatch means a broken step)
"""

from __future__ import annotations

import hashlib
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

STATE_FILE = "state.pt"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


@contextmanager
def bundle_dir(objects: dict[str, object], *, rank: int, step: int, epoch: int, config: dict, run_id: str) -> Iterator[Path]:
    """A temporary directory holding this rank's share of the checkpoint at `step`."""
    with tempfile.TemporaryDirectory(prefix="genmodels-ckpt-") as tmp:
        path = Path(tmp)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():  # this rank's own device only: the others belong to other ranks
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, path / _rng_file(rank))
        (path / f"weights_rank{rank}.sha256").write_text(weights_digest(objects))
        if rank == 0:
            state = {name: obj.state_dict() for name, obj in objects.items()}
            torch.save({"objects": state, "step": step, "epoch": epoch, "config": config, "mlflow_run_id": run_id},
                       path / STATE_FILE)
        yield path


def load_latest(checkpoint, objects: dict[str, object], *, rank: int, config: dict) -> int:
    """Restore `objects` and this rank's RNG in place from Ray's latest checkpoint
    (`ray.train.get_checkpoint()`, None for a fresh run); returns the step to continue from."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        return load_bundle(Path(directory), objects, rank=rank, config=config)["step"]


def load_bundle(directory: Path, objects: dict[str, object], *, rank: int, config: dict) -> dict:
    """Restore `objects` in place from a checkpoint directory; returns the bundle's metadata.

    Refuses a checkpoint whose resolved config differs from this run's: a run name is a promise
    that the steps before and after the restart belong to the same experiment.
    """
    bundle = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if bundle["config"] != config:
        changed = sorted(_diff(bundle["config"], config))
        raise ValueError(
            f"checkpoint {directory} was written with a different config (changed: {', '.join(changed)}); "
            "pick another train.run_name, or delete that run's directory under train.storage_path to start over"
        )
    missing = sorted(set(objects) - set(bundle["objects"]))
    if missing:
        raise ValueError(f"checkpoint {directory} lacks {', '.join(missing)} (written by an older genmodels?); "
                         "pick another train.run_name, or delete that run's directory under train.storage_path to start over")
    for name, obj in objects.items():
        obj.load_state_dict(bundle["objects"][name])
    rng_path = directory / _rng_file(rank)
    if rng_path.exists():  # absent when the world size grew: this rank then keeps its fresh seed
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {k: bundle[k] for k in ("step", "epoch", "mlflow_run_id")}


def read_exported(directory: Path) -> dict:
    """The final bundle, after checking that every rank reported the same weights."""
    digests = {p.name: p.read_text() for p in sorted(directory.glob("weights_rank*.sha256"))}
    if len(set(digests.values())) > 1:
        raise RuntimeError(f"checkpoint {directory}: ranks hold different weights ({digests}); DDP did not keep them in sync")
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)


def weights_digest(objects: dict[str, object], *, with_buffers: tuple[str, ...] = ("ema",)) -> str:
    """sha256 over every parameter of the modules in `objects`, plus the buffers of those named in
    `with_buffers`: the EMA model's standing BatchNorm statistics must agree across ranks. The
    live models' buffers are left out: their BatchNorm running stats legitimately differ between
    ranks (each updates them from its own batch; rank 0's are what is saved)."""
    h = hashlib.sha256()
    for name, obj in sorted(objects.items()):
        if isinstance(obj, torch.nn.Module):
            tensors = dict(obj.named_parameters())
            if name in with_buffers:
                tensors.update(obj.named_buffers())
            for key, tensor in sorted(tensors.items()):
                h.update(f"{name}.{key}".encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _diff(old: dict, new: dict, prefix: str = "") -> Iterator[str]:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}: {a!r} -> {b!r}"
