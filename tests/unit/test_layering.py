"""The rooms of `genmodels/` import only downwards, and only the family files know families."""

import ast
import re

import pytest

from tests.unit.test_dvc_yaml import ROOT, _imports

PURE_METRICS_MAY_NOT_IMPORT = ("genmodels.train", "genmodels.tracking", "genmodels.files", "genmodels.stages",
                               "genmodels.cluster", "genmodels.cli")


@pytest.mark.parametrize("path", sorted((ROOT / "genmodels/metrics").glob("*.py")), ids=lambda p: p.name)
def test_metrics_import_no_stage_tracking_or_training_room(path):
    imported = _imports(ast.parse(path.read_text()))
    assert not [m for m in imported if m.startswith(PURE_METRICS_MAY_NOT_IMPORT)], imported


@pytest.mark.parametrize("path", sorted((ROOT / "genmodels/train").glob("*.py")), ids=lambda p: p.name)
def test_training_does_not_import_the_stages(path):
    assert not [m for m in _imports(ast.parse(path.read_text())) if m.startswith("genmodels.stages")]


def test_only_the_family_files_ask_which_family():
    asking = re.compile(r"family\s*==|family\s*!=|family\s+in\s*\(|== *[\"'](gan|vae)[\"']")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "genmodels").rglob("*.py"))
             if "families" not in p.parts
             for n, line in enumerate(p.read_text().splitlines(), 1) if asking.search(line)]
    assert not found, found


@pytest.mark.parametrize("path", sorted((ROOT / "genmodels/models").glob("*.py")), ids=lambda p: p.name)
def test_model_files_import_only_torch_and_each_other(path):
    """The registered MLflow model carries genmodels/models under another package name: an absolute
    `genmodels` import there would fail (or load this repository's code) in a consumer."""
    tree = ast.parse(path.read_text())
    absolute = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    absolute |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert {m.split(".")[0] for m in absolute} <= {"torch", "dataclasses", "typing", "math", "__future__"}, absolute


def test_the_registered_model_code_imports_no_genmodels():
    tree = ast.parse((ROOT / "genmodels/tracking/generator_model.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [m for m in imported if m.split(".")[0] == "genmodels"], imported
