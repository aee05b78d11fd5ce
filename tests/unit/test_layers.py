"""The layers of DESIGN.md, checked: a module imports only from its own layer or below."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "manyproc"

# module pattern -> layer number (DESIGN.md); the first matching pattern wins
LAYERS: list[tuple[str, int]] = [
    ("util", 0), ("_errors", 0), ("_os.*", 1), ("_os", 1),
    ("reduction", 2), ("_bigdata", 2),
    ("connection", 3), ("_auth", 3), ("_wire", 3), ("resource_sharer", 3),
    ("process", 4), ("context", 4), ("_spawn", 4), ("_popen_*", 4), ("forkserver", 4),
    ("queues", 5), ("synchronize", 5), ("sharedctypes", 5), ("heap", 5),
    ("shared_memory", 5), ("resource_tracker", 5), ("managers", 5), ("_manager*", 5),
    ("_proxies", 5), ("_shm*", 5), ("_sem*", 5),
    ("_poolcore", 6), ("_poolcore.*", 6),
    ("_backends", 7), ("_backends.*", 7),
    ("pool", 8), ("futures", 8), ("dummy", 8), ("dummy.*", 8), ("_cli", 8), ("__main__", 8),
    ("_progress", 8), ("_pool*", 8), ("_executor*", 8), ("aio", 8), ("_async*", 8),
    ("__init__", 9),
]


def layer_of(module: str) -> int | None:
    for pattern, layer in LAYERS:
        if fnmatch.fnmatchcase(module, pattern):
            return layer
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def top_level_imports(path: Path, name: str) -> set[str]:
    """manyproc modules imported at module level (not inside functions, not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    package_parts = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("manyproc."):
                        found.add(alias.name[len("manyproc."):])
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package_parts[: len(package_parts) - (node.level - 1)]
                    target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                elif node.module and node.module.startswith("manyproc"):
                    target = node.module[len("manyproc."):] if node.module != "manyproc" else ""
                else:
                    continue
                if node.module is None or target == "":
                    for alias in node.names:
                        found.add(".".join(filter(None, [target, alias.name])))
                else:
                    found.add(target)

    visit(tree.body)
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_module_respects_layers(path: Path) -> None:
    name = module_name(path) if path.name != "__init__.py" or path.parent != PACKAGE else "__init__"
    own = layer_of(name)
    assert own is not None, f"classify manyproc.{name} in tests/unit/test_layers.py LAYERS"
    for imported in top_level_imports(path, name):
        layer = layer_of(imported)
        if layer is None:
            layer = layer_of(imported.split(".")[0])
        assert layer is not None, f"manyproc.{name} imports unclassified manyproc.{imported}"
        assert layer <= own, (f"manyproc.{name} (layer {own}) imports manyproc.{imported} "
                              f"(layer {layer}) at module level: a lower layer never imports "
                              "a higher one")


def test_never_imports_multiprocessing() -> None:
    for path in MODULES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for n in names:
                assert n != "multiprocessing" and not n.startswith("multiprocessing."), path
                assert n != "concurrent.futures.process", path
