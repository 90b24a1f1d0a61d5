"""Depth vs width vs both on the real SmolLM2-135M: held-out perplexity (the project's evaluation) of

- depth only: SWM best-first (criterion output, reference merge) to --ratio R,
- width only: FLAP (bias-compensated) and Taylor (first-order, LLM-Pruner style) to R,
- depth + width: SWM best-first to R/2, then FLAP on the merged model for another R/2 of the parameters,

at each ratio, plus the original. Every variant runs through `pipeline.compress_here` (in process, no Ray: the
same planners, executor and writer as `swm-ray compress`), writes its folder under --out and is evaluated
from that folder. Latency (greedy generation at batch 1) with --latency.

    .venv/bin/python benchmarks/bench_width.py [--ratios 0.2,0.35] [--variants depth,flap,taylor,depth+flap]
        [--samples 10] [--seq-len 128] [--ppl-tokens 16384] [--threads 2] [--latency] [--out runs/bench-width]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = ("depth", "flap", "taylor", "depth+flap")


def _flags(variant: str, ratio: float) -> dict:
    if variant == "depth":
        return {"select.method": "swm", "select.search": "best-first", "select.ratio": ratio}
    if variant in ("flap", "taylor"):
        return {"select.method": variant, "select.ratio": ratio}
    if variant == "depth+flap":
        return {"select.method": "swm", "select.search": "best-first", "select.ratio": ratio / 2,
                "select.then_width": ratio / 2, "select.width_method": "flap"}
    raise SystemExit(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--ratios", default="0.2,0.35")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency", action="store_true", help="also time generation (16 tokens, 3 runs after 1)")
    ap.add_argument("--out", default="runs/bench-width")
    ap.add_argument("--original-ppl", type=float, default=None, help="skip evaluating the original: its PPL")
    args = ap.parse_args()

    import torch

    from swm_ray.config import build_config
    from swm_ray.evaluation.suite import evaluate_source
    from swm_ray.io.models import resolve_model_path
    from swm_ray.recipes.pipeline import compress_here

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    base = {"model.source": args.model, "data.samples": args.samples, "data.seq_len": args.seq_len,
            "data.batch_size": max(4, min(args.samples, 5)), "eval.enabled": True, "eval.tasks": [],
            "eval.ppl_max_tokens": args.ppl_tokens, "eval.latency": args.latency, "eval.latency_runs": 3,
            "eval.latency_warmup": 1, "eval.latency_new_tokens": 16, "overwrite": True}
    rows = []
    t0 = time.perf_counter()
    eval_cfg = build_config(flags={k: v for k, v in base.items() if k.startswith("eval.")})
    orig = ({"ppl": {"ppl": args.original_ppl}} if args.original_ppl is not None else
            evaluate_source(resolve_model_path(args.model), {"source": args.model}, eval_cfg.eval))
    rows.append({"variant": "original", "ratio": 0.0, "removed": 0.0, "ppl": orig["ppl"]["ppl"],
                 "latency_ms_per_token": _latency(orig), "seconds": round(time.perf_counter() - t0, 1), "shape": ""})
    print(_row(rows[-1]), flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for variant in args.variants.split(","):
            t = time.perf_counter()
            cfg = build_config(flags={**base, **_flags(variant, ratio), "out": str(out / f"{variant}-{ratio:g}")})
            res = compress_here(cfg)
            p = res["plan"]
            w = p.get("width") or {}
            shape = (f"{p['num_layers_after']} layers" + (f", kv {w['kv_heads_after']}/{w['kv_heads_before']}, "
                     f"mlp {w['intermediate_after']}/{w['intermediate_before']}" if w else ""))
            rows.append({"variant": variant, "ratio": ratio, "removed": 1 - p["params_after"] / p["params_before"],
                         "ppl": res["metrics"]["ppl"]["ppl"], "latency_ms_per_token": _latency(res["metrics"]),
                         "seconds": round(time.perf_counter() - t, 1), "shape": shape})
            print(_row(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print("\n| variant | target | removed | PPL | ms/token | shape | seconds |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))


def _latency(metrics: dict) -> float | None:
    lat = metrics.get("latency") or {}
    return round(1000 / lat["tokens_per_s"], 2) if lat.get("tokens_per_s") else None


def _row(r: dict) -> str:
    return (f"| {r['variant']} | {r['ratio']:.0%} | {r['removed']:.1%} | {r['ppl']:.2f} | "
            f"{r['latency_ms_per_token'] if r['latency_ms_per_token'] is not None else '—'} | {r['shape']} | "
            f"{r['seconds']} |")


if __name__ == "__main__":
    main()
