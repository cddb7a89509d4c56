import pytest

from genmodels.config import ConfigError, Params, load_params, parse_params


def test_shipped_params_yaml_validates(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    assert params.prepare.source == "mnist5k"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"prepare": {"image_size": "large"}}, 'prepare.image_size: expected an integer in [8, 512], got "large"'),
        ({"prepare": {"image_size": 4}}, "prepare.image_size: expected an integer in [8, 512], got 4"),
        ({"prepare": {"image_size": 32.0}}, "prepare.image_size: expected an integer in [8, 512], got 32.0"),
        ({"prepare": {"channels": 2}}, "prepare.channels: expected one of 1, 3, got 2"),
        ({"prepare": {"on_bad_image": "ignore"}}, 'prepare.on_bad_image: expected one of "skip", "fail", got "ignore"'),
        ({"prepare": {"val_fraction": 0.9}}, "prepare.val_fraction: expected a number in [0.0, 0.5], got 0.9"),
        ({"prepare": {"seed": True}}, "prepare.seed: expected an integer >= 0, got true"),
        ({"prepare": {"source": "imagenet"}}, 'prepare.source: expected "mnist5k", "digits" or "folder:PATH", got "imagenet"'),
        ({"prepare": {"source": "folder:"}}, "prepare.source: expected"),
        ({"prepare": {"imgsize": 32}}, "prepare.imgsize: unknown key (expected one of: source, image_size"),
        ({"prepair": {}}, "prepair: unknown key (expected one of: prepare"),
        ({"prepare": 5}, "prepare: expected a mapping, got 5"),
        ({"train": {"vae": {"lr": 0}}}, "train.vae.lr: expected a number in (0, 1], got 0"),  # dvc's train@vae case
    ],
)
def test_bad_values_name_key_value_and_expectation(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_params(raw, source="params.yaml")
    assert f"params.yaml: {message}" in str(err.value)


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_params({"prepare": {"image_size": 1, "channels": 4}})
    assert "prepare.image_size" in str(err.value) and "prepare.channels" in str(err.value)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("prepare:\n  image_size: 28\n")
    assert load_params(path, ["prepare.image_size=32", "prepare.source=digits"]).prepare.image_size == 32
    with pytest.raises(ConfigError, match=r"prepare.image_size: expected an integer in \[8, 512\], got \"big\""):
        load_params(path, ["prepare.image_size=big"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_params(path, ["prepare.image_size"])


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_params(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of stage sections, got list"):
        load_params(listed)


def test_params_are_frozen():
    params = parse_params({})
    with pytest.raises(Exception):
        params.prepare.image_size = 64


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"space": {"gan": {"train.gan.lr": {"uniform": [0.1, 0.2]}}}},
         "tune.space.gan.train.gan.lr: not a train key of the gan family (valid: train.amp,"),
        ({"space": {"gan": {"train.vae.lr": {"choice": [0.1]}}}}, "tune.space.gan.train.vae.lr: not a train key of the gan family"),
        ({"space": {"gpt": {}}}, "tune.space.gpt: unknown family (expected one of: gan, vae)"),
        ({"space": {"gan": {"train.num_workers": {"choice": [1, 2]}}}}, "tune.space.gan.train.num_workers: fixed within a sweep"),
        ({"space": {"gan": {"train.gan.num_steps": {"choice": [10]}}}}, "tune.space.gan.train.gan.num_steps: fixed within a sweep"),
        ({"space": {"gan": {"train.gan.width": {"choice": [8, 2]}}}},
         "tune.space.gan.train.gan.width: choice value 2 is refused by the train schema: train.gan.width: expected an integer in [4, 1024], got 2"),
        ({"space": {"gan": {"train.gan.lr_g": {"uniform": [0.1, 0.2], "choice": [1]}}}},
         "tune.space.gan.train.gan.lr_g: expected exactly one of choice, uniform, loguniform, randint, grid"),
        ({"space": {"gan": {"train.gan.lr_g": {"loguniform": [0.0, 0.1]}}}}, "tune.space.gan.train.gan.lr_g: loguniform: expected a positive low bound"),
        ({"space": {"gan": {"train.gan.lr_g": {"uniform": [0.3, 0.2]}}}}, "tune.space.gan.train.gan.lr_g: uniform: expected [low, high] with low < high"),
        ({"space": {"gan": {"train.gan.lr_g": 0.1}}}, "tune.space.gan.train.gan.lr_g: expected a mapping, got 0.1"),
        ({"search": "optuna", "scheduler": "pbt"}, 'tune: search "optuna" with scheduler "pbt"'),
        ({"search": "optuna", "space": {"gan": {"train.gan.loss": {"grid": ["bce", "hinge"]}}}}, 'tune: search "optuna" cannot use "grid"'),
        ({"metric": "eval/fid"}, "tune: metric and mode go together"),
        ({"searcher": "tpe"}, "tune.searcher: unknown key"),
    ],
)
def test_bad_tune_sections_name_the_key(tune, message):
    with pytest.raises(ConfigError) as err:
        parse_params({"tune": tune}, source="params.yaml")
    assert f"params.yaml: {message}" in str(err.value)


def test_a_valid_space_and_the_pbt_space():
    params = parse_params({"tune": {"space": {"gan": {"train.seed": {"randint": [0, 4]}, "train.gan.loss": {"grid": ["bce", "hinge"]}}}}})
    assert params.tune.space["gan"]["train.seed"].kind == "randint"
    pbt = parse_params({"tune": {"scheduler": "pbt", "space": {"gan": {"train.gan.lr_g": {"loguniform": [0.0001, 0.001]}}, "vae": {}}}})
    assert pbt.tune.space["gan"]["train.gan.lr_g"].extremes() == [0.0001, 0.001]


def test_overlays_merge_over_the_params_file_before_overrides(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  seed: 3\n  gan:\n    lr_g: 0.001\n    width: 8\n")
    (tmp_path / "best.yaml").write_text("train:\n  gan:\n    lr_g: 0.0005\n")
    params = load_params(tmp_path / "params.yaml", ["train.seed=4"], [tmp_path / "best.yaml"])
    assert (params.train.gan.lr_g, params.train.gan.width, params.train.seed) == (0.0005, 8, 4)
    (tmp_path / "bad.yaml").write_text("train:\n  gan:\n    lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"params.yaml \+ .*bad.yaml: train.gan.lr: unknown key"):
        load_params(tmp_path / "params.yaml", overlays=[tmp_path / "bad.yaml"])
    with pytest.raises(ConfigError, match="missing.yaml: params file not found"):
        load_params(tmp_path / "params.yaml", overlays=[tmp_path / "missing.yaml"])
