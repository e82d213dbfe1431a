"""The package's folders are its architecture: lower layers never import higher ones, and no modules
import each other in a cycle (checked on the source, imports inside functions included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dar"

# Lowest first: a module may import from its own layer or a lower one.
LAYERS = [
    {"dar", "dar.errors", "dar.provenance", "dar.files", "dar.seeds"},
    {"dar.routing"},
    {"dar.models"},
    {"dar.diffusion"},
    {"dar.data"},
    {"dar.evaluate"},
    {"dar.training"},
    {"dar.generation", "dar.distillation"},
    {"dar.study"},
    {"dar.cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for index, members in enumerate(LAYERS):
            if prefix in members:
                return index
    raise AssertionError(f"{module} belongs to no layer; add its folder to LAYERS")


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("dar")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dar"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} -> {target}" for module, targets in graph().items() for target in targets
              if layer_of(target) > layer_of(module)]
    assert not upward, "upward imports: " + ", ".join(sorted(upward))


def test_no_import_cycles():
    edges = {m: {t for t in ts if not m.startswith(t + ".") and t != "dar"} for m, ts in graph().items()}
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for target in edges[module]:
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("script", sorted((PACKAGE.parent / "benchmarks").glob("*.py"))
                         + sorted((PACKAGE.parent / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_every_script_imports_what_exists(script):
    """Benchmarks and scripts sit outside the package: a moved module must not break them silently."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{script.stem}", script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
