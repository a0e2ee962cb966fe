"""The packages stand in layers, read from the source's own imports (every `import`, at module level or inside a
function, is an edge: a lazy import is still a dependency).

    armorm_cli                                       the `armorm` dispatcher: imported by nothing
    conversion                                       builds checkpoints (and runs an evaluation in `armorm build`)
    evaluation, annotation    serving, vllm_armorm   score checkpoints on data, annotate data / serve them
    armorm_io                                        the files every command reads and writes
    modeling_armorm                                  the model and its scoring path: torch and transformers only

A package imports only the floors below it and itself; no module imports a private name of another; no two modules
import each other, directly or through others. `test_the_checker_fails_on_planted_bugs` shows each rule firing.
"""

import ast
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

# package → the folder that holds it (vllm_armorm is installed from serving/, see setup.cfg).
PACKAGES = {
    "modeling_armorm": "modeling_armorm",
    "armorm_io": "armorm_io",
    "evaluation": "evaluation",
    "annotation": "annotation",
    "conversion": "conversion",
    "serving": "serving",
    "vllm_armorm": "serving/vllm_armorm",
    "armorm_cli": "armorm_cli",
}
# What each package may import of the project, besides itself.
ALLOWED = {
    "modeling_armorm": set(),
    "armorm_io": {"modeling_armorm"},
    "evaluation": {"modeling_armorm", "armorm_io"},
    # Beside `evaluation`: it scores data sets with a checkpoint, through vLLM too (`--backend vllm`).
    "annotation": {"modeling_armorm", "armorm_io", "vllm_armorm"},
    "conversion": {"modeling_armorm", "armorm_io", "evaluation"},
    "vllm_armorm": {"modeling_armorm"},
    "serving": {"modeling_armorm", "vllm_armorm"},
    "armorm_cli": {"modeling_armorm", "armorm_io", "evaluation", "annotation", "conversion", "serving"},
}
# Code that uses the packages as a user does: it may import any package but the dispatcher.
CLIENTS = ("examples", "benchmarks", "metrics")
# The model package's third-party imports: torch and transformers, and what transformers itself renders and reports
# with (jinja2 for chat templates, tqdm for progress bars); matplotlib only inside the function that draws a chart.
MODEL_THIRD_PARTY = {"torch", "transformers", "jinja2", "tqdm"}
MODEL_LAZY_THIRD_PARTY = {"matplotlib"}
# Copied next to every checkpoint (remote code): torch, transformers and each other only.
REMOTE_CODE = {"modeling_armorm.configuration_armorm", "modeling_armorm.modeling_armorm", "modeling_armorm.heads"}


def modules(root: Path) -> dict[str, Path]:
    """Every module of the packages under `root`, by its import name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((root / folder).glob("**/*.py")):
            relative = path.relative_to(root / folder).with_suffix("")
            if package == "serving" and relative.parts[0] == "vllm_armorm":
                continue  # installed as the package `vllm_armorm`
            parts = [package, *relative.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(path: Path, name: str) -> list[tuple[str, list[str], bool]]:
    """(module imported, names taken from it, at module level?) for every import of the file `path` (module `name`)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], id(node) in top_level))
    return found


def project_target(imported: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The project modules an import statement reaches (`from pkg import mod` reaches `pkg.mod`)."""
    targets = [f"{imported}.{n}" for n in names if f"{imported}.{n}" in known]
    if imported in known and len(targets) < len(names) or (imported in known and not names):
        targets.append(imported)
    return targets


def package_of(module: str) -> str:
    return module.split(".")[0]


def violations(root: Path) -> list[str]:
    """Every broken rule of the layering under `root`, one line each."""
    known = modules(root)
    problems, graph = [], {name: set() for name in known}
    for name, path in known.items():
        package = package_of(name)
        for imported, names, top in imports(path, name):
            top_name = imported.split(".")[0]
            targets = project_target(imported, names, known)
            for target in targets:
                graph[name].add(target)
                other = package_of(target)
                if other != package and other not in ALLOWED[package]:
                    problems.append(f"{name} imports {target}: `{package}` may not import `{other}`")
                if other != package or target != name:
                    private = [n for n in names if n.startswith("_") and target == imported and target != name]
                    problems += [f"{name} imports the private name {target}.{n}" for n in private]
            if package == "modeling_armorm" and not targets and top_name not in PACKAGES:
                stdlib = top_name in sys.stdlib_module_names
                allowed = MODEL_THIRD_PARTY | (set() if top else MODEL_LAZY_THIRD_PARTY)
                if not stdlib and top_name not in allowed and imported:
                    problems.append(f"{name} imports {imported}: the model package imports torch and transformers")
            if name in REMOTE_CODE:
                outside = [t for t in targets if t not in REMOTE_CODE]
                problems += [
                    f"{name} (remote code) imports {t}: copy it next to the checkpoint or drop it" for t in outside
                ]
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    for client in CLIENTS:
        for path in sorted((root / client).glob("**/*.py")):
            for imported, _, _ in imports(path, client):
                if package_of(imported) == "armorm_cli":
                    problems.append(f"{path.relative_to(root)} imports the dispatcher `{imported}`")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_packages_stand_in_layers():
    assert violations(ROOT) == []


def test_every_package_is_seen():
    """The checker reads the real tree: every package has modules, and the known edges are there."""
    known = modules(ROOT)
    for package in PACKAGES:
        assert any(package_of(name) == package for name in known), package
    edges = {
        (n, t) for n, p in known.items() for i, names, _ in imports(p, n) for t in project_target(i, names, known)
    }
    assert ("conversion.build", "evaluation.evaluate") in edges
    assert ("vllm_armorm.model", "modeling_armorm.heads") in edges or ("vllm_armorm.model", "modeling_armorm") in edges


@pytest.mark.parametrize(
    "file, line, expected",
    [
        ("modeling_armorm/heads.py", "import datasets", "the model package imports torch and transformers"),
        ("modeling_armorm/heads.py", "from conversion import fit", "`modeling_armorm` may not import `conversion`"),
        ("modeling_armorm/modeling_armorm.py", "from .scoring import ROLES", "(remote code) imports"),
        ("serving/serve.py", "from conversion.fit import ALPHAS", "`serving` may not import `conversion`"),
        ("evaluation/evaluate.py", "from conversion import fit", "`evaluation` may not import `conversion`"),
        ("conversion/fit.py", "from armorm_cli.cli import COMMANDS", "may not import `armorm_cli`"),
        ("examples/demo.py", "from armorm_cli.cli import main", "imports the dispatcher"),
        (
            "conversion/gate.py",
            "from conversion.fit import _private",
            "imports the private name conversion.fit._private",
        ),
        ("armorm_io/files.py", "from armorm_io.reports import write_report", "import cycle"),
    ],
)
def test_the_checker_fails_on_planted_bugs(tmp_path, file, line, expected):
    """Each rule fires on a tree that breaks it: a copy of the packages with one import added."""
    for folder in {*PACKAGES.values(), *CLIENTS}:
        for path in (ROOT / folder).glob("**/*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    planted = tmp_path / file
    planted.write_text(planted.read_text() + f"\n{line}\n")
    found = violations(tmp_path)
    assert any(expected in problem for problem in found), found
