"""The import graph of the project's own modules: no cycles, and library layers never import
``datasets_def`` (the CLI and the demo load dataset definitions; the library reaches them by name
through :data:`mmm.registry.DATASETS`).

Every ``import`` / ``from ... import`` statement counts, at module level and inside functions
alike (``ast.walk``), except those under ``if TYPE_CHECKING:`` (never run).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmm", "datasets_def", "benchmarks")
MAY_IMPORT_DATASETS = ("mmm.cli", "mmm.demo")


def _modules() -> Dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imported_names(module: str, is_package: bool, tree: ast.AST) -> Iterator[str]:
    """Dotted names each import statement of ``module`` makes Python load (``from pkg import name``
    yields ``pkg.name`` when that is a module, else ``pkg``: resolved by the caller)."""
    skip = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                yield f"{source}.{alias.name}"


def import_graph() -> Dict[str, Set[str]]:
    """Module → the project modules it imports."""
    modules = _modules()

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {resolve(n) for n in _imported_names(module, path.name == "__init__.py", tree)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                out.append(sorted(comp))
    return out


def test_the_graph_sees_module_and_function_level_imports() -> None:
    graph = import_graph()
    assert "mmm.config" in graph["mmm.checkpoint"]  # module level
    assert "mmm.interop.hf" in graph["mmm.modalities.text.modality"]  # inside a method
    assert "mmm.modalities.dna.codec" in graph["mmm.modalities.dna.modality"]  # from package import module
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [c for c in strongly_connected(cyclic) if len(c) > 1] == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not cycles, f"modules importing each other (directly or through others): {cycles}"


def test_library_layers_never_import_dataset_definitions() -> None:
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t == "datasets_def" or t.startswith("datasets_def."))
                 for m, targets in graph.items()
                 if m.startswith("mmm") and not m.startswith(MAY_IMPORT_DATASETS)}
    offenders = {m: t for m, t in offenders.items() if t}
    assert not offenders, f"library modules importing datasets_def (reach datasets by name through DATASETS): {offenders}"


_IMPORT_EACH = """
import importlib, sys
bad = []
for name in sys.argv[1:]:
    for loaded in [k for k in sys.modules if k == "mmm" or k.startswith(("mmm.", "datasets_def"))]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(bad))
"""


def test_every_module_imports_as_the_first_one() -> None:
    """Python runs a package's ``__init__`` before any of its modules, so a package that imports its
    modules eagerly can close a cycle the graph above does not show (``mmm.modalities.text.pipeline`` imports a codec
    of ``mmm.modalities``, whose modalities import ``mmm.modalities.text.pipeline``). Import each library module
    first, in a fresh set of project modules, in one subprocess."""
    import subprocess
    import sys

    names = [m for m in _modules() if not m.startswith("benchmarks")]
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert not out.stdout.strip(), f"modules that fail when imported first:\n{out.stdout}"


def test_downstream_code_never_branches_on_a_modality_name() -> None:
    """``mmm/downstream/`` reads every modality through its ``Modality.downstream_inputs`` adapter, so a plug-in
    modality is served like a built-in one: no comparison with a built-in modality's name may creep back in
    (it used to hold one branch per modality: ``if modality == "image": ...``)."""
    names = {"text", "dna", "image", "audio", "image_text", "regions"}
    found = []
    for path in sorted((ROOT / "mmm" / "downstream").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                consts = [n for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in names]
                found += [f"{path.name}:{n.lineno}: {n.value!r}" for n in consts]
    assert not found, found
