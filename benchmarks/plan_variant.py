"""A plan with other windows: a copy of a written plan.json whose windows, merge method and method label are
replaced, so that a table's rows (another method's windows on the same source) can be rebuilt and scored
(`bench_accuracy.py`, `bench_zero_shot.py`, `swm-ray apply`) without running that method's search again.

    python benchmarks/plan_variant.py BASE_PLAN.json OUT.json --windows '[[12,18]]' [--merge keep-first]
        [--method replaceme]

The copy carries no compensation, no similarities and no `extra`; its parameter count assumes that every
decoder layer has the size of the layers the base plan removed (true of the dense stacks measured here). The
base plan must remove at least one layer, and the windows must lie inside the source's layers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swm_ray.plan.plan import Plan, removed_from_windows


def variant(base: dict, windows: list[list[int]], merge: str, method: str) -> dict:
    """`base` (a plan's JSON object) with these windows, merge and method; parameters scaled per layer."""
    n_layers = base["num_layers_before"]
    if not base["removed_layers"]:
        raise SystemExit("the base plan removes no layer: the size of a layer is unknown")
    if any(not (0 <= lo < hi < n_layers) for lo, hi in windows):
        raise SystemExit(f"windows {windows}: each must be [low, high] with 0 <= low < high < {n_layers}")
    per_layer = (base["params_before"] - base["params_after"]) / len(base["removed_layers"])
    removed = removed_from_windows(windows)
    out = dict(base)
    out.update(windows=windows, merge=merge, method=method, removed_layers=removed,
               num_layers_after=n_layers - len(removed), params_after=int(round(base["params_before"]
                                                                                - per_layer * len(removed))),
               compensation=None, similarities=[], extra={})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="a written plan.json (its source model and sizes are kept)")
    ap.add_argument("out", help="where the new plan.json goes")
    ap.add_argument("--windows", required=True, help="JSON list of [low, high] windows, 0-based, inclusive")
    ap.add_argument("--merge", default="keep-first", help="merge method of every window (keep-first: a drop)")
    ap.add_argument("--method", default="swm", help="the method label the plan carries")
    args = ap.parse_args()
    base = json.loads(Path(args.base).read_text())
    plan = variant(base, [list(map(int, w)) for w in json.loads(args.windows)], args.merge, args.method)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(plan, indent=1) + "\n")
    Plan.load(args.out)  # refuses what the executor would refuse to read
    print(f"{args.out}: {plan['method']} {plan['windows']} ({plan['merge']}), {plan['num_layers_after']} layers")


if __name__ == "__main__":
    main()
