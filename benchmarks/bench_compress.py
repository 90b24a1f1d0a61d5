"""The paper's selection at one threshold: the authors' naive procedure vs swm-ray's shard scorer.

Naive (re-implemented here as the released code runs it): for every candidate, deep-copy the current
model, collapse the window, run every calibration crop through the whole copy at batch 1 (a plain model
call with `labels=` and `output_hidden_states=True`, as the released script calls it), compare its final
hidden states with the original's. swm-ray: no copies; one merged layer per candidate, run from the
cached hidden state at the window's input through the layers above it, crops batched.

Both run the same top-down loop (paper semantics) at the same threshold on SmolLM2, each in its own
subprocess (so peak memory is that process's own), with the same torch thread count.

    .venv/bin/python benchmarks/bench_compress.py [--threshold 0.7] [--threads 1] [--repeat 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    from swm_ray.config import build_config
    from swm_ray.io.data import calibration_for
    from swm_ray.io.models import load_model

    _, calib, n = calibration_for(build_config())
    model, _ = load_model("builtin:smollm2-135m")
    return model, calib, n


class NaiveEvaluator:
    """Deep copy + full forward of every candidate, batch 1 (what the authors' code does)."""

    higher_is_better = True

    def __init__(self, model, calib):
        import torch

        self.original = model
        self.current = model
        self.crops = [torch.tensor(calib.input_ids[i : i + 1]) for i in range(calib.input_ids.shape[0])]
        with torch.inference_mode():
            self.ref = [model(c, labels=c, output_hidden_states=True).hidden_states[-1].flatten() for c in self.crops]

    def _collapsed(self, model, groups, window):
        from swm_ray.edits.merge import apply_windows

        cand = copy.deepcopy(model)
        lo = next(i for i, g in enumerate(groups) if g[0] == window[0])
        hi = next(i for i, g in enumerate(groups) if g[1] == window[1])
        return apply_windows(cand, [(lo, hi)], "reference") if hi > lo else cand

    def score(self, groups, candidates):
        import torch
        import torch.nn.functional as F

        out = []
        for window in candidates:
            cand = self._collapsed(self.current, groups, window)
            with torch.inference_mode():
                sims = [F.cosine_similarity(cand(c, labels=c, output_hidden_states=True).hidden_states[-1].flatten(),
                                            r, dim=0) for c, r in zip(self.crops, self.ref)]
            out.append(float(torch.stack(sims).mean()))
            del cand
        return out

    def commit(self, groups, window):
        self.current = self._collapsed(self.current, groups, window)


class WorkCounter:
    """Counts the token rows that pass through every decoder layer and through the LM head, on either side,
    with a global forward hook (the scorer's merged layers are created on the fly, so per-module hooks would
    miss them). Converted to multiply-add FLOPs with the layer's and the head's weight counts: the work a
    side does, independent of how fast the machine runs it."""

    def __init__(self, model):
        import torch

        self.layer_cls = type(model.model.layers[0])
        head = model.get_output_embeddings()
        self.head_shape = tuple(head.weight.shape)  # deep copies carry their own head: match by shape
        self.layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
        self.head_params = head.weight.numel()
        self.layer_rows = 0
        self.head_rows = 0
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, args, out):
        import torch

        is_head = isinstance(module, torch.nn.Linear) and tuple(module.weight.shape) == self.head_shape
        if isinstance(module, self.layer_cls) or is_head:
            x = out[0] if isinstance(out, tuple) else out
            rows = x.numel() // x.shape[-1]
            if is_head:
                self.head_rows += rows
            else:
                self.layer_rows += rows

    def gflop(self) -> float:
        return 2 * (self.layer_rows * self.layer_params + self.head_rows * self.head_params) / 1e9


def gemm_peak(threads: int) -> float:
    """GFLOP/s of this process on the layer's biggest GEMM shape at the scorer's batch (10 × 128 rows):
    the most any scorer could get from a multiply-add."""
    import torch

    a, w = torch.randn(1280, 576), torch.randn(1536, 576)
    for _ in range(3):
        a @ w.T
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ w.T
        best = max(best, 10 * 2 * 1280 * 576 * 1536 / (time.perf_counter() - t) / 1e9)
    return best


def run_side(side: str, threshold: float, threads: int) -> dict:
    from swm_ray.compute.scoring import LocalEvaluator, ShardScorer
    from swm_ray.methods.selection import top_down

    model, calib, n = _setup(threads)
    peak_rate = gemm_peak(threads)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    work = WorkCounter(model)
    t0 = time.perf_counter()
    if side == "naive":
        ev = NaiveEvaluator(model, calib)
    else:
        from swm_ray.compute.stack import InMemoryStack

        ev = LocalEvaluator([ShardScorer.over(InMemoryStack(model), calib.input_ids, "reference")], "output")
    sel = top_down(n, threshold, ev, paper_loop=True)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"side": side, "windows": sel.windows, "evaluations": sel.evaluations, "seconds": round(secs, 2),
            "seconds_per_candidate": round(secs / max(sel.evaluations, 1), 3),
            "peak_rss_mb": round(peak / 1024, 1), "rss_after_load_mb": round(rss_model / 1024, 1),
            "layer_token_rows": work.layer_rows, "head_token_rows": work.head_rows,
            "gflop": round(work.gflop(), 1), "gflop_per_s": round(work.gflop() / secs, 1),
            "gemm_peak_gflop_per_s": round(peak_rate, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, default=0.70)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two sides this many times; medians")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.threshold, args.threads)))
        return
    runs: dict[str, list[dict]] = {"naive": [], "swm-ray": []}
    for _ in range(args.repeat):
        for side in ("naive", "swm-ray"):
            cmd = [sys.executable, __file__, "--side", side, "--threshold", str(args.threshold),
                   "--threads", str(args.threads)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[side].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[side][-1]), flush=True)
    n, s = runs["naive"][-1], runs["swm-ray"][-1]
    model_mb = 538.1
    ratios = sorted(b["seconds"] / a["seconds"] for a, b in zip(runs["naive"], runs["swm-ray"]))
    print(f"same windows: {all(r['windows'] == n['windows'] for r in runs['naive'] + runs['swm-ray'])}"
          f"  ({s['windows']})")
    print(f"wall time ratio swm-ray/naive per pair = {[round(r, 3) for r in ratios]}, "
          f"median {statistics.median(ratios):.3f}")
    print(f"work ratio swm-ray/naive = {s['gflop'] / n['gflop']:.3f} (weight multiply-adds: "
          f"{s['gflop']:.0f} vs {n['gflop']:.0f} GFLOP; rate {s['gflop_per_s']} vs {n['gflop_per_s']} GFLOP/s)")
    bound = s["gflop"] / (max(r["gemm_peak_gflop_per_s"] for r in runs["swm-ray"])) / n["seconds"]
    print(f"floor for exact scores on this machine: {bound:.3f} (this work at the GEMM peak, / the naive wall time)")
    print(f"peak memory ratio swm-ray/naive = {s['peak_rss_mb'] / n['peak_rss_mb']:.3f} "
          f"(naive peak = {n['peak_rss_mb'] / model_mb:.2f}x the fp32 model, "
          f"swm-ray {s['peak_rss_mb'] / model_mb:.2f}x)")


if __name__ == "__main__":
    main()
