"""The house's dependency rules: imports run one way, the core knows nothing of Ray or the
command line, the tuner never imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("simdiffrec", "tuner")
FACE = "simdiffrec.cli"


def imports_of(path: Path, package: str) -> set[str]:
    """Every module (top-level or inside a function) a file imports, made absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            if node.module:
                found.add(f"{base}.{node.module}".lstrip("."))
            if node.level:
                found.update(f"{base}.{n.name}" for n in node.names)
        elif isinstance(node, ast.Import):
            found.update(n.name for n in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {f"{p}.{f.stem}": f for p in PACKAGES for f in (ROOT / p).glob("*.py")}
    return {name: {m for m in imports_of(path, name.split(".")[0]) if m in modules} | {
        m for m in imports_of(path, name.split(".")[0]) if m.split(".")[0] in ("ray", "optuna")}
        for name, path in modules.items()}


def test_no_import_circles():
    deps = graph()

    def visit(module: str, path: list[str]) -> None:
        for dep in deps.get(module, ()):
            assert dep not in path, "import circle: " + " -> ".join(path[path.index(dep):] + [dep])
            visit(dep, path + [dep])

    for module in deps:
        visit(module, [module])


def test_core_knows_nothing_of_ray_or_the_command_line_and_the_tuner_not_of_the_face():
    for module, deps in graph().items():
        if module == FACE:
            continue
        assert FACE not in deps, f"{module} imports the command line"
        if module.startswith("simdiffrec."):
            assert not {d for d in deps if d.split(".")[0] in ("tuner", "ray", "optuna")}, module


def test_the_search_and_the_experiment_readers_do_not_pull_in_the_training_core():
    deps = graph()
    for module in ("tuner.search", "tuner.experiment", "tuner.protocol", "tuner.status", "tuner.report"):
        reached, todo = set(), [module]
        while todo:
            for dep in deps.get(todo.pop(), set()) - reached:
                reached.add(dep)
                todo.append(dep)
        assert not reached & {"simdiffrec.train", "simdiffrec.model", "tuner.trainable"}, module
