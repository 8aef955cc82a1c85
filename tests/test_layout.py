"""The layout rule, checked on the code so that it stays true.

* ``xrayfed.common`` holds what two or more roles use and imports no role: no module of
  ``common/`` imports ``xrayfed.server`` or ``xrayfed.client`` — except the command-line entry
  point (``xrayfed.common.cli``), which registers the roles' ``commands`` modules.
* A ``common/`` module that only one role uses (directly, or through other ``common/`` modules)
  belongs in that role's folder; the exceptions are listed in :data:`ONE_ROLE` with the reason.
* ``xrayfed.server`` (the operator, the crypto provider) and ``xrayfed.client`` (the edges:
  hospital, patient) never import each other — except the modules that simulate a whole
  federation on one machine, listed in :data:`SIMULATES_A_FEDERATION`, which run the hospitals'
  code in the server's process.
* No import cycle between project modules (imports inside functions count too).
* ``xrayfed --help`` imports no heavy library (torch, flwr, crypten, opacus).

Every allow-list entry must still be needed: an entry that no longer matches the code fails too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"common": "xrayfed.common", "server": "xrayfed.server", "client": "xrayfed.client"}
ENTRY_POINT = "xrayfed.common.cli"
ROLES = ("server", "client")

#: Server modules that may import client modules: they run every hospital of a federation on
#: one machine.
SIMULATES_A_FEDERATION = {
    "xrayfed.server.simulate": "the in-process simulation (benchmarks, sweeps) trains each hospital with the "
                               "hospital's own training code, in this process",
    "xrayfed.server.flower_simulation": "`xrayfed simulate` runs the hospitals' ClientApp on Flower's Simulation "
                                        "Engine, next to the ServerApp",
}

#: ``common/`` modules that only one role uses, and why they are still in ``common/``.
ONE_ROLE: dict[str, str] = {}

#: ``common/`` modules no role imports (by an import statement), and who uses them.
NOT_IMPORTED = {
    "xrayfed.common.mpc.preload": "the worker pool's fork server (common/mpc/pool.py) imports it by name, in the "
                                  "hospital's inference service and in the crypto provider",
}


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
    """Project modules ``mod`` imports, anywhere in the file (relative imports resolved). A
    package that loads its submodules on first use (PEP 562: the keys of a module-level ``_API``
    dict, as in ``common/mpc/__init__.py``) imports them."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body if is_pkg else ():
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "_API" for t in node.targets)):
            out |= {f"{mod}.{k.value}" for k in node.value.keys
                    if isinstance(k, ast.Constant) and f"{mod}.{k.value}" in mods}
    for node in ast.walk(tree):
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


def _role(mod: str) -> str:
    return mod.split(".")[1]


