"""The shape of the package: modules and lines per folder, the longest module, import circles and upward
imports (the graph `tests/test_layering.py` checks).

    python benchmarks/house.py
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_layering import MODULES, floor_of, import_cycles, import_graph  # noqa: E402


def main() -> None:
    per_folder: dict[str, list[int]] = defaultdict(list)
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    for m, p in MODULES.items():
        rel = p.parent.relative_to(Path(MODULES["swm_ray"]).parent).as_posix()
        folder = rel if rel != "." else "(top level)"
        per_folder[folder].append(lines[m])
    graph = import_graph()
    upward = [(m, d) for m, deps in graph.items() for d in deps if floor_of(d) > floor_of(m)]
    print("| folder | modules | lines | longest |")
    print("|---|---|---|---|")
    for folder, ns in sorted(per_folder.items()):
        print(f"| {folder} | {len(ns)} | {sum(ns):,} | {max(ns)} |")
    longest = max(lines, key=lines.get)
    print(f"\nmodules: {len(MODULES)} (with package __init__ files); lines: {sum(lines.values()):,}; "
          f"longest: {longest} ({lines[longest]}); import circles: {len(import_cycles(graph))}; "
          f"upward imports: {len(upward)}")


if __name__ == "__main__":
    main()
