"""The task-style items of `auto` (`select.auto_task_items`), scored for several plans in one walk, with the
choices of an item packed into one row (their shared context run once) and without packing, side by side in one
process on the real model.

    .venv/bin/python benchmarks/bench_task_items.py [--model builtin:smollm2-135m] [--items 192] [--repeat 2] \
        [--before DIR]

Per variant: wall seconds (best of `--repeat`), tokens run through decoder layers, and for the packed run the
largest difference of any choice's log-likelihood to the unpacked one and whether every item's argmax (the
accuracy `auto` decides with) is the same. `--before DIR` adds the `plans_logliks` of another source tree
(DIR/swm_ray/compute/validation.py, e.g. `git archive` of an older commit), run on the same stack. The plans
are those of the 6-layer close call on SmolLM2 (the default's `swm/keep-first` plan and ReplaceMe's block) and,
on Qwen2.5-0.5B, SLEB's 6-layer drop and SWM's merged window.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

PLANS = {"builtin:smollm2-135m": [([(15, 18), (13, 14), (3, 5)], "keep-first"), ([(12, 18)], "keep-first")],
         "builtin:qwen2.5-0.5b": [([(7, 13)], "keep-first"), ([(8, 14)], "reference")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m", choices=sorted(PLANS))
    ap.add_argument("--items", type=int, default=192)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--before", default=None, help="another source tree whose plans_logliks runs as 'before'")
    args = ap.parse_args()

    from swm_ray.compute.stack import InMemoryStack
    from swm_ray.compute.validation import plans_logliks
    from swm_ray.io.data import wants_bos
    from swm_ray.io.models import load_model
    from swm_ray.methods.tasksignal import build_items, item_scores, task_rows

    model, tok = load_model(args.model)
    stack = InMemoryStack(model)
    rows = task_rows(build_items(tok, args.items, seed=1234, bos=wants_bos(tok, model.config.model_type, "auto")))
    plans = [(w, m, None) for w, m in PLANS[args.model]]
    out: dict = {"model": args.model, "items": rows.n_items, "rows": len(rows.rows),
                 "row_tokens": sum(len(r) for r in rows.rows)}
    values = {}
    runs = {"unpacked": lambda: plans_logliks(stack, rows.rows, rows.spans, plans, "global", pack=False),
            "packed": lambda: plans_logliks(stack, rows.rows, rows.spans, plans, "global")}
    if args.before:
        import importlib.util
        import sys
        from pathlib import Path

        path = Path(args.before) / "swm_ray" / "compute" / "validation.py"
        spec = importlib.util.spec_from_file_location("before_validation", path)
        before = importlib.util.module_from_spec(spec)
        sys.modules["before_validation"] = before
        spec.loader.exec_module(before)
        runs = {"before": lambda: before.plans_logliks(stack, rows.rows, rows.spans, plans, "global"), **runs}
    for variant, fn in runs.items():
        best = float("inf")
        for _ in range(args.repeat):
            stack.token_runs = 0
            t0 = time.perf_counter()
            got = fn()
            best = min(best, time.perf_counter() - t0)
        values[variant] = got
        out[variant] = {"seconds": round(best, 2), "layer_tokens": stack.token_runs}
    out["max_abs_loglik_diff"] = float(max(np.max(np.abs(a - b)) for a, b in zip(values["packed"],
                                                                                 values["unpacked"])))
    out["same_argmax"] = all(np.array_equal(item_scores(rows, a), item_scores(rows, b))
                             for a, b in zip(values["packed"], values["unpacked"]))
    out["accuracy"] = [float(item_scores(rows, a).mean()) for a in values["packed"]]
    out["speedup"] = {v: round(out[v]["seconds"] / out["packed"]["seconds"], 2) for v in runs if v != "packed"}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
