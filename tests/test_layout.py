"""The package's folders are the pipeline's floors, and imports only run down them."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "onnx_whc"

# Bottom to top. A module may import its own floor and the floors below it, never one above.
FLOORS = [
    ("errors", "progress"),  # leaves every floor may use
    ("graph",),
    ("measure",),
    ("data",),
    ("plan",),
    ("recovery",),
    ("reports",),
    ("settings", "pipeline", "api", "cli", "__init__"),
]


def _floor(module: str) -> int:
    """The floor of `module`, dotted under the package ('graph.load', 'api')."""
    top = module.split(".")[0]
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(f"onnx_whc.{module} is on no floor: add its package to FLOORS")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """The package's own modules that `module` imports (dotted under the package)."""
    here = module.split(".")[:-1]  # the package a module sits in (for '__init__': itself)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "onnx_whc" or node.module.startswith("onnx_whc.")):
                target = node.module[len("onnx_whc."):]
            else:
                continue
            if node.module:
                found.add(target)
            else:  # `from . import x`: x is a module of that package
                found.update(f"{target}.{a.name}".lstrip(".") for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("onnx_whc."):] for a in node.names if a.name.startswith("onnx_whc."))
    return found


def test_every_module_imports_only_its_own_floor_and_those_below():
    modules = _modules()
    tops = {m.split(".")[0] for m in modules}
    upward = []
    for module, path in modules.items():
        for target in _imports(module, path):
            if target.split(".")[0] not in tops:
                continue  # a name, not a module: `from . import __version__`
            if _floor(target) > _floor(module):
                upward.append(f"onnx_whc.{module} imports onnx_whc.{target}")
    assert not upward, "imports that reach a higher floor:\n" + "\n".join(sorted(upward))


def test_every_subpackage_says_what_it_owns():
    for folder in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        assert init.exists(), f"{folder.name}/ has no __init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{folder.name}/__init__.py has no docstring"


@pytest.mark.parametrize("source, floors", [
    ("from ..plan.select import select", ("graph", "plan")),
    ("from onnx_whc.api import prune", ("measure", "settings")),
])
def test_the_check_sees_an_upward_import(tmp_path, source, floors):
    """The check itself: a graph module importing planning, a measure importing the API, both upward."""
    below, above = floors
    path = tmp_path / "probe.py"
    path.write_text(source + "\n")
    targets = _imports(f"{below}.probe", path)
    assert any(_floor(t) > _floor(f"{below}.probe") for t in targets), targets
    assert _floor(above) > _floor(below)
