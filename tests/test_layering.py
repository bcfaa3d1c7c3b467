"""The tree's layers: who may import whom, and no import cycles.

client -> contract, common, grpc, protobuf (what `pip install loadagg` brings); server -> anything but the CLI;
scheduler_agent -> of loadagg, exactly the contract and the common module; common -> the standard library only.
Every import counts, also one inside a function (a lazy import still needs the package at run time).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("loadagg", "scheduler_agent")
STDLIB = set(sys.stdlib_module_names)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(root: Path, name: str) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imports_of(root: Path, path: Path) -> set[str]:
    """Every module `path` imports (a `from package import module` counts as the module)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    this = module_name(root, path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = this.split(".")[: len(this.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(root, candidate) else base)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            graph[module_name(root, path)] = imports_of(root, path)
    return graph


def _within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imported in graph.items():
        ours = {m for m in imported if _within(m, *PACKAGES)}
        foreign = {m.split(".")[0] for m in imported - ours} - STDLIB
        if _within(module, "loadagg.client"):
            bad = {m for m in ours if not _within(m, "loadagg.client", "loadagg.v1", "loadagg.common")}
            bad |= foreign - {"grpc", "google"}
        elif _within(module, "loadagg.server"):
            bad = {m for m in ours if _within(m, "loadagg.cli", "scheduler_agent")}
        elif _within(module, "scheduler_agent"):
            bad = {m for m in ours if _within(m, "loadagg") and not _within(m, "loadagg.v1", "loadagg.common")}
        elif module == "loadagg.common":
            bad = ours | (foreign - {"uvloop"})  # uvloop: used when installed, imported inside run()
        elif module in ("loadagg", "loadagg.v1", "loadagg.server"):  # imported by everything below them: light
            bad = {m for m in ours if not _within(m, "loadagg.v1", "loadagg.common")}
            bad |= foreign - {"google", "grpc"}
        else:
            bad = set()
        problems += [f"{module} imports {m}" for m in sorted(bad)]
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's members, found as the strongly connected components (Tarjan) with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_each_layer_imports_only_what_it_may():
    assert layering_violations(import_graph(ROOT)) == []


def test_no_import_cycles():
    assert import_cycles(import_graph(ROOT)) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


_CLEAN = {
    "loadagg/__init__.py": "",
    "loadagg/common.py": "import os\n",
    "loadagg/v1/__init__.py": "",
    "loadagg/v1/loadagg_pb2.py": "",
    "loadagg/client/__init__.py": "from loadagg.client.load_client import LoadClient\n",
    "loadagg/client/load_client.py": "import grpc\nfrom loadagg.v1 import loadagg_pb2\nfrom loadagg import common\n",
    "loadagg/server/__init__.py": "",
    "loadagg/server/errors.py": "import grpc\n",
    "loadagg/cli/__init__.py": "",
    "loadagg/cli/commands.py": "from loadagg.server import errors\n",
    "scheduler_agent/__init__.py": "from loadagg.v1 import loadagg_pb2\nfrom loadagg.common import env\n",
}


@pytest.mark.parametrize("name, text, said", [
    ("loadagg/client/load_client.py", "def f():\n    from loadagg.server.errors import X\n",
     "loadagg.client.load_client imports loadagg.server.errors"),
    ("loadagg/client/load_client.py", "import aiohttp\n", "loadagg.client.load_client imports aiohttp"),
    ("loadagg/server/errors.py", "from loadagg.cli import commands\n",
     "loadagg.server.errors imports loadagg.cli.commands"),
    ("scheduler_agent/__init__.py", "from loadagg.server import errors\n",
     "scheduler_agent imports loadagg.server.errors"),
    ("loadagg/common.py", "import grpc\n", "loadagg.common imports grpc"),
])
def test_the_layering_check_fails_on_a_forbidden_import(tmp_path, name, text, said):
    root = _write(tmp_path, _CLEAN)
    assert layering_violations(import_graph(root)) == []
    (root / name).write_text(text)
    assert said in layering_violations(import_graph(root))


def test_the_cycle_check_fails_on_a_cycle(tmp_path):
    root = _write(tmp_path, _CLEAN)
    assert import_cycles(import_graph(root)) == []
    (root / "loadagg/server/errors.py").write_text("def f():\n    from loadagg.cli.commands import main\n")
    assert import_cycles(import_graph(root)) == [["loadagg.cli.commands", "loadagg.server.errors"]]
