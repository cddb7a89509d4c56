"""dvc.yaml against the code: each stage's code deps are exactly what its command imports, and a
failed stage keeps its previous outputs (`persist: true`).

The import closure is read from the sources (every `import genmodels...`, at any depth, followed
transitively); `genmodels/cli.py` counts with its module-level imports plus those of the
subcommand's own handler (`_<command>`), since the CLI imports each stage lazily.
"""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(tree: ast.AST, package: str = "") -> set[str]:
    """Every genmodels module an AST imports, with the packages Python runs on the way;
    `package` resolves relative imports (genmodels/models uses them: it is bundled under another name)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                assert package, f"relative import of {module!r} outside a known package"
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    names = {n for n in names if n.split(".")[0] == "genmodels" and _module_file(n)}
    return names | {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}


def _cli_imports(command: str) -> set[str]:
    tree = ast.parse((ROOT / "genmodels/cli.py").read_text())
    top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    handler = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == f"_{command}")
    return _imports(top) | _imports(handler)


def import_closure(entry: Path, command: str) -> set[str]:
    """Repository-relative paths of the genmodels files `python <entry>` imports."""
    todo, seen = list(_imports(ast.parse(entry.read_text()))), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        more = _cli_imports(command) if name == "genmodels.cli" else _imports(ast.parse(path.read_text()), package)
        todo.extend(more - seen)
    files = {_module_file(n).relative_to(ROOT).as_posix() for n in seen}
    return files.union(*(USED_BY_PATH.get(f, set()) for f in files))


# Files a module reads by path rather than imports: the register stage logs the model code file.
USED_BY_PATH = {"genmodels/stages/register.py": {"genmodels/tracking/generator_model.py"}}

DVC_FILES = ("dvc.yaml", "tune/dvc.yaml")  # tune/ runs only when asked: `dvc repro tune/dvc.yaml`


def _stages() -> list[tuple[str, dict]]:
    """(name, stage) of every stage, with paths relative to the project root (each file's stages
    run from the root: `wdir: ..` in tune/dvc.yaml)."""
    stages = []
    for file in DVC_FILES:
        for name, stage in yaml.safe_load((ROOT / file).read_text())["stages"].items():
            if "foreach" in stage:
                text = yaml.safe_dump(stage["do"])
                stages += [(f"{file}:{name}@{item}", yaml.safe_load(text.replace("${item}", item))) for item in stage["foreach"]]
            else:
                stages.append((f"{file}:{name}", stage))
    for name, stage in stages:
        root = (ROOT / Path(name.split(":")[0]).parent / stage.get("wdir", ".")).resolve()
        assert root == ROOT, f"{name}: runs in {root}, not the project root: its paths would not match"
    return stages


@pytest.mark.parametrize("name,stage", _stages(), ids=[name for name, _ in _stages()])
def test_code_deps_are_exactly_what_the_stage_imports(name, stage):
    entry = stage["cmd"].split()[1]
    command = Path(entry).stem
    imported = import_closure(ROOT / entry, command)
    code_deps = [d for d in stage["deps"] if d.startswith(("genmodels", "pipelines"))]
    covers = lambda dep, path: path == dep or path.startswith(dep.rstrip("/") + "/")
    missing = sorted(p for p in imported if not any(covers(d, p) for d in code_deps))
    stale = sorted(d for d in code_deps if d != entry and not any(covers(d, p) for p in imported))
    assert entry in code_deps, f"{name}: its own entry point {entry} is not a dep"
    assert not missing, f"{name}: imports {missing}, not in dvc.yaml deps: a change there would not rerun the stage"
    assert not stale, f"{name}: deps {stale} are not imported: a change there reruns the stage for nothing"


@pytest.mark.parametrize("name,stage", _stages(), ids=[name for name, _ in _stages()])
def test_every_output_persists_so_a_failed_run_keeps_the_previous_one(name, stage):
    for kind in ("outs", "metrics", "plots"):
        for out in stage.get(kind, []):
            path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            assert options.get("persist") is True, f"{name}: {kind} {path} lacks persist: true"
