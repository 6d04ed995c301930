"""Package structure: no import cycles (lazy imports count), a lean worker import closure.

The graph is built from the AST of every module, so an import inside a function (the
usual way to hide a cycle) is an edge like any other.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "storystudio"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every storystudio module ``name`` imports, at any depth of its AST."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # the most specific known module: "a.b.c" if it is one, else "a.b", ...
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("storystudio"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("storystudio"):
                continue
            for alias in node.names:  # "from pkg import submodule" imports the submodule
                add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in known else mod)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert len(graph) > 20
    # a function-level import and a relative one are edges too
    assert "storystudio.synthetic.zimage" in graph["storystudio.demo"]
    assert "storystudio.backend.errors" in graph["storystudio.backend.story"]
    # the detector finds a cycle when there is one
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_counting_lazy_imports():
    assert cycles(import_graph()) == []


def _closure(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_worker_import_closure_has_no_synthetic_writer():
    # handler.py's imports (it calls runpod.serverless.start at main(), not at import)
    handler_imports = sorted(
        f"import {n.module}" if isinstance(n, ast.ImportFrom) else f"import {n.names[0].name}"
        for n in ast.parse((ROOT / "handler.py").read_text()).body
        if isinstance(n, (ast.Import, ast.ImportFrom)) and (getattr(n, "module", None) or "") != "__future__"
    )
    assert "import storystudio.distributed.launch" in handler_imports
    # the Worker (or the multi-GPU rank pool) is imported lazily by launch, the engines
    # by the model loaders: import them too, as start-up and the first job do
    code = "\n".join(handler_imports + ["import storystudio.worker",
                                        "import storystudio.distributed.executor",
                                        "import storystudio.models.image_generator",
                                        "import storystudio.models.video_generator"])
    loaded = _closure(code)
    assert "storystudio.worker" in loaded and "storystudio.models.video_generator" in loaded
    assert [m for m in loaded if m.startswith("storystudio.synthetic")] == []


def test_job_schemas_import_no_runner_engine_or_torch():
    loaded = _closure("import storystudio.tasks")
    heavy = ("torch", "storystudio.render", "storystudio.batch", "storystudio.worker", "storystudio.models")
    assert [m for m in loaded if m.split(".")[0] == "torch" or m.startswith(heavy[1:])] == []
