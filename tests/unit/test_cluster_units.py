"""Pure parts of cluster submission: which paths are node-local, what counts as a credential."""

import pytest

from genmodels.cluster import check_not_secret, node_local_paths, shared_roots


def test_node_local_paths_are_those_outside_the_declared_shared_roots(tmp_path):
    shared = tmp_path / "shared"
    (shared / "runs").mkdir(parents=True)
    (tmp_path / "link").symlink_to(shared)
    paths = {"storage": str(tmp_path / "link" / "runs"), "sibling": str(tmp_path / "shared2" / "x"),
             "db": f"sqlite:///{shared}/mlflow.db", "artifacts": f"file://{tmp_path}/mlartifacts", "relative": "ray_results",
             "s3": "s3://bucket/runs", "http": "http://host/shards", "server": "https://mlflow:5000", "databricks": "databricks",
             "unset": None}
    assert node_local_paths(paths, [str(shared)]) == {"sibling": paths["sibling"], "artifacts": paths["artifacts"],
                                                       "relative": "ray_results"}


def test_shared_roots_must_be_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("GENMODELS_SHARED_PATHS", f"{tmp_path}:mnt/nfs")
    with pytest.raises(ValueError, match=r"GENMODELS_SHARED_PATHS: \['mnt/nfs'\] are relative"):
        shared_roots()


@pytest.mark.parametrize("env,command", [({"WANDB_API_KEY": "x"}, []), ({"DB_PASS": "x"}, []), ({"AWS_SECRET_ACCESS_KEY": "x"}, []),
                                         ({}, ["genmodels", "train", "gan", "--shards", "https://user:tok@host/shards"]),
                                         ({"MLFLOW_TRACKING_URI": "http://user:pw@mlflow:5000"}, [])])
def test_credentials_never_go_into_a_job(env, command):
    with pytest.raises(ValueError, match="credential"):
        check_not_secret(env, command)


def test_ordinary_variables_and_urls_go():
    check_not_secret({"TOKENIZERS_PARALLELISM": "false", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
                     ["genmodels", "train", "gan", "--shards", "https://host/shards", "--set", "train.seed=1"])
