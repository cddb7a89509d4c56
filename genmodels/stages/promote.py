"""Promotion and rollback of registered generators.

    decision = promote(params, "gan", version=None, margin=0.0, dry_run=False)   # candidate vs champion
    decision = rollback(params, "gan")            # champion back to the version it replaced

`champion` moves only when the candidate beats it on the family's gate metric (GAN FID lower,
VAE ELBO higher) by more than `margin` (in the metric's units, >= 0), measured under the same
evaluation protocol, or when there is no champion yet. A non-finite metric (a diverged model)
is never promoted, and any finite one beats it. Every move holds the registry's
promotion lock and adds one audit entry (`genmodels.tracking.registry`).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from genmodels.config import Params
from genmodels.families import get_family
from genmodels.metrics.protocol import SIGNATURE_KEYS, check_comparable


class PromotionRefused(ValueError):
    """The two versions cannot be compared, or a version lacks what the gate reads."""


@dataclass(frozen=True)
class Decision:
    name: str
    action: str  # "promoted", "kept", "already champion", "rolled back" (dry run: what would happen)
    moved: bool
    to_version: str
    from_version: str | None
    message: str


def promote(params: Params, family: str, *, version: int | None = None, margin: float = 0.0, dry_run: bool = False,
            project_dir: str | Path = ".", say=print) -> Decision:
    from genmodels.tracking.registry import CANDIDATE, CHAMPION, aliases, move_alias, promotion_lock, who

    if not math.isfinite(margin) or margin < 0:
        raise PromotionRefused(f"--margin: expected a finite number >= 0 (the improvement required), got {margin}")
    spec = get_family(family)
    name, client, uri = _registered(params, family, project_dir)
    with promotion_lock(client, name, on_wait=say) if not dry_run else contextlib.nullcontext():
        current = aliases(client, name)
        target = str(version) if version is not None else current.get(CANDIDATE)
        if target is None:
            raise PromotionRefused(f"{name} has no {CANDIDATE} alias; name a version with --version")
        candidate = _version(client, name, target)
        value = _gate_value(candidate, spec.gate_metric)
        if value is not None and not math.isfinite(value):
            raise PromotionRefused(f"{name} v{target}: {spec.gate_metric} is {value}: a diverged model is never promoted")
        previous = current.get(CHAMPION)
        text = f"{name}: {spec.gate_metric} of v{target} {_shown(value)}"
        if previous == target:
            return Decision(name, "already champion", False, target, target, f"{text}: already the {CHAMPION}")
        best = None
        if previous is None:
            passed, text = True, f"{text}, no {CHAMPION} yet"
        else:
            champion = _version(client, name, previous)
            _check_same_protocol(candidate, champion, target, previous)
            best = _gate_value(champion, spec.gate_metric)
            if value is None or best is None:
                raise PromotionRefused(f"{name} v{target if value is None else previous} has no eval.{spec.gate_metric} "
                                       f"tag: it cannot be gated")
            passed = _beats(value, best, spec.gate_mode, margin)
            text += (f" vs {CHAMPION} v{previous} {_shown(best)} ({'lower' if spec.gate_mode == 'min' else 'higher'} "
                     f"is better, margin {margin:g})")
        if not passed:
            return Decision(name, "kept", False, target, previous,
                            f"{text}: kept v{previous} as {CHAMPION}" + (" (dry run)" if dry_run else ""))
        if dry_run:
            return Decision(name, "promoted", False, target, previous, f"{text}: would promote v{target} (dry run)")
        move_alias(client, name, CHAMPION, target, entry={
            "action": "promote", "from_version": previous, "metric": spec.gate_metric, "margin": margin,
            "to_metric": value, "from_metric": best, **who(project_dir)})
        return Decision(name, "promoted", True, target, previous,
                        f"{text}: promoted, {CHAMPION} v{previous or '-'} -> v{target} ({uri})")


def _beats(value: float, best: float, mode: str, margin: float) -> bool:
    """Better by more than `margin`; any finite value beats a non-finite (diverged) champion."""
    if not math.isfinite(best):
        return True
    return value < best - margin if mode == "min" else value > best + margin


def rollback(params: Params, family: str, *, dry_run: bool = False, project_dir: str | Path = ".", say=print) -> Decision:
    """`champion` back to the version its current version replaced, per the audit trail."""
    from genmodels.tracking.registry import CHAMPION, aliases, audit_trail, champion_history, move_alias, promotion_lock, who

    spec = get_family(family)
    name, client, _ = _registered(params, family, project_dir)
    with promotion_lock(client, name, on_wait=say) if not dry_run else contextlib.nullcontext():
        current = aliases(client, name).get(CHAMPION)
        history = champion_history(audit_trail(client, name))
        if not history or history[-1] != current:
            raise PromotionRefused(f"{name}: {CHAMPION} is v{current} but the audit trail leaves v{history[-1] if history else '-'}: "
                                   f"it was moved outside genmodels; set it back or promote explicitly")
        if len(history) < 2:
            raise PromotionRefused(f"{name}: nothing to roll back to, v{current} is the first {CHAMPION} in the audit trail")
        target = history[-2]
        values = [_gate_value(_version(client, name, v), spec.gate_metric) for v in (current, target)]
        text = (f"{name}: {CHAMPION} v{current} ({spec.gate_metric} {_shown(values[0])}) -> v{target} "
                f"({spec.gate_metric} {_shown(values[1])})")
        if dry_run:
            return Decision(name, "rolled back", False, target, current, f"{text}: would roll back (dry run)")
        move_alias(client, name, CHAMPION, target, entry={
            "action": "rollback", "from_version": current, "metric": spec.gate_metric, "from_metric": values[0],
            "to_metric": values[1], **who(project_dir)})
        return Decision(name, "rolled back", True, target, current, f"{text}: rolled back")


def _registered(params: Params, family: str, project_dir):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from genmodels.tracking import resolve_tracking

    name, uri = params.registry.name(family), resolve_tracking(Path(project_dir)).uri
    client = MlflowClient(uri)
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise PromotionRefused(f"no registered model {name!r} in {uri}: run `genmodels register {family}` first") from None
    return name, client, uri


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise PromotionRefused(f"{name} has no version {version!r}") from None


def _gate_value(version, metric: str) -> float | None:
    text = version.tags.get(f"eval.{metric}")
    return None if text is None else float(text)


def _check_same_protocol(candidate, champion, candidate_version: str, champion_version: str) -> None:
    from genmodels.metrics.protocol import SignatureMismatch

    def record(version) -> dict:
        return {"signature": {k: json.loads(version.tags.get(f"eval.signature.{k}", "null")) for k in SIGNATURE_KEYS}}

    try:
        check_comparable(record(candidate), record(champion))
    except SignatureMismatch as err:
        raise PromotionRefused(f"v{candidate_version} vs v{champion_version}: {err}") from None


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
