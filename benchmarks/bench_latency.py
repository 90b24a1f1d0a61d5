"""Generation latency of a grid's results, side by side in one process: every chosen row's plan (the grid writes
them under OUT/plans/) is built in memory from the source checkpoint (the executor: merged windows, width,
compensation), then all models are timed round-robin, one run of each in turn, so that load on a shared
machine falls on every model alike. Reports, per row, tokens/s of greedy generation at batch 1 and the time to
first token (a one-token generation), both as the median over runs, and their ratios to the original.

    .venv/bin/python benchmarks/bench_latency.py runs/grid-width [--rows all|N,N,...] [--new-tokens 64]
        [--runs 10] [--warmup 2] [--threads 2] [--out runs/grid-width/latency.json]

The grid's own latency columns are measured inside its trials, two or more at once on the same cores; this
script is the measurement to quote.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("grid", help="a grid's output folder (results.csv/parquet and plans/)")
    ap.add_argument("--rows", default="all", help="row numbers of results.parquet (0-based) or all")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (the time to first token "
                    "is the prompt's forward pass and one decoding step)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from swm_ray.evaluation.latency import DEFAULT_PROMPT, _generate_kwargs, _timed_generate
    from swm_ray.plan.executor import plan_model, source_model
    from swm_ray.recipes.specs import method_label

    torch.set_num_threads(args.threads)
    folder = Path(args.grid)
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    pick = range(len(rows)) if args.rows == "all" else [int(x) for x in args.rows.split(",")]
    cache: dict = {}
    models = []  # (label, params removed, model, tok)
    for i in pick:
        r = rows[i]
        if r.get("status") != "ok" or (not r.get("plan") and r.get("method") != "original"):
            continue
        if r["method"] == "original":
            continue
        model, tok, _plan = plan_model(folder / r["plan"], cache)
        models.append((f"{method_label(r)} @ {r['target']}", r.get("params_removed"), model, tok))
    model, tok = source_model(next(iter(cache)), cache)
    models.insert(0, ("original", 0.0, model, tok))
    timed: dict[str, dict[str, list[float]]] = {m[0]: {"gen": [], "first": []} for m in models}
    with torch.inference_mode():
        inputs = {}
        for _, _, _, tok in models:
            ids = tok(DEFAULT_PROMPT + ".", add_special_tokens=False)["input_ids"]
            ids = (ids * (args.prompt_tokens // len(ids) + 1))[:args.prompt_tokens]
            inputs[id(tok)] = {"input_ids": torch.tensor([ids]),
                               "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        for rnd in range(args.warmup + args.runs):
            for label, _, model, tok in models:
                x = inputs[id(tok)]
                s, n = _timed_generate(model, x, _generate_kwargs(tok, args.new_tokens), False)
                f, n1 = _timed_generate(model, x, _generate_kwargs(tok, 1), False)
                assert n == args.new_tokens and n1 == 1
                if rnd >= args.warmup:
                    timed[label]["gen"].append(s)
                    timed[label]["first"].append(f)
    base = timed["original"]
    b_gen, b_first = statistics.median(base["gen"]), statistics.median(base["first"])
    out = []
    print(f"{'model':60s} {'params removed':>14s} {'tokens/s':>9s} {'x':>6s} {'TTFT s':>8s} {'x':>6s}")
    for label, removed, _, _ in models:
        gen, first = statistics.median(timed[label]["gen"]), statistics.median(timed[label]["first"])
        row = {"model": label, "params_removed": removed, "tokens_per_s": args.new_tokens / gen,
               "speedup": b_gen / gen, "ttft_s": first, "ttft_ratio": first / b_first}
        out.append(row)
        print(f"{label[:60]:60s} {100 * (removed or 0):13.1f}% {row['tokens_per_s']:9.1f} {row['speedup']:6.2f} "
              f"{first:8.4f} {row['ttft_ratio']:6.2f}")
    meta = {"grid": str(folder), "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
            "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
            "timer": "perf_counter, medians, round-robin", "when": time.ctime()}
    Path(args.out or folder / "latency.json").write_text(json.dumps({"meta": meta, "rows": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
