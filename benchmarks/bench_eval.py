"""Benchmark of `swm-ray eval` on SmolLM2-135M on CPU (offline tasks).

Measures zero-shot scoring throughput (items/s) at several lm-eval batch sizes on one task, the wall time
of the full seven-task suite at `--suite-limit` items per task, and perplexity throughput (tokens/s).

    python benchmarks/bench_eval.py [--task piqa] [--items 50] [--batch-sizes 1,16] [--suite-limit 100]
                                    [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--task", default="piqa", help="task for the batch-size comparison")
    p.add_argument("--items", type=int, default=50, help="items scored per batch-size point")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--suite-limit", type=int, default=100, help="items per task for the 7-task suite (0: skip)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="perplexity tokens (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the numbers here")
    return p.parse_args()


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_batch_sizes(model, tok, task: str, items: int, sizes: list[int]) -> list[dict]:
    """Items/s of zero-shot scoring of `task` at each lm-eval batch size."""
    from swm_ray.evaluation.zeroshot import zeroshot

    zeroshot(model, tok, [task], limit=2, batch_size=1, offline=True)  # warm-up: lm-eval imports, task index
    rows = []
    for bs in sizes:
        res, secs = _timed(lambda bs=bs: zeroshot(model, tok, [task], limit=items, batch_size=bs, offline=True))
        n = res["tasks"][task]["n"]
        rows.append({"task": task, "batch_size": bs, "items": n, "seconds": secs, "items_per_s": n / secs,
                     "value": res["tasks"][task]["value"]})
    return rows


def bench_suite(model, tok, limit: int, batch_size: int = 16) -> dict:
    """Wall time of the seven paper tasks at `limit` items each."""
    from swm_ray.config import PAPER_TASKS
    from swm_ray.evaluation.zeroshot import zeroshot

    res, secs = _timed(lambda: zeroshot(model, tok, list(PAPER_TASKS), limit=limit, batch_size=batch_size,
                                        offline=True))
    items = sum(r["n"] for r in res["tasks"].values())
    return {"limit": limit, "batch_size": batch_size, "items": items, "seconds": secs, "items_per_s": items / secs,
            "mean": res["mean"], "tasks": {t: r["value"] for t, r in res["tasks"].items()}}


def bench_ppl(model, tok, tokens: int) -> dict:
    """Tokens/s of chunked perplexity on the builtin held-out text."""
    from swm_ray.evaluation.perplexity import perplexity
    from swm_ray.io.data import load_texts

    texts = load_texts("builtin:boolq-passages")
    res, secs = _timed(lambda: perplexity(model, tok, texts, chunk=128, max_tokens=tokens, bos="stream"))
    return {**res, "seconds": secs, "tokens_per_s": res["tokens"] / secs}


def main() -> None:
    args = _args()
    from swm_ray.io.models import load_model, set_threads

    set_threads(args.threads)
    import torch

    (model, tok), load_s = _timed(lambda: load_model(args.model, device="cpu", dtype="float32"))
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    out: dict = {"model": args.model, "load_s": load_s, "threads": torch.get_num_threads(),
                 "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    out["batch_sizes"] = bench_batch_sizes(model, tok, args.task, args.items, sizes)
    for r in out["batch_sizes"]:
        print(f"{r['task']} bs={r['batch_size']:>3}: {r['items']} items in {r['seconds']:.1f} s = "
              f"{r['items_per_s']:.2f} items/s (acc {r['value']:.3f})", flush=True)
    if args.ppl_tokens:
        out["ppl"] = bench_ppl(model, tok, args.ppl_tokens)
        print(f"perplexity: {out['ppl']['tokens']} tokens in {out['ppl']['seconds']:.1f} s = "
              f"{out['ppl']['tokens_per_s']:.0f} tokens/s (ppl {out['ppl']['ppl']:.2f})", flush=True)
    if args.suite_limit:
        out["suite"] = bench_suite(model, tok, args.suite_limit)
        s = out["suite"]
        print(f"7-task suite, limit {s['limit']}: {s['items']} items in {s['seconds']:.1f} s "
              f"({s['items_per_s']:.2f} items/s), mean {s['mean']:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
