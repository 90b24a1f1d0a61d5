"""Zero-shot accuracy of saved plans, one after another in one process: every plan (a grid's OUT/plans/*.json,
or a run's plan.json) is built in memory from its source checkpoint (the executor: merged windows,
compensation, width), evaluated on the zero-shot tasks with lm-evaluation-harness, and freed. The source model
itself is the first row. Results are written after every model to `--out` (JSON) and printed as a markdown
table; a rerun with the same `--out` keeps the rows it already has, so an interrupted run loses one model at
most.

    .venv/bin/python benchmarks/bench_zero_shot.py runs/grid-auto-6-10/plans/002-*.json LABEL=PLAN.json ...
        [--tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa] [--limit 100] [--threads 2]
        [--ppl] [--out runs/zero-shot.json]

An argument `LABEL=PATH` names its row; a bare path is labelled from its plan (method, windows, compensation).
`--ppl` adds the held-out perplexity of the evaluation defaults (`builtin:boolq-passages`); `--tasks ""
--ppl` gives the perplexity alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

SIX_TASKS = "piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def _label(plan) -> str:
    comp = (plan.compensation or {}).get("method") if plan.compensated else None
    name = plan.method if plan.method != "swm" else f"swm {plan.criterion}/{plan.search}/{plan.merge}"
    return f"{name} {plan.windows}" + (f" + {comp}" if comp else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plans", nargs="+", help="plan JSON files, each optionally LABEL=PATH")
    ap.add_argument("--tasks", default=SIX_TASKS)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl", action="store_true", help="also the held-out perplexity (evaluation defaults)")
    ap.add_argument("--no-original", action="store_true", help="skip the source model's row")
    ap.add_argument("--out", default="runs/zero-shot.json")
    args = ap.parse_args()

    import torch

    from swm_ray.evaluation.report import write_text_atomic
    from swm_ray.evaluation.suite import evaluate_model
    from swm_ray.plan.executor import plan_model, source_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"rows": []}
    have = {r["label"] for r in done["rows"]}
    cache: dict = {}
    jobs = []
    for arg in args.plans:
        label, eq, path = arg.rpartition("=")
        jobs.append((label if eq else None, path if eq else arg))
    queue: list = [] if args.no_original else [("original", None)]
    queue += jobs
    tasks = [t for t in args.tasks.split(",") if t]
    for label, path in queue:
        if label in have:
            continue
        t0 = time.perf_counter()
        if path is None:
            from swm_ray.plan.plan import Plan

            first = Plan.load(jobs[0][1]) if jobs else None
            model, tok = source_model(first.source_model if first else "builtin:smollm2-135m", cache,
                                      first.source_revision if first else None)
            windows, params_removed = [], 0.0
        else:
            model, tok, plan = plan_model(path, cache)
            label = label or _label(plan)
            if label in have:
                continue
            windows = plan.windows
            params_removed = (1 - plan.params_after / plan.params_before) if plan.params_after else None
        res = evaluate_model(model, tok, tasks=tasks, limit=args.limit,
                             ppl_data="builtin:boolq-passages" if args.ppl else "none")
        row = {"label": label, "plan": path, "windows": windows, "params_removed": params_removed,
               "tasks": {t: v["value"] for t, v in res["tasks"].items()},
               "metrics": {t: v["metric"] for t, v in res["tasks"].items()},
               "mean": res["mean"], "ppl": (res.get("ppl") or {}).get("ppl"),
               "seconds": round(time.perf_counter() - t0, 1)}
        done["rows"].append(row)
        have.add(label)
        done["meta"] = {"tasks": tasks, "limit": args.limit, "threads": args.threads, "when": time.ctime()}
        write_text_atomic(str(out), json.dumps(done, indent=2) + "\n")
        mean = "-" if row["mean"] is None else f"{row['mean']:.3f}"
        ppl = f", perplexity {row['ppl']:.2f}" if row["ppl"] else ""
        print(f"{label}: mean {mean}{ppl} ({row['seconds']:.0f} s)", flush=True)
        del model
        gc.collect()
    cols = done["meta"]["tasks"]
    print("\n| model | " + "".join(f"{c} | " for c in cols) + "mean |" + (" PPL |" if args.ppl else ""))
    print("|---|" + "---|" * (len(cols) + 1) + ("---|" if args.ppl else ""))
    for r in done["rows"]:
        cells = "".join(f"{r['tasks'].get(t, float('nan')):.2f} | " for t in cols)
        ppl = f" {r['ppl']:.2f} |" if args.ppl and r.get("ppl") else ""
        mean = "-" if r["mean"] is None else f"{r['mean']:.3f}"
        print(f"| {r['label']} | {cells}{mean} |{ppl}")

if __name__ == "__main__":
    main()
