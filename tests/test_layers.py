"""The layering rules, checked on the source.

- no import cycles among kvchat modules: imports inside functions and under
  `if TYPE_CHECKING:` count too (a cycle hidden in a function or in annotations is
  still a cycle between the modules);
- core modules import neither kvchat.cli nor kvchat.ui;
- kvchat.cli and kvchat.ui reach engines only through the application layer
  (kvchat.app): they never import kvchat.engine, kvchat.speculative,
  kvchat.speculative_engine or kvchat.remote;
- only the kvchat.engine package imports llama_cpp;
- hardware is probed in one module (psutil for the machine, pynvml for GPUs);
- llama.cpp's log is parsed in one module (kvchat.llama_log);
- every third-party module kvchat imports is a declared dependency (an extra's
  only where that extra's command imports it);
- the server (kvchat.serve) reaches engines only through kvchat.app, and only the
  CLI imports it.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvchat"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _import_nodes(path: Path, *, runtime_only: bool = False) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in `path`, at any depth (imports inside functions count:
    a cycle hidden in a function is still a cycle); `runtime_only` leaves out those
    under `if TYPE_CHECKING:`, which the type checker alone reads."""
    skip = _type_checking_lines(path) if runtime_only else set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in skip:
            yield node


def _names(node: ast.Import | ast.ImportFrom, path: Path, module: str) -> Iterator[str]:
    """The absolute module names one import statement may load."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = node.module or ""
    if node.level:
        parent = package.split(".")
        base = ".".join(parent[: len(parent) - node.level + 1] + ([base] if base else []))
    yield base
    for alias in node.names:  # `from kvchat import config` imports kvchat.config
        yield f"{base}.{alias.name}"


def _imports(path: Path, module: str, *, runtime_only: bool = False) -> set[str]:
    nodes = _import_nodes(path, runtime_only=runtime_only)
    return {name for node in nodes for name in _names(node, path, module)}


def _type_checking_lines(path: Path) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks (imports for the type checker only)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _graph() -> dict[str, set[str]]:
    """kvchat module -> the kvchat modules it imports, TYPE_CHECKING imports included."""
    modules = _modules()
    return {
        name: {i for i in _imports(path, name) if i in modules and i != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """The shortest cycle through the first module of `component` (a strongly connected
    component), as the chain of imports to print: a -> b -> ... -> a."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first from `start` until an import leads back to it
        reached = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    reached.append(w)
        frontier = reached
    raise AssertionError(f"{component} is not a strongly connected component")


