"""Floors: library modules import neither ray nor typer; actors/jobs never import typer."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "swm_ray"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_floor_is_free_of_ray_and_typer():
    library = [p for p in PKG.rglob("*.py") if p.parent.name not in ("actors", "jobs", "commands")
               and p.name != "cli.py"]
    assert library
    for p in library:
        bad = _imports(p) & {"ray", "typer"}
        assert not bad, f"{p.relative_to(PKG)} imports {bad}"


def test_actors_and_jobs_do_not_import_the_cli():
    for sub in ("actors", "jobs"):
        for p in (PKG / sub).glob("*.py"):
            assert "typer" not in _imports(p), f"{p.relative_to(PKG)} imports typer"


def test_config_floor_has_no_torch():
    assert not (_imports(PKG / "config.py") & {"torch", "transformers", "ray", "numpy"})


# -- the import graph of the package ---------------------------------------------------------------------------
ROOT = PKG.parent

# Floors, lowest first: a module imports only from its own floor or below (docs/architecture.md).
FLOORS = [
    ("swm_ray", "swm_ray.errors"),
    ("swm_ray.io",),
    ("swm_ray.config",),
    ("swm_ray.edits",),
    ("swm_ray.compute",),
    ("swm_ray.evaluation",),
    ("swm_ray.plan",),
    ("swm_ray.methods",),
    ("swm_ray.heal",),
    ("swm_ray.recipes",),
    ("swm_ray.actors",),
    ("swm_ray.jobs",),
    ("swm_ray.commands",),
    ("swm_ray.cli",),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def floor_of(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{module} is on no floor: add it to FLOORS"
    return found


def _import_nodes(path: Path):
    """Every import statement of a file, top level or inside functions, as (module, [names], node)."""
    module = _module_name(path) if path.is_relative_to(PKG) else ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name, [a.name for a in node.names], node


def _internal_deps(path: Path) -> set[str]:
    """The swm_ray modules a file imports (a name that is itself a module counts as that module)."""
    deps = set()
    for module, names, _ in _import_nodes(path):
        if module != "swm_ray" and not module.startswith("swm_ray."):
            continue
        subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
        deps |= subs or {module}
        if len(subs) < len(names):
            deps.add(module)
    return deps & set(MODULES)


def import_graph() -> dict[str, set[str]]:
    return {m: _internal_deps(p) - {m} for m, p in MODULES.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_circles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_modules_import_only_their_own_floor_or_below():
    upward = [f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
              for m, deps in sorted(import_graph().items()) for d in sorted(deps) if floor_of(d) > floor_of(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_module_imports_a_private_name_of_another():
    found = []
    for m, p in sorted(MODULES.items()):
        modules_bound = {}
        for module, _names, node in _import_nodes(p):
            if not module.startswith("swm_ray"):
                continue
            for a in node.names:
                full = f"{module}.{a.name}" if isinstance(node, ast.ImportFrom) else a.name
                if full in MODULES:
                    modules_bound[a.asname or a.name.split(".")[-1]] = full
                elif a.name.startswith("_") and not a.name.endswith("__") and module != m:
                    found.append(f"{m} imports {module}.{a.name}")
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in modules_bound and node.attr.startswith("_")):
                found.append(f"{m} uses {modules_bound[node.value.id]}.{node.attr}")
    assert not found, "\n".join(found)


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at import time: definitions, assignments and imports, also inside if/try blocks."""
    names = set()

    def scan(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(x.id for t in targets for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                scan(node.body)
                scan(getattr(node, "orelse", []))
                scan(getattr(node, "finalbody", []))
                for h in getattr(node, "handlers", []):
                    scan(h.body)

    scan(ast.parse(path.read_text()).body)
    return names


def test_every_internal_import_resolves():
    """Every `import swm_ray.x` and `from swm_ray.x import name` in the package, the tests and the benchmarks
    (inside functions too) names a module that exists and a name it defines or imports."""
    files = [*PKG.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    defined = {}
    broken = []
    for path in files:
        for module, names, node in _import_nodes(path):
            if module != "swm_ray" and not module.startswith("swm_ray."):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if module not in MODULES:
                folder = ROOT / module.replace(".", "/")  # a namespace folder (evaluation/tasks) holds modules only
                if not folder.is_dir() or any(f"{module}.{n}" not in MODULES for n in names):
                    broken.append(f"{where}: no module {module}")
                continue
            if module not in defined:
                defined[module] = _top_level_names(MODULES[module])
            broken += [f"{where}: {module} has no {n}" for n in names
                       if n != "*" and n not in defined[module] and f"{module}.{n}" not in MODULES]
        broken += _missing_module_attributes(path)
    assert not broken, "\n".join(broken)


def _missing_module_attributes(path: Path) -> list[str]:
    """`mod.name` where `mod` is an swm_ray module imported by name (`from swm_ray.io import fs`,
    `import swm_ray.jobs.heal as job`) and `name` is neither bound in it nor a submodule of it."""
    bound = {}
    for module, _names, node in _import_nodes(path):
        for a in node.names:
            full = f"{module}.{a.name}" if isinstance(node, ast.ImportFrom) else a.name
            if full in MODULES and (isinstance(node, ast.ImportFrom) or a.asname):
                bound[a.asname or a.name] = full
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            full = bound[node.value.id]
            if node.attr.startswith("__"):
                continue
            if node.attr not in _top_level_names(MODULES[full]) and f"{full}.{node.attr}" not in MODULES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {full} has no {node.attr}")
    return out
