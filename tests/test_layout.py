"""The layout rule, checked on the code so that it stays true.

* ``xrayfed.common`` serves every role and imports none: no module of ``common/`` imports
  ``xrayfed.server`` or ``xrayfed.client`` — except the command-line entry point
  (``xrayfed.common.cli``), which registers the roles' ``commands`` modules.
* No import cycle between project modules (imports inside functions count too).
* ``xrayfed --help`` imports no heavy library (torch, flwr, crypten, opacus).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"common": "xrayfed.common", "server": "xrayfed.server", "client": "xrayfed.client"}
ENTRY_POINT = "xrayfed.common.cli"


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules ``mod`` imports, anywhere in the file (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:  # `import xrayfed.common.x.y` → the deepest project module
                n = n.rpartition(".")[0]
            if n and n != mod and n.startswith("xrayfed."):
                out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_common_imports_no_role():
    graph = _graph()
    assert len(graph) > 30  # the walk found the project
    up = sorted((m, t) for m, ts in graph.items() for t in ts
                if m.startswith("xrayfed.common") and m != ENTRY_POINT and not t.startswith("xrayfed.common"))
    assert not up, f"common/ imports a role: {up}"


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules (re-exports) is not a cycle between modules
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_help_imports_no_heavy_library():
    code = ("import sys; from xrayfed.common.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'flwr', 'crypten', 'opacus', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_clientapp_loads_without_torch():
    """Flower starts a fresh ClientApp process for every message, four per SecAgg+ round; three of
    those stages only exchange keys and shares. Loading the app (and reading a hospital config or
    a round request) must not load torch or Opacus: that took 3–4 s per process on these cores.
    Only the training stage imports them, when it trains."""
    code = ("import sys; import xrayfed.client.client_app, xrayfed.common.config, xrayfed.common.protocol.rounds; "
            "from xrayfed.common.config import HospitalConfig; HospitalConfig.model_validate({'hospital': {'name': 'h'}, "
            "'data': {'path': 'x.npz'}, 'privacy': {'epsilon': 8.0}}); "
            "print(sorted(m for m in ('torch', 'opacus', 'crypten', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    from xrayfed.common import model, modelspec

    assert model.ModelSpec is modelspec.ModelSpec and model.default_model is modelspec.default_model


def test_the_walk_sees_what_it_should(tmp_path):
    """The checker itself can fail: a planted upward import and a planted cycle are found."""
    mods = {"xrayfed.common.a": tmp_path / "a.py", "xrayfed.common.b": tmp_path / "b.py",
            "xrayfed.server.s": tmp_path / "s.py"}
    mods["xrayfed.common.a"].write_text("def f():\n    from xrayfed.server import s\n    from . import b\n")
    mods["xrayfed.common.b"].write_text("import xrayfed.common.a\n")
    mods["xrayfed.server.s"].write_text("")
    a = _imports("xrayfed.common.a", mods["xrayfed.common.a"], mods)
    assert a == {"xrayfed.server.s", "xrayfed.common.b"}
    assert _imports("xrayfed.common.b", mods["xrayfed.common.b"], mods) == {"xrayfed.common.a"}


def test_every_package_is_installed():
    """A sub-package missing from pyproject.toml works in the editable install and breaks a real
    one (the Docker images): every folder with an __init__.py is listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join([PACKAGES[folder], *init.parent.relative_to(ROOT / folder).parts])
             for folder in PACKAGES for init in (ROOT / folder).rglob("__init__.py")}
    assert found == listed
