"""Every registered family through the same tests (diffusers' tester-mixin idea): a new family in
`genmodels.families.FAMILIES` is tested here without a line added. CPU, tiny sizes.

The AMP paths run on CPU: the task takes its `Precision` as an argument, so bf16 autocast and
loss scaling are exercised here although CPU runs ignore `train.amp`.
"""

import json

import pytest
import torch

from genmodels.config import parse_params
from genmodels.families import FAMILIES, get_family, load_exported
from genmodels.train.checkpoint import bundle_dir, load_bundle
from genmodels.train.ddp import Precision

BATCH, IMAGE_SIZE = 8, 28
BF16_SCALED = Precision(torch.bfloat16, "cpu", scaled=True)


def _params(name: str, **family):
    return parse_params({"train": {"seed": 3, name: {"width": 4, "latent_dim": 8, **family}}}).train


def _task(name: str, precision: Precision = Precision(), **family):
    torch.manual_seed(0)
    return get_family(name).build_task(_params(name, **family), image_size=IMAGE_SIZE, channels=1, device=torch.device("cpu"),
                                       world_size=1, precision=precision)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.rand(BATCH, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _parameters(task) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, obj in task.state().items() if isinstance(obj, torch.nn.Module)
            for k, v in obj.named_parameters()}


@pytest.fixture(params=sorted(FAMILIES))
def name(request) -> str:
    return request.param


class TestEveryFamily:
    def test_step_returns_finite_scalars_that_include_the_curve_keys_and_moves_the_weights(self, name):
        task = _task(name)
        before = _parameters(task)
        metrics = task.train_step(_batch(), step=0)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in metrics.values()), metrics
        assert {k.removeprefix("train/") for k in get_family(name).curve_keys} <= set(metrics)
        after = _parameters(task)
        assert any(not torch.equal(before[k], after[k]) for k in before)

    def test_state_round_trip_gives_the_same_next_step(self, name, tmp_path):
        task = _task(name)
        for step in range(2):
            task.train_step(_batch(step), step)
        with bundle_dir(task.state(), rank=0, step=2, epoch=0, config={}, run_id="r") as d:
            for path in d.iterdir():
                (tmp_path / path.name).write_bytes(path.read_bytes())
        expected = task.train_step(_batch(2), 2)
        fresh = _task(name)
        torch.manual_seed(123)  # the bundle must restore the RNG too
        load_bundle(tmp_path, fresh.state(), rank=0, config={})
        got = fresh.train_step(_batch(2), 2)
        assert {k: v.item() for k, v in got.items()} == {k: v.item() for k, v in expected.items()}

    def test_grids_are_images_in_range_and_refreshing_the_ema_draws_no_global_noise(self, name):
        task = _task(name)
        task.train_step(_batch(), 0)
        rng = torch.get_rng_state()
        task.refresh_ema()
        assert torch.equal(torch.get_rng_state(), rng)
        for images in task.sample_grid_images().values():
            assert images.shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE) and images.min() >= -1 and images.max() <= 1

    def test_export_rebuilds_the_same_generator_from_its_typed_config(self, name, tmp_path):
        family, task = get_family(name), _task(name)
        task.train_step(_batch(), 0)
        task.refresh_ema()
        state = task.state()
        torch.save({key: state[source].state_dict() for key, source in family.exported.items()}, tmp_path / "weights.pt")
        config = {"family": name, name: family.params(_params(name)).model_dump(), "image_size": IMAGE_SIZE, "channels": 1}
        (tmp_path / "config.json").write_text(json.dumps(config))
        exported = load_exported(tmp_path)
        z = torch.randn(4, family.latent_dim(exported.params))
        with torch.no_grad():
            torch.testing.assert_close(family.generate(exported.model, z), family.generate(state["ema"], z), rtol=0, atol=0)

    def test_bf16_autocast_with_loss_scaling_trains(self, name):
        task = _task(name, precision=BF16_SCALED)
        for step in range(2):
            metrics = task.train_step(_batch(step), step)
        assert all(torch.isfinite(v) for v in metrics.values()), metrics

    def test_metric_and_mode_say_what_to_optimise(self, name):
        family = get_family(name)
        assert family.metric.startswith("eval/") and family.mode in ("min", "max")


@pytest.mark.parametrize("loss,d_norm", [("bce", "batch"), ("hinge", "batch"), ("wgan-gp", "layer")])
@pytest.mark.parametrize("d_steps", [1, 2])
def test_gan_step_under_bf16_autocast_and_loss_scaling_for_every_loss(loss, d_norm, d_steps):
    task = _task("gan", precision=BF16_SCALED, loss=loss, d_norm=d_norm, d_steps_per_g_step=d_steps)
    for step in range(2):
        metrics = task.train_step(_batch(step), step)
    assert all(torch.isfinite(v) for v in metrics.values()), metrics
    assert task.scaler_d is not task.scaler_g and task.scaler_d.is_enabled()


def test_vae_statistics_come_from_posterior_draws_of_the_attached_training_images():
    task = _task("vae", decoder_norm="batch")
    task.train_step(_batch(), 0)
    task.refresh_ema()  # no images attached: prior draws
    prior = [b.clone() for b in task.ema.buffers()]
    task.standing_images = ((_batch(5) + 1) * 127.5).round().to(torch.uint8)
    rng = torch.get_rng_state()
    task.refresh_ema()
    assert torch.equal(torch.get_rng_state(), rng)
    assert any(not torch.equal(a, b) for a, b in zip(prior, task.ema.buffers()))


def test_the_shipped_vae_decoder_has_no_batchnorm_and_a_config_without_the_key_keeps_its_own(repo_root):
    from genmodels.config import load_params

    def has_batchnorm(task) -> bool:
        return any(isinstance(m, torch.nn.BatchNorm2d) for m in task.ema.modules())

    assert load_params(repo_root / "params.yaml").train.vae.decoder_norm == "none"
    assert not has_batchnorm(_task("vae", decoder_norm="none"))
    assert has_batchnorm(_task("vae"))  # a config.json written before decoder_norm existed rebuilds what it trained
    with pytest.raises(ValueError, match='decoder_norm .batch. is invalid with preset "seed"'):
        _params("vae", preset="seed", decoder_norm="batch")
    with pytest.raises(ValueError, match='prior "flow" needs latent_dim >= 2'):
        _params("vae", prior="flow", latent_dim=1)


def test_gan_augments_what_d_sees_in_the_d_step_and_in_the_g_step():
    task = _task("gan", augment=["cutout"])
    seen = []
    task.D.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    task.train_step(torch.full((BATCH, 1, IMAGE_SIZE, IMAGE_SIZE), -1.0), step=0)
    assert len(seen) == 2  # one D forward per step of each network
    for images in seen:  # real images are all -1: cut-out squares are the only zeros in their half
        assert ((images[:BATCH] == 0).flatten(1).sum(1) > 0).all()


def test_a_vae_with_a_flow_prior_trains_the_prior_under_bf16_autocast():
    task = _task("vae", precision=BF16_SCALED, prior="flow")
    metrics = task.train_step(_batch(), 0)
    assert all(torch.isfinite(v) for v in metrics.values()), metrics
    model = task.model
    assert all(p.grad is not None for p in model.prior.parameters())
    assert not torch.equal(model.prior.nets[0][-1].weight, torch.zeros_like(model.prior.nets[0][-1].weight))
