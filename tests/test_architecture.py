"""The tree reads as the data flow: rooms import downstream only, no cycles, no test harness in the package."""

import ast
from collections.abc import Iterator
from pathlib import Path

import networkx as nx

import echoflow
from echoflow.clients.app import app, make_client_app

PACKAGE = Path(echoflow.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.Module, *, top_level_only: bool) -> Iterator[str]:
    nodes = [n for top in tree.body for n in ([top] if not isinstance(top, ast.If | ast.Try) else ast.walk(top))
             ] if top_level_only else list(ast.walk(tree))  # module level includes `if TYPE_CHECKING:` imports
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("echoflow"):
            yield node.module
            for alias in node.names:  # `from echoflow.server import loop` imports a module
                yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("echoflow"))


def graph(*, top_level_only: bool) -> nx.DiGraph:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges = nx.DiGraph()
    edges.add_nodes_from(modules)
    for name, path in modules.items():
        for target in imports(ast.parse(path.read_text()), top_level_only=top_level_only):
            if target in modules and target != name:
                edges.add_edge(name, target)
    return edges


def test_clients_and_server_share_only_the_federation_protocol() -> None:
    edges = graph(top_level_only=False).edges
    crossing = [(a, b) for a, b in edges if (a.startswith("echoflow.server") and b.startswith("echoflow.clients"))
                or (a.startswith("echoflow.clients") and b.startswith("echoflow.server"))]
    assert crossing == []


def test_federation_and_stages_do_not_use_the_study() -> None:
    edges = graph(top_level_only=False).edges
    upward = [(a, b) for a, b in edges if a.startswith(("echoflow.federation", "echoflow.stages", "echoflow.data",
                                                         "echoflow.models", "echoflow.audit"))
              and b.startswith("echoflow.study")]
    assert upward == []


def test_no_import_cycle() -> None:
    assert list(nx.simple_cycles(graph(top_level_only=True))) == []


def test_no_test_harness_ships_in_the_package() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert "pytest" not in set(imports_any(ast.parse(path.read_text()))), path
    assert not (PACKAGE / "browser.py").exists() and not (PACKAGE / "audit" / "synthetic.py").exists()
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 9, top  # packages plus a handful of run-infrastructure modules


def imports_any(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


def test_the_deployed_client_app_has_no_fault_injection() -> None:
    assert app._mods == []
    assert len(make_client_app(faults=True)._mods) == 1