def _roles_using(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``{common module: the roles that use it}``: a role's module imports it, or imports a
    ``common`` module that uses it (the entry point passes nothing on: it registers every role)."""
    importers: dict[str, set[str]] = {}
    for m, ts in graph.items():
        for t in ts:
            importers.setdefault(t, set()).add(m)
    used = {m: {_role(s) for s in importers.get(m, ()) if _role(s) in ROLES}
            for m in graph if _role(m) == "common"}
    changed = True
    while changed:
        changed = False
        for m, roles in used.items():
            for s in importers.get(m, ()):
                if s in used and s != ENTRY_POINT and not used[s] <= roles:
                    roles |= used[s]
                    changed = True
    return used


def _cross_role(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports between ``server`` and ``client`` (either way)."""
    return sorted((m, t) for m, ts in graph.items() for t in ts
                  if _role(m) in ROLES and _role(t) in ROLES and _role(m) != _role(t))


def test_common_imports_no_role():
    graph = _graph()
    assert len(graph) > 30  # the walk found the project
    up = sorted((m, t) for m, ts in graph.items() for t in ts
                if m.startswith("xrayfed.common") and m != ENTRY_POINT and not t.startswith("xrayfed.common"))
    assert not up, f"common/ imports a role: {up}"


def test_server_and_client_import_each_other_only_to_simulate_a_federation():
    cross = _cross_role(_graph())
    bad = [(m, t) for m, t in cross if m not in SIMULATES_A_FEDERATION]
    assert not bad, (f"server/ and client/ import each other: {bad}; move what both use to common/ (or, for a "
                     "module that runs a whole federation on one machine, list it in SIMULATES_A_FEDERATION)")
    stale = sorted(set(SIMULATES_A_FEDERATION) - {m for m, _ in cross})
    assert not stale, f"SIMULATES_A_FEDERATION lists modules that import no other role (remove them): {stale}"


def test_common_holds_what_two_roles_use():
    mods = _modules()
    used = _roles_using(_graph())
    assert used["xrayfed.common.config"] == set(ROLES)  # the walk sees both roles
    one = {m: sorted(r) for m, r in used.items() if len(r) == 1}
    bad = {m: r for m, r in one.items() if m not in ONE_ROLE}
    assert not bad, (f"common/ modules that only one role uses (move each to that role's folder, or list it in "
                     f"ONE_ROLE with the reason): {bad}")
    none = sorted(m for m, r in used.items() if not r and m != ENTRY_POINT and mods[m].name != "__init__.py")
    assert none == sorted(NOT_IMPORTED), (f"common/ modules no role imports: {none}; NOT_IMPORTED lists "
                                          f"{sorted(NOT_IMPORTED)} (a module nothing uses goes; one used by name is "
                                          "listed with who uses it)")
    stale = sorted(m for m in ONE_ROLE if len(used.get(m, ())) != 1)
    assert not stale, f"ONE_ROLE lists modules that are gone or used by two roles (remove them): {stale}"


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
    """The checker itself can fail: a planted upward import, a planted cycle, a planted import
    between the roles and a planted one-role ``common`` module are found."""
    mods = {"xrayfed.common.a": tmp_path / "a.py", "xrayfed.common.b": tmp_path / "b.py",
            "xrayfed.server.s": tmp_path / "s.py"}
    mods["xrayfed.common.a"].write_text("def f():\n    from xrayfed.server import s\n    from . import b\n")
    mods["xrayfed.common.b"].write_text("import xrayfed.common.a\n")
    mods["xrayfed.server.s"].write_text("")
    a = _imports("xrayfed.common.a", mods["xrayfed.common.a"], mods)
    assert a == {"xrayfed.server.s", "xrayfed.common.b"}
    assert _imports("xrayfed.common.b", mods["xrayfed.common.b"], mods) == {"xrayfed.common.a"}

    (tmp_path / "lazy").mkdir()
    init = tmp_path / "lazy" / "__init__.py"
    init.write_text('_API = {"part": ("f",), "missing": ("g",)}\n')
    assert _imports("xrayfed.common.lazy", init, {"xrayfed.common.lazy": init,
                                                  "xrayfed.common.lazy.part": tmp_path / "x.py"}) == {
        "xrayfed.common.lazy.part"}

    graph = {"xrayfed.server.s": {"xrayfed.common.via", "xrayfed.client.c"},
             "xrayfed.client.c": {"xrayfed.common.shared"},
             "xrayfed.common.via": {"xrayfed.common.deep", "xrayfed.common.shared"},
             "xrayfed.common.deep": set(), "xrayfed.common.shared": set(),
             ENTRY_POINT: {"xrayfed.client.c", "xrayfed.common.via"}}
    assert _roles_using(graph) == {"xrayfed.common.via": {"server"}, "xrayfed.common.deep": {"server"},
                                   "xrayfed.common.shared": {"server", "client"}, ENTRY_POINT: set()}
    assert _cross_role(graph) == [("xrayfed.server.s", "xrayfed.client.c")]


def test_every_package_is_installed():
    """A sub-package missing from pyproject.toml works in the editable install and breaks a real
    one (the Docker images): every folder with an __init__.py is listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join([PACKAGES[folder], *init.parent.relative_to(ROOT / folder).parts])
             for folder in PACKAGES for init in (ROOT / folder).rglob("__init__.py")}
    assert found == listed
