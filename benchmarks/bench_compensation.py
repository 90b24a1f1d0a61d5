"""Compensation on a fixed plan: held-out perplexity with no compensation, `lstsq` fitted bottom-up on the
compressed model's input (the default), `lstsq` fitted locally (original input), and `scale`; with the time
the sums and the solve take. In process (the library floor, no Ray), the model in memory.

    .venv/bin/python benchmarks/bench_compensation.py [--windows '[[13,19]]'] [--merge reference]
        [--samples 10] [--threads 2] [--solve-dim 4096]

`--windows` default: what `swm-ray compress --layers 6` selects on SmolLM2 (output / best-first /
reference, BENCHMARKS.md). `--solve-dim D` also times one solve of the normal equations at width D
(random data; Llama-3-70B: d = 8192).
"""

from __future__ import annotations

import argparse
import copy
import json
import time


def _ppl(model, tok, tokens: int) -> float:
    from swm_ray.config import build_config
    from swm_ray.evaluation.suite import evaluate_model

    cfg = build_config(sets={"eval.tasks": [], "eval.ppl_max_tokens": tokens})
    return evaluate_model(model, tok, cfg.eval)["ppl"]["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--windows", default="[[13, 19]]")
    ap.add_argument("--merge", default="reference")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="none,lstsq/compressed,lstsq/original,scale/compressed",
                    help="comma list of none | METHOD/INPUT[/RIDGE[/PRIOR]], e.g. lstsq/compressed/0.1 or "
                    "lstsq/compressed/1/zero (the ridge's prior: identity, the default, or zero)")
    ap.add_argument("--ridge", type=float, default=0.0)
    ap.add_argument("--skip-first", type=int, default=1, help="positions of every row left out of the fit "
                    "(merge.skip_first; 0 fits the attention sink too)")
    ap.add_argument("--solve-dim", type=int, default=0)
    ap.add_argument("--original-ppl", type=float, default=None, help="skip evaluating the original: its PPL")
    ap.add_argument("--ppl-tokens", type=int, default=16384, help="held-out perplexity tokens (eval default 16384)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from swm_ray.compute.fitpass import CompSums, FitPass
    from swm_ray.compute.stack import InMemoryStack
    from swm_ray.config import build_config
    from swm_ray.edits.fold import compensate_model, stack_site
    from swm_ray.edits.merge import apply_windows
    from swm_ray.io.data import calibration_for
    from swm_ray.io.models import load_model
    from swm_ray.methods.compensation import fit_windows, solve

    torch.set_num_threads(args.threads)
    windows = [tuple(w) for w in json.loads(args.windows)]
    cfg = build_config(flags={"model.source": args.model, "data.samples": args.samples})
    _, calib, _ = calibration_for(cfg)
    model, tok = load_model(args.model)
    stack = InMemoryStack(model)
    site = stack_site(stack)
    base = args.original_ppl or _ppl(model, tok, args.ppl_tokens)
    print(f"model {args.model}, windows {windows}, merge {args.merge}, calibration {calib.input_ids.shape[0]}×"
          f"{calib.input_ids.shape[1]} tokens, original PPL {base:.2f} ({args.ppl_tokens} held-out tokens)")
    rows = []
    for variant in args.variants.split(","):
        method, _, rest = variant.partition("/")
        source, _, rest = rest.partition("/")
        ridge, _, prior = rest.partition("/")
        ridge = float(ridge) if ridge else args.ridge
        prior = prior or "identity"
        fits, timings = {}, []
        if method != "none":
            t0 = time.perf_counter()
            fp = FitPass(stack, calib.input_ids, calib.batches, windows, args.merge, "global", source=source,
                         skip_first=args.skip_first)
            fits = fit_windows(fp.advance, method, site, ridge=ridge, prior=prior)  # one bottom-up pass
            fit_s = time.perf_counter() - t0
            timings.append(("sums", fit_s, len(windows)))
        edited = apply_windows(copy.deepcopy(model), windows, args.merge)
        compensate_model(edited, windows, fits)
        ppl = _ppl(edited, tok, args.ppl_tokens)
        errors = "; ".join(f"{w[0]}-{w[1]} {f.error_before:.3f} → {f.error_after:.3f}" for w, f in sorted(fits.items()))
        sums_s = sum(t for _, t, _ in timings)
        rows.append((variant, ppl, ppl / base, errors, f"{sums_s:.1f}" if fits else "", f"{fit_s:.1f}" if fits else ""))
        print(f"{variant:<20} PPL {ppl:8.2f}  ×{ppl / base:.3f}  fit error {errors or '-'}  "
              f"sums {sums_s:.1f} s, whole fit {fit_s if fits else 0:.1f} s")
    print("\n| compensation / input | PPL | × original | missed share of the window's update (before → after) | "
          "sums s | fit s |\n|---|---|---|---|---|---|")
    for v, p, r, e, s, f in rows:
        print(f"| {v} | {p:.2f} | {r:.3f} | {e or '—'} | {s} | {f} |")
    if args.solve_dim:
        d = args.solve_dim
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2 * d, d))
        sums = CompSums(x.T @ x, x.T @ rng.standard_normal((2 * d, d)), tokens=2 * d)
        t0 = time.perf_counter()
        solve(sums, "matrix")
        print(f"\nsolve at d = {d} (float64, {args.threads} threads): {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
