"""Sweep settings checked before anything runs, and PBT's clamp back into the space."""

import pytest

from genmodels.config import parse_params
from genmodels.families import get_family
from genmodels.tune import SweepError, _check_schedule, clamp_to_space


def _check(train=None, **tune):
    params = parse_params({"train": train or {}, "tune": tune})
    spec = get_family("gan")
    _check_schedule(params, spec, tune.get("metric") or spec.metric, 2000)


def test_a_misspelt_metric_is_refused_before_the_sweep_runs():
    with pytest.raises(SweepError, match=r"tune.metric 'eval/FID' is not reported by gan training \(expected one of: eval/fid, train/loss_d"):
        _check(metric="eval/FID", mode="min")


def test_pbt_mutates_only_what_a_checkpoint_survives_of_the_family_swept():
    with pytest.raises(SweepError, match=r"tune.space.gan.train.gan.loss: PBT continues a checkpoint under mutated values.*train.gan.lr_g"):
        _check(scheduler="pbt")  # the default gan space holds `loss`
    # the default vae space (latent_dim) is not the family swept: no error for it
    _check(scheduler="pbt", space={"gan": {"train.gan.lr_g": {"loguniform": [0.0001, 0.001]}}})


@pytest.mark.parametrize(("train", "tune", "message"), [
    ({"eval_every_steps": 0}, {}, "set train.eval_every_steps > 0"),
    ({"eval_every_steps": 500, "checkpoint_every_steps": 300}, {"scheduler": "pbt", "space": {"gan": {}}},
     r"train.eval_every_steps \(500\) must be a multiple of\s+train.checkpoint_every_steps \(300\)"),
    ({}, {"scheduler": "pbt", "perturbation_interval": 700, "space": {"gan": {}}}, r"perturbation_interval \(700\) must be a multiple"),
    ({}, {"grace_period": 5000}, "grace_period 5000 exceeds the per-trial budget of 2000 steps"),
])
def test_schedules_a_sweep_cannot_follow_are_refused(train, tune, message):
    with pytest.raises(SweepError, match=message):
        _check(train, **tune)


def test_clamp_keeps_perturbed_values_inside_the_space():
    bounds = {"train.gan.beta2": ("uniform", [0.99, 0.999]), "train.seed": ("randint", [0, 4]), "train.gan.lr_g": ("loguniform", [1e-4, 1e-3])}
    config = {"train.gan.beta2": 0.999 * 1.2, "train.seed": 3 * 1.2, "train.gan.lr_g": 1e-4 * 0.8, "train.gan.loss": "bce"}
    assert clamp_to_space(config, bounds) == {"train.gan.beta2": 0.999, "train.seed": 3, "train.gan.lr_g": 1e-4, "train.gan.loss": "bce"}
