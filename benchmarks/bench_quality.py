"""Quality of `compress --layers N` on SmolLM2 for every criterion × search, next to the original and ShortGPT.

Held-out perplexity on Wikipedia prose (builtin:boolq-passages, 16,384 tokens, 128-token chunks, no BOS;
the protocol of the quality tables in BENCHMARKS.md). Calibration: the defaults (10 × 128 tokens of
builtin:lambada, seed 1234).

    .venv/bin/python benchmarks/bench_quality.py [--layers 6] [--out runs/quality.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from swm_ray.config import build_config


def ppl_of(model, tok) -> float:
    from swm_ray.evaluation.perplexity import perplexity
    from swm_ray.io.data import load_texts

    return perplexity(model, tok, load_texts("builtin:boolq-passages"), chunk=128, max_tokens=16384, bos="none")["ppl"]


def shortgpt(layers: int) -> dict:
    from swm_ray.edits.merge import apply_windows
    from swm_ray.io.data import calibration_for
    from swm_ray.io.models import load_model
    from swm_ray.methods.baselines import block_influence, shortgpt_windows

    cfg = build_config()
    _, calib, n = calibration_for(cfg)
    model, tok = load_model("builtin:smollm2-135m")
    bi = block_influence(model, calib.input_ids, calib.batches)
    windows = shortgpt_windows(bi, layers, protected=[n - 1])
    apply_windows(model, windows, "keep-first")
    return {"windows": windows, "ppl": ppl_of(model, tok)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--out", default="runs/quality.json")
    ap.add_argument("--only", default=None, help="comma list of criterion:search to run")
    args = ap.parse_args()
    from swm_ray.io.models import load_model
    from swm_ray.jobs.compress import run_compress

    rows = {}
    model, tok = load_model("builtin:smollm2-135m")
    rows["original"] = {"ppl": ppl_of(model, tok), "layers": model.config.num_hidden_layers}
    del model
    rows["shortgpt"] = shortgpt(args.layers)
    combos = [(c, s) for s in ("best-first", "top-down") for c in ("output", "kl", "cka")]
    if args.only:
        combos = [tuple(x.split(":")) for x in args.only.split(",")]
    for crit, search in combos:
        out = f"runs/q-{crit}-{search}"
        cfg = build_config(flags={"select.layers": args.layers, "select.criterion": crit, "select.search": search,
                                  "out": out, "overwrite": True})
        t0 = time.perf_counter()
        res = run_compress(cfg)
        secs = time.perf_counter() - t0
        m, t = load_model(out)
        p = res["plan"]
        rows[f"{crit}/{search}"] = {"windows": p["windows"], "threshold": p["threshold"], "ppl": ppl_of(m, t),
                                    "layers": p["num_layers_after"], "seconds": round(secs, 1),
                                    "evaluations": p["extra"]["candidate_evaluations"], "note": p["extra"]["note"]}
        print(json.dumps({f"{crit}/{search}": rows[f"{crit}/{search}"]}), flush=True)
    base = rows["original"]["ppl"]
    print("\n| method | layers | windows | PPL | × original | selection s |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r.get('layers', 30 - args.layers)} | {r.get('windows', '')} | {r['ppl']:.1f} | "
              f"{r['ppl'] / base:.2f} | {r.get('seconds', '')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
