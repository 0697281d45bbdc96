"""The folder picture is the architecture: cli -> {query, indexer} -> schemas, read from the source.

Every import statement of every module is parsed with ``ast`` (also those inside functions, which
is where the command line imports the indexer), relative imports resolved against their package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "query", "indexer", "schemas")
# Which of our packages each package may import (itself always).
ALLOWED = {
    "cli": {"query", "indexer", "schemas"},
    "query": {"schemas"},
    "indexer": {"schemas"},
    "schemas": set(),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool = False) -> set[str]:
    """The absolute names of every module ``source`` (the text of ``module``) imports, ``from . import x`` resolved."""
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def _edges():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for target in imported(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py"):
                top = target.split(".")[0]
                if top in PACKAGES and top != pkg:
                    yield pkg, top, path.relative_to(ROOT), target


@pytest.mark.parametrize("pkg", PACKAGES)
def test_each_package_imports_only_the_packages_below_it(pkg):
    wrong = [f"{path} imports {target}" for p, top, path, target in _edges() if p == pkg and top not in ALLOWED[pkg]]
    assert not wrong, wrong


def test_the_command_line_drives_both_halves():
    # The rule above would also hold if cli/ imported nothing: it is the one place both halves meet.
    assert {top for p, top, _, _ in _edges() if p == "cli"} == {"query", "indexer", "schemas"}


def test_the_parser_sees_relative_and_function_level_imports():
    # A guard that cannot see an import proves nothing: these are the forms the tree uses.
    src = "import os, json\nfrom . import output\nfrom ..errors import X\n\ndef f():\n    from indexer.check import check\n"
    assert imported(src, "query.serve.app") == {"os", "json", "query.serve", "query.errors", "indexer.check"}
    assert imported("from .app import x\n", "query.serve", is_package=True) == {"query.serve.app"}
