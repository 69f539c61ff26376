"""The package's layers (docs/architecture.md): imports point only downward, no import cycles, no private
names imported across modules, and every method in the registry is covered."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sppbench"
# layer of each top-level part of the package; an import may only go to a lower layer or stay inside its own part
# (sppbench.errors, which imports nothing, may be imported from anywhere)
LAYERS = {"errors": 0, "fileio": 0, "configs": 0, "paper_plan": 0, "core": 1, "families": 2, "methods": 3, "tasks": 3, "studies": 4, "report": 5,
          "cli": 6, "__main__": 6, "__init__": 6}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)
        out[name or "__init__"] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(target module, imported name or None, line) for every sppbench import, module level and inside functions."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}  # annotations only: not imported at run time
    is_pkg = path.name == "__init__.py"
    pkg = name.split(".") if is_pkg and name != "__init__" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "sppbench":
                mod = node.module[len("sppbench"):].lstrip(".")
            else:
                continue
            for a in node.names:
                full = f"{mod}.{a.name}" if mod else a.name
                if full in MODULES:
                    yield full, None, node.lineno
                else:
                    yield mod or "__init__", a.name, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "sppbench":
                    yield a.name[len("sppbench"):].lstrip(".") or "__init__", None, node.lineno


def _part(mod: str) -> str:
    return mod.split(".")[0]


def test_imports_point_only_downward():
    bad = []
    for name, path in MODULES.items():
        for target, _, line in _imports(name, path):
            a, b = _part(name), _part(target)
            if a != b and LAYERS[b] >= LAYERS[a] and (a, b) != ("__main__", "cli") and b != "errors":
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({a}, layer {LAYERS[a]}) imports {target} "
                           f"({b}, layer {LAYERS[b]})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_private_names_imported_across_modules():
    bad = [f"{path.relative_to(PKG.parent)}:{line} imports {target}.{n}"
           for name, path in MODULES.items() for target, n, line in _imports(name, path)
           if n and n.startswith("_") and not n.startswith("__") and target != name]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in _imports(name, path) if t != name and t in MODULES}
             for name, path in MODULES.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of the modules themselves
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t == _part(name) and MODULES[t].name == "__init__.py")}
    graph["__init__"] = set()
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for t in graph[n]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif not state.get(t):
                visit(t, stack)
        stack.pop()
        state[n] = 2

    for n in graph:
        if not state.get(n):
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("part", sorted({_part(m) for m in MODULES}))
def test_every_part_has_a_layer(part):
    assert part in LAYERS, f"sppbench/{part} has no layer in tests/test_architecture.py and docs/architecture.md"


def test_one_config_loader():
    """Shipped JSON configs are read in one place (sppbench.configs.load_config)."""
    bad = [f"{p.relative_to(PKG.parent)}" for p in PKG.rglob("*.py")
           if p.parent.name != "configs" and 'joinpath("configs"' in p.read_text()]
    assert not bad, f"configs read outside sppbench.configs: {bad}"
