"""One state bundle per checkpoint, written by `bundle_dir`, restored by one `load_latest`.

Layout of a checkpoint directory (Ray merges what every rank reports into one directory):
    state.pt           rank 0: every module/optimizer state by name, global step, epoch, the
                       resolved job config, the MLflow run id, the metrics reported with it, and
                       the metric points the tracking server has not taken yet (an outage:
                       `genmodels.tracking.RunLogger`), which the resumed run sends first
    rng_rank<R>.pt     each rank: its torch (and CUDA) RNG state, so a resumed run draws the
                       same noise it would have drawn had it never stopped
    weights_rank<R>.sha256   each rank: a digest of its module weights and of the EMA model's
                       buffers; the driver checks that all ranks agree (DDP keeps them
                       identical; a mismatch means a broken step)
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class StartFrom:
    """A checkpoint that a new run starts from (PBT: a paused trial's own, or the donor's on an
    exploit), handed to the workers by value through Ray's object store, so that no worker opens
    a path on the driver's disk."""

    files: dict[str, bytes]
    may_differ: tuple[str, ...]
    """Config keys (dotted, as in `load_bundle`) the new run may have changed."""
    label: str
    """Where it comes from, for people (recorded as an MLflow tag)."""
    reseed: int | None = None
    """None: continue the checkpoint's noise streams (its RNG files). Else drop them and seed
    rank r with reseed + r: an exploiting trial must not replay its donor's noise."""

    @classmethod
    def from_directory(cls, directory: Path, *, may_differ: tuple[str, ...], label: str, reseed: int | None = None) -> "StartFrom":
        keep = (STATE_FILE, "weights_rank") if reseed is not None else (STATE_FILE, "weights_rank", "rng_rank")
        files = {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.name.startswith(keep)}
        if STATE_FILE not in files:
            raise FileNotFoundError(f"{directory}: no {STATE_FILE} (not a genmodels checkpoint)")
        return cls(files=files, may_differ=may_differ, label=label, reseed=reseed)

    def load(self, objects: dict[str, object], *, rank: int, config: dict) -> dict:
        with tempfile.TemporaryDirectory(prefix="genmodels-start-") as tmp:
            for name, data in self.files.items():
                (Path(tmp) / name).write_bytes(data)
            restored = load_bundle(Path(tmp), objects, rank=rank, config=config, may_differ=self.may_differ)
        if self.reseed is not None:
            torch.manual_seed(self.reseed + rank)
        return restored


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


@contextmanager
def bundle_dir(objects: dict[str, object], *, rank: int, step: int, epoch: int, config: dict, run_id: str,
               metrics: dict[str, float] | None = None, unsent_metrics: list[tuple] = ()) -> Iterator[Path]:
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
            torch.save({"objects": state, "step": step, "epoch": epoch, "config": config, "mlflow_run_id": run_id,
                        "metrics": dict(metrics or {}), "unsent_metrics": [tuple(p) for p in unsent_metrics]},
                       path / STATE_FILE)
        yield path


def load_latest(checkpoint, objects: dict[str, object], *, rank: int, config: dict) -> dict:
    """Restore `objects` and this rank's RNG in place from Ray's latest checkpoint
    (`ray.train.get_checkpoint()`, None for a fresh run); returns the bundle's metadata, whose
    "step" is the step to continue from (0 for a fresh run)."""
    if checkpoint is None:
        return {"step": 0, "epoch": 0, "mlflow_run_id": None, "metrics": {}, "unsent_metrics": []}
    with checkpoint.as_directory() as directory:
        return load_bundle(Path(directory), objects, rank=rank, config=config)


def load_bundle(directory: Path, objects: dict[str, object], *, rank: int, config: dict, may_differ: tuple[str, ...] = ()) -> dict:
    """Restore `objects` in place from a checkpoint directory; returns the bundle's metadata.

    Refuses a checkpoint whose resolved config differs from this run's: a run name is a promise
    that the steps before and after the restart belong to the same experiment. `may_differ` names
    config keys (dotted, e.g. "gan.lr_g") that are allowed to differ: PBT continues a donor's
    checkpoint under mutated optimiser settings. Then an optimizer keeps the hyperparameters it
    was built with (this run's config); its state (moments, step counts) comes from the checkpoint.
    """
    bundle = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if _without(bundle["config"], may_differ) != _without(config, may_differ):
        changed = config_changes(_without(bundle["config"], may_differ), _without(config, may_differ))
        raise ValueError(
            f"checkpoint {directory} was written with a different config (changed: {', '.join(changed)}); "
            "pick another train.run_name, or delete that run's directory under train.storage_path to start over"
        )
    missing = sorted(set(objects) - set(bundle["objects"]))
    if missing:
        raise ValueError(f"checkpoint {directory} lacks {', '.join(missing)} (written by an older genmodels?); "
                         "pick another train.run_name, or delete that run's directory under train.storage_path to start over")
    for name, obj in objects.items():
        built = [{k: v for k, v in group.items() if k != "params"} for group in getattr(obj, "param_groups", [])]
        obj.load_state_dict(bundle["objects"][name])
        if may_differ:  # a plain resume keeps the saved groups (a scheduled lr, were there one)
            for group, hyper in zip(getattr(obj, "param_groups", []), built):
                group.update(hyper)
    rng_path = directory / _rng_file(rank)
    if rng_path.exists():  # absent when the world size grew: this rank then keeps its fresh seed
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {"step": bundle["step"], "epoch": bundle["epoch"], "mlflow_run_id": bundle["mlflow_run_id"],
            "metrics": bundle.get("metrics", {}), "unsent_metrics": bundle.get("unsent_metrics", [])}


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


def _without(config: dict, keys: tuple[str, ...]) -> dict:
    pruned = copy.deepcopy(config)
    for key in keys:
        *parents, leaf = key.split(".")
        node = pruned
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return pruned


def config_changes(old: dict, new: dict) -> list[str]:
    """["key.path: old -> new", ...] between two nested configs."""
    return sorted(_diff(old, new))


def _diff(old: dict, new: dict, prefix: str = "") -> Iterator[str]:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}: {a!r} -> {b!r}"
