"""The code's layout holds: layers point down, stages stand beside each other, no import circles,
no private names reached across modules, no re-exports through ``__getattr__``.

Read from the source (ast), so every import counts, those inside functions too.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("gelato", "flows", "workers", "ssl_models")  # each may import only those after it
STAGES = ("workers.ingest", "workers.pretrain", "workers.evaluate", "workers.export", "workers.embed")  # beside each other


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for top in LAYERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours that ``name`` (a module, or a module's attribute) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name)
                if target:
                    out.append((target, None, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:                    # from package import submodule
                    out.append((full, None, node.lineno))
                elif _resolve(node.module):
                    out.append((_resolve(node.module), a.name, node.lineno))
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def _stage(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def test_the_layers_point_down():
    upward = [f"{m}:{line} imports {t}" for m, deps in GRAPH.items() for t, _, line in deps
              if _layer(t) < _layer(m)]
    assert not upward


def test_stages_do_not_import_each_other():
    across = [f"{m}:{line} imports {t}" for m, deps in GRAPH.items() for t, _, line in deps
              if _stage(m) and _stage(t) and _stage(m) != _stage(t)]
    shared_up = [f"{m}:{line} imports {t}" for m, deps in GRAPH.items() for t, _, line in deps
                 if m.startswith("workers.") and not _stage(m) and _stage(t)
                 and m not in ("workers.doctor", "workers.torchrun")]  # a stage of its own; the command's entry
    assert not across and not shared_up


def test_no_import_circles():
    edges = {m: {t for t, _, _ in deps if t != m and not m.startswith(t + ".") and not t == _package(m)}
             for m, deps in GRAPH.items()}
    circles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles


def _package(module: str) -> str:
    return module.rpartition(".")[0]


def test_no_private_names_across_modules_and_no_re_exports():
    private = [f"{m}:{line} imports {t}.{name}" for m, deps in GRAPH.items() for t, name, line in deps
               if name and name.startswith("_") and t != m]
    re_exports = []
    for m, path in MODULES.items():
        # names this module takes from other modules of ours (its own submodules are its to expose)
        borrowed = {name for t, name, _ in GRAPH[m] if name and not t.startswith(m + ".")}
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                re_exports.append(f"{m}: module-level __getattr__")
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                listed = {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
                re_exports += [f"{m}: __all__ re-exports {n}" for n in sorted(listed & borrowed)]
    assert not private and not re_exports


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The checks above could pass by reading nothing: they find what is known to be there."""
    assert ("workers.pretrain.loop", "run_loop") in {(t, n) for t, n, _ in GRAPH["workers.pretrain.torchrun"]}
    assert _layer("gelato.cli") < _layer("workers.config") < _layer("ssl_models.backbones")
    assert len(MODULES) > 60
