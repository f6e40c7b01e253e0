"""The structure says what the code does: four layers, imports pointing one way, no import cycle.

layers (nn modules and their arithmetic, no fx) ← matching (tracing, finders) ← passes (expand, collapse,
fold_bn, what they build and swap) ← tools (command line, checkpoints, diagnostics, zoo) ← the package's
top (acfx/__init__.py, acfx.timm). Function-local imports count as imports.
"""
import ast
from pathlib import Path

import acfx

PACKAGE = Path(acfx.__file__).parent
RANK = {"layers": 0, "matching": 1, "passes": 2, "tools": 3}
TOP = 4


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _rank(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1], TOP) if len(parts) > 1 else TOP


def _imports(path: Path) -> set:
    """acfx modules imported by the file, anywhere in it (function bodies included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("acfx"):
                for alias in node.names:  # "from .layers import block" imports a module
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if _is_module(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("acfx"))
    return {f for f in found if f != module}


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_points_down_or_across_a_layer():
    upward = [f"{m} ({_rank(m)}) imports {t} ({_rank(t)})" for m, targets in GRAPH.items() for t in targets
              if _rank(t) > _rank(m)]
    assert not upward, upward


def test_no_import_cycle_function_local_imports_included():
    visiting, done, cycles = [], set(), []

    def visit(module):
        if module in done:
            return
        if module in visiting:
            cycles.append(visiting[visiting.index(module):] + [module])
            return
        visiting.append(module)
        for target in sorted(GRAPH.get(module, ())):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)
    assert not cycles, cycles


def test_each_question_has_one_file_named_for_it():
    """Where are sites found, how is a block built, how is it fused, how is the model rewritten."""
    for path in ("matching/find_sites.py", "matching/find_linear_regions.py", "passes/build_block.py",
                 "layers/fusion.py", "layers/linear_map.py", "passes/region_map.py", "passes/fuse_regions.py",
                 "passes/swap_modules.py", "matching/traced_model.py"):
        assert (PACKAGE / path).exists(), path