def _without_package_links(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ registering its submodules is not a cycle of layers.
    return {name: {t for t in targets if not name.startswith(t + ".") and not t.startswith(name + ".")}
            for name, targets in graph.items()}


def test_no_import_cycles() -> None:
    graph = _without_package_links(_graph())
    cycles = [f"{', '.join(component)} (e.g. {' -> '.join(_cycle_path(graph, component))})"
              for component in _cycles(graph)]
    assert cycles == [], "import cycles (TYPE_CHECKING imports count):\n" + "\n".join(cycles)


def test_the_cycle_check_sees_type_checking_imports(tmp_path: Path) -> None:
    """A cycle closed only by an `if TYPE_CHECKING:` import is found and printed."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                  "    from pkg.c import C\n")
    (package / "c.py").write_text("def f() -> None:\n    import pkg.a\n")
    graph = {f"pkg.{p.stem}": {i for i in _imports(p, f"pkg.{p.stem}") if i.startswith("pkg.")}
             for p in package.glob("*.py")}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert _cycle_path(graph, ["pkg.a", "pkg.b", "pkg.c"]) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def _is_core(module: str) -> bool:
    return not module.startswith(("kvchat.cli", "kvchat.ui")) and module not in ("kvchat.__main__",)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if _is_core(m)))
def test_core_modules_import_neither_cli_nor_ui(module: str) -> None:
    path = _modules()[module]
    imported = _imports(path, module, runtime_only=True)
    bad = sorted(i for i in imported if i.startswith(("kvchat.cli", "kvchat.ui")))
    assert bad == [], f"{module} imports {bad}"


# The engines and what wraps them: the CLI and the REPL ask kvchat.app instead.
_ENGINE_MODULES = ("kvchat.engine", "kvchat.speculative", "kvchat.speculative_engine", "kvchat.remote")


@pytest.mark.parametrize("module", sorted(m for m in _modules() if not _is_core(m)))
def test_cli_and_ui_reach_engines_only_through_the_app(module: str) -> None:
    modules = _modules()
    imported = _imports(modules[module], module) & modules.keys()
    bad = sorted(i for i in imported if any(i == m or i.startswith(m + ".") for m in _ENGINE_MODULES))
    assert bad == [], f"{module} imports {bad}: call a function of kvchat.app instead"


def _importers_of(prefix: str) -> set[str]:
    return {
        name for name, path in _modules().items()
        if any(i == prefix or i.startswith(prefix + ".") for i in _imports(path, name))
    }


def test_only_the_engine_imports_llama_cpp() -> None:
    importers = _importers_of("llama_cpp")
    assert "kvchat.engine" in importers
    assert all(name == "kvchat.engine" or name.startswith("kvchat.engine.") for name in importers), importers


def test_hardware_is_probed_in_one_module() -> None:
    assert _importers_of("pynvml") == {"kvchat.hardware"}
    assert _importers_of("psutil") <= {"kvchat.hardware", "kvchat.monitor"}
    readers = {name for name, path in _modules().items()
               if "/proc/meminfo" in path.read_text(encoding="utf-8")}
    assert readers == {"kvchat.hardware"}


def test_llama_log_is_parsed_in_one_module() -> None:
    phrases = ("buffer size =", "layers to GPU", "flash_attn +=")
    parsers = {
        name for name, path in _modules().items()
        if any(re.search(re.escape(p), path.read_text(encoding="utf-8")) for p in phrases)
    }
    assert parsers == {"kvchat.llama_log"}


# --- dependencies tell the truth ---------------------------------------------------------


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-")
            for r in requirements}


def _declared(extra: str | None = None) -> set[str]:
    """The core dependencies, or those of one extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return _requirement_names(project["optional-dependencies"][extra] if extra else project["dependencies"])


# Extras and the modules allowed to import them, only inside functions where they are
# CLI modules (so that `kvchat --help` never imports them).
_EXTRA_IMPORTERS = {"serve": {"kvchat.serve.server", "kvchat.cli.serve"}}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the kvchat modules importing it at run time."""
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, set[str]] = {}
    for name, path in _modules().items():
        for node in _import_nodes(path, runtime_only=True):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for root in (r.split(".")[0] for r in roots):
                if root and root != "kvchat" and root not in stdlib:
                    found.setdefault(root, set()).add(name)
    return found


def test_every_third_party_import_is_a_declared_dependency() -> None:
    distributions = packages_distributions()
    declared = _declared()
    # tomli only on Python < 3.11, where it replaces tomllib (declared with a marker).
    undeclared = {}
    for module, importers in _third_party_imports().items():
        if module == "tomli":
            continue
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        if dists & declared:
            continue
        extras = [e for e, allowed in _EXTRA_IMPORTERS.items()
                  if dists & _declared(e) and importers <= allowed]
        if not extras:
            undeclared[module] = (sorted(dists), sorted(importers))
    assert undeclared == {}, f"imported but not declared in pyproject dependencies: {undeclared}"


def test_extras_are_imported_by_their_command_only_when_it_runs() -> None:
    """`kvchat --help` stays fast: a CLI module imports an extra inside its command."""
    for extra, allowed in _EXTRA_IMPORTERS.items():
        roots = {d.replace("-", "_") for d in _declared(extra)}
        for module in (m for m in allowed if m.startswith("kvchat.cli")):
            tree = ast.parse(_modules()[module].read_text(encoding="utf-8"))
            top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
            names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
            names |= {(n.module or "") for n in top if isinstance(n, ast.ImportFrom)}
            assert not names & (roots | {"kvchat.serve", "kvchat.serve.server"}), (extra, module)


def test_the_server_reaches_engines_only_through_the_application_layer() -> None:
    for name, path in _modules().items():
        imported = _imports(path, name)
        if name.startswith("kvchat.serve"):
            bad = sorted(i for i in imported if i.split(".")[:2] in (
                ["kvchat", "engine"], ["kvchat", "speculative"], ["kvchat", "remote"], ["kvchat", "cli"],
                ["kvchat", "ui"]) or i.startswith("llama_cpp"))
            assert bad == [], f"{name} imports {bad}"
        elif not name.startswith("kvchat.cli"):
            assert not any(i.startswith("kvchat.serve") for i in imported), f"{name} imports kvchat.serve"
