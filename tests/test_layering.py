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
