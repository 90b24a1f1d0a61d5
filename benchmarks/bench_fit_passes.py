"""What a plan's compensation fit costs in layer runs: every window in one bottom-up pass, next to one window's
fit and next to a pass from the embeddings per window (the fit as it ran before the one-pass default). In
process (the library floor, no Ray), the model in memory, `merge.fit_samples` rows.

    .venv/bin/python benchmarks/bench_fit_passes.py [--model builtin:smollm2-135m]
        [--windows '[[3,5],[13,14],[15,18]]'] [--one '[[15,18]]'] [--rows 128] [--threads 2]
        [--plans '[[[12,18]], [[24,26],[16,17],[12,15]], [[12,17],[4,5]], [[15,18],[13,14],[3,5]]]']

Then the fits of several plans, as `auto` makes them for its finished plans (`methods.auto._fit_plans`): one climb
up the original model that every plan's fit forks from, the original's layer outputs kept for the forks
(`fitpass.OriginalTrack`), next to the same climb with nothing kept and next to a pass per plan from the
embeddings (`--plans`: `make demo`'s four finished plans by default, every one with the keep-first merge).

Layer runs are counted by the layer stack itself (`token_runs`: tokens run through a decoder layer), printed as
passes over the fit rows (token runs / (rows × tokens × layers)). The fits of the two multi-window ways are
compared tensor by tensor (they must agree within 1e-6 relative to the map's scale).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--windows", default="[[3, 5], [13, 14], [15, 18]]", help="the plan (auto's 6-layer choice)")
    ap.add_argument("--one", default="[[15, 18]]", help="the one-window plan to compare with (its top window)")
    ap.add_argument("--merge", default="keep-first")
    ap.add_argument("--rows", type=int, default=128, help="fit rows (merge.fit_samples)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plans", default="[[[12, 18]], [[24, 26], [16, 17], [12, 15]], [[12, 17], [4, 5]], "
                    "[[15, 18], [13, 14], [3, 5]]]", help="several plans to fit ('' to skip)")
    args = ap.parse_args()

    import torch

    from swm_ray.compute.fitpass import FitPass, compensation_sums
    from swm_ray.compute.stack import InMemoryStack
    from swm_ray.config import build_config
    from swm_ray.edits.fold import stack_site
    from swm_ray.io.data import calibration_for
    from swm_ray.io.models import load_model
    from swm_ray.methods.compensation import fit_windows, make_fit

    torch.set_num_threads(args.threads)
    cfg = build_config(flags={"model.source": args.model, "data.samples": args.rows})
    _, calib, _ = calibration_for(cfg)
    model, _ = load_model(args.model)
    stack = InMemoryStack(model)
    site = stack_site(stack)
    n_layers = stack.num_layers
    per_pass = int(calib.input_ids.shape[0]) * int(calib.input_ids.shape[1]) * n_layers
    ids, batches = calib.input_ids, calib.batches

    def one_pass(windows):
        fp = FitPass(stack, ids, batches, windows, args.merge, "global")
        return fit_windows(fp.advance, "lstsq", site)

    def pass_per_window(windows):
        fits = {}
        for w in sorted(tuple(w) for w in windows):
            (s,) = compensation_sums(stack, ids, batches, windows, args.merge, "global", dict(fits), [w])
            fits[w] = make_fit(w, s, "lstsq", site)
        return fits

    plan = [tuple(w) for w in json.loads(args.windows)]
    one = [tuple(w) for w in json.loads(args.one)]
    rows, got = [], {}
    for name, fn, windows in (("one window, one pass", one_pass, one), ("every window, one pass", one_pass, plan),
                              ("every window, a pass per window", pass_per_window, plan)):
        runs0, t0 = stack.token_runs, time.perf_counter()
        got[name] = fn(windows)
        secs, runs = time.perf_counter() - t0, stack.token_runs - runs0
        rows.append((name, len(windows), runs / per_pass, secs))
        print(f"{name:<34} {len(windows)} window(s)  {runs / per_pass:6.2f} passes  {secs:7.1f} s", flush=True)
    a, b = got["every window, one pass"], got["every window, a pass per window"]
    diff = max(float((a[w].tensor - b[w].tensor).abs().max() / b[w].tensor.abs().max().clamp_min(1e-12)) for w in a)
    print(f"\nmodel {args.model}, merge {args.merge}, {calib.input_ids.shape[0]}×{calib.input_ids.shape[1]} fit "
          f"tokens; largest relative difference of the two multi-window fits: {diff:.1e}")
    base = rows[0][2]
    print("\n| fit | windows | passes over the fit rows | × one window | seconds |\n|---|---|---|---|---|")
    for name, n, passes, secs in rows:
        print(f"| {name} | {n} | {passes:.2f} | {passes / base:.2f} | {secs:.1f} |")
    if args.plans:
        several(args, stack, calib, per_pass)


def several(args, stack, calib, per_pass: int) -> None:
    """The fits of several plans: a pass per plan, one climb with nothing kept, one climb with the original kept."""
    import torch

    from swm_ray.compute import fitpass
    from swm_ray.config import build_config
    from swm_ray.methods.auto import _fit_plans
    from swm_ray.methods.planners import compensate_plan
    from swm_ray.methods.session import LocalScoring

    plans = [[tuple(w) for w in p] for p in json.loads(args.plans)]
    cfg = build_config(flags={"model.source": args.model})
    scoring = LocalScoring(stack, calib, fit_calib=calib)
    jobs = {i: (f"plan {i}", cfg, "lstsq", p, args.merge) for i, p in enumerate(plans)}
    rows, got = [], {}

    def alone():
        site = scoring.site_for()
        return {k: compensate_plan(c, scoring, w, m, site, meth) for k, (_, c, meth, w, m) in jobs.items()}

    def climb(limit):
        def run():  # the stack has no budget here: fitpass.TRACK_LIMIT bounds what is kept
            before = fitpass.TRACK_LIMIT
            fitpass.TRACK_LIMIT = limit
            try:
                return _fit_plans(scoring, jobs)
            finally:
                fitpass.TRACK_LIMIT = before
        return run

    for name, fn in (("a pass per plan from the embeddings", alone), ("one climb, nothing kept", climb(0)),
                     ("one climb, the original's layer outputs kept (auto)", climb(fitpass.TRACK_LIMIT))):
        runs0, t0 = stack.token_runs, time.perf_counter()
        got[name] = fn()
        secs, runs = time.perf_counter() - t0, stack.token_runs - runs0
        rows.append((name, runs / per_pass, secs))
        print(f"{name:<52} {runs / per_pass:6.2f} passes  {secs:7.1f} s", flush=True)
    a = got["a pass per plan from the embeddings"]
    same = all(torch.equal(a[k].fits[w].tensor, b[k].fits[w].tensor) for b in list(got.values())[1:]
               for k in a for w in a[k].fits)
    layer = int(calib.input_ids.size) * int(stack.config.hidden_size) * 4
    print(f"\n{len(plans)} plans {plans}; both climbs' fits equal a pass per plan's bit for bit: {same}; the "
          f"original's output of one layer on the fit rows: {layer / 2**20:.1f} MiB")
    base = rows[0][1]
    print("\n| fits of the plans | passes over the fit rows | × a pass per plan | seconds |\n|---|---|---|---|")
    for name, passes, secs in rows:
        print(f"| {name} | {passes:.2f} | {passes / base:.2f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
