"""Imports point one way: serve -> engine -> executor -> models -> distributed / kernels. A
module may import its own package and lower layers, never a higher one (function-level
imports included: they are dependencies too)."""
from __future__ import annotations

import ast
from pathlib import Path

import raylm

ROOT = Path(raylm.__file__).parent
REPO = ROOT.parent
# rank of each first-level part of raylm; a module imports only ranks <= its own
RANKS = {"config": 0, "registry": 0, "outputs": 0, "sampling_params": 0, "exceptions": 0,
         "logger": 0, "kernels": 0,
         "distributed": 1, "attention": 1, "dp": 1, "options": 1, "structured": 1,
         "models": 2, "executor": 3, "engine": 4,
         "llm": 5, "serve": 6, "deployments": 6, "bench": 7, "cli": 8, "__init__": 8,
         "__main__": 8}
SOURCES = {"kernels": REPO / "kernels", "deployments": REPO / "deployments"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        yield path.relative_to(ROOT).parts[0].removesuffix(".py"), path
    for part, folder in SOURCES.items():
        for path in sorted(folder.glob("*.py")):
            yield part, path


def _imported_parts(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module
                 and node.level == 0 else [])
        for name in names:
            if name.startswith("raylm."):
                yield name.split(".")[1], node.lineno


def test_every_part_of_raylm_has_a_layer():
    assert {part for part, _ in _modules()} <= set(RANKS)


def test_no_module_imports_a_higher_layer():
    upward = [f"{path.relative_to(REPO)}:{line} ({part}) imports raylm.{other}"
              for part, path in _modules() for other, line in _imported_parts(path)
              if RANKS.get(other, 99) > RANKS[part]]
    assert not upward, "\n".join(upward)


def _env_reads(path: Path):
    """Lines that read the environment: os.environ.get / [...] / `in`, os.getenv."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "getenv":
            yield node.lineno
        elif isinstance(node, ast.Attribute) and node.attr == "get" and _is_environ(node.value):
            yield node.lineno
        elif isinstance(node, ast.Subscript) and _is_environ(node.value) \
                and isinstance(node.ctx, ast.Load):
            yield node.lineno
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            yield node.lineno


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def test_env_vars_are_read_in_config_only():
    readers = [f"{path.relative_to(REPO)}:{line}" for _, path in _modules()
               if path != ROOT / "config.py" for line in _env_reads(path)]
    assert readers == []
    assert list(_env_reads(ROOT / "config.py"))  # the check sees config.py's own reads
