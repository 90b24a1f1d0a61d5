"""The paper's selection at one threshold: the authors' naive procedure vs swm-ray's shard scorer.

Naive (re-implemented here as the released code runs it): for every candidate, deep-copy the current
model, collapse the window, run every calibration crop through the whole copy at batch 1, compare its
final hidden states with the original's. swm-ray: no copies; one merged layer per candidate, run from the
cached hidden state at the window's input through the layers above it, crops batched.

Both run the same top-down loop (paper semantics) at the same threshold on SmolLM2, each in its own
subprocess (so peak memory is that process's own), with the same torch thread count.

    .venv/bin/python benchmarks/bench_compress.py [--threshold 0.7] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    from swm_ray.config import build_config
    from swm_ray.jobs.analyze import prepare_calibration
    from swm_ray.models import load_model

    _, calib, n = prepare_calibration(build_config())
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
            self.ref = [model(c, output_hidden_states=True).hidden_states[-1].flatten() for c in self.crops]

    def _collapsed(self, model, groups, window):
        from swm_ray.merge import apply_windows

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
                sims = [F.cosine_similarity(cand(c, output_hidden_states=True).hidden_states[-1].flatten(), r, dim=0)
                        for c, r in zip(self.crops, self.ref)]
            out.append(float(torch.stack(sims).mean()))
            del cand
        return out

    def commit(self, groups, window):
        self.current = self._collapsed(self.current, groups, window)


def run_side(side: str, threshold: float, threads: int) -> dict:
    from swm_ray.scoring import LocalEvaluator, ShardScorer
    from swm_ray.selection import top_down

    model, calib, n = _setup(threads)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if side == "naive":
        ev = NaiveEvaluator(model, calib)
    else:
        ev = LocalEvaluator([ShardScorer(model, calib.input_ids, calib.batches, "output", "reference")], "output")
    sel = top_down(n, threshold, ev, paper_loop=True)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"side": side, "windows": sel.windows, "evaluations": sel.evaluations, "seconds": round(secs, 2),
            "seconds_per_candidate": round(secs / max(sel.evaluations, 1), 3),
            "peak_rss_mb": round(peak / 1024, 1), "rss_after_load_mb": round(rss_model / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, default=0.70)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.threshold, args.threads)))
        return
    res = {}
    for side in ("naive", "swm-ray"):
        p = subprocess.run([sys.executable, __file__, "--side", side, "--threshold", str(args.threshold),
                            "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        res[side] = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(res[side]), flush=True)
    n, s = res["naive"], res["swm-ray"]
    model_mb = 538.1
    print(f"same windows: {n['windows'] == s['windows']}  ({s['windows']})")
    print(f"wall time ratio swm-ray/naive = {s['seconds'] / n['seconds']:.3f}")
    print(f"peak memory ratio swm-ray/naive = {s['peak_rss_mb'] / n['peak_rss_mb']:.3f} "
          f"(naive peak = {n['peak_rss_mb'] / model_mb:.2f}x the fp32 model, "
          f"swm-ray {s['peak_rss_mb'] / model_mb:.2f}x)")


if __name__ == "__main__":
    main()
