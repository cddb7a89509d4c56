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
