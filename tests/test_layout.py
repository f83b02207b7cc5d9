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


def _calls(tree: ast.AST) -> list[tuple[ast.Call, str]]:
    """Every call with its dotted name as written (`os.replace`, `path.unlink`, `open`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            found.append((node, ".".join(reversed(parts))))
    return found


WRITERS = {"simdiffrec/files.py",  # the user's files
           "tuner/storage.py", "tuner/recovery.py"}  # Ray's experiment layout, through its file systems
FILE_CHANGES = {"write_text", "write_bytes", "unlink", "rmdir", "rmtree", "copyfile", "copytree", "copy2",
                "open_output_stream", "delete_dir", "delete_dir_contents", "delete_file", "copy_files"}
MODULE_CHANGES = {"os.replace", "os.rename", "os.remove", "os.unlink", "shutil.move", "shutil.copy", "torch.save"}


def test_only_files_py_writes_moves_or_deletes_a_file():
    """Every write goes through simdiffrec/files.py (atomic, one-line errors); Ray's own layout is
    written only where the house says (storage, recovery)."""
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            name = f"{package}/{path.name}"
            if name in WRITERS:
                continue
            for call, dotted in _calls(ast.parse(path.read_text())):
                last = dotted.rsplit(".", 1)[-1]
                mode = next((a.value for a in call.args[1:2] if isinstance(a, ast.Constant)), "r")
                writes = (last in FILE_CHANGES or dotted in MODULE_CHANGES
                          or (dotted == "open" and isinstance(mode, str) and set(mode) & set("wax+"))
                          or (last in ("rename", "move") and len(call.args) == 1 and not call.keywords))
                assert not writes, f"{name}:{call.lineno}: {dotted}(...) changes a file outside simdiffrec/files.py"


def _private_reads(tree: ast.AST) -> set[tuple[str, int]]:
    return {(node.attr, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")}


def test_no_private_ray_attribute_is_read_outside_the_recovery_module():
    """A private attribute the project does not define itself belongs to a library (Ray's
    scheduler state): only tuner/recovery.py reads those, beside the Ray version they were checked
    against (RAY_CHECKED)."""
    ours = set()
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    ours.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    ours.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    ours.add(node.id)
    for path in (ROOT / "tuner").glob("*.py"):
        if path.name == "recovery.py":
            continue
        foreign = sorted((attr, line) for attr, line in _private_reads(ast.parse(path.read_text())) if attr not in ours)
        assert not foreign, f"tuner/{path.name}: reads {foreign} (Ray's private state belongs in tuner/recovery.py)"


def test_every_function_of_the_tuner_fits_on_a_screen():
    """The tuner as thin as Ray's and Optuna's own examples: no function of 40 lines or more."""
    for path in (ROOT / "tuner").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length < 40, f"tuner/{path.name}:{node.lineno}: {node.name} has {length} lines"
