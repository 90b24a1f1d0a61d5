"""The fit gate of a finished `auto` run, replayed on more task items (and, if asked, the fitted plan's held-out
perplexity): is the gate's verdict a matter of its 192 items?

    .venv/bin/python benchmarks/gate_replay.py RUN FITTED RIVAL [--items 192,576] [--ppl] [--threads 2]

RUN is a compress output folder whose `plan.json` has `extra.auto`; FITTED and RIVAL are two of its candidates (e.g.
`sleb+lstsq` and `sleb`; a fitted RIVAL is refitted too, so two close fitted plans can be compared). The run's own
config (`config.resolved.yaml`: model, calibration seed, fit settings) gives the same calibration draw, so FITTED's
map is refitted on the run's own fit rows (`io.data.calibration_sets`, as `compress` draws them) and equals the
run's. For each item count the items are drawn as `auto` draws them (`methods.tasksignal.auto_task_rows` with that
count: the run's seed, tokenizer and BOS policy, the held-out slices only), and the paired difference of the correct
continuation's loss per byte (FITTED − RIVAL) is printed with its standard error and the gate's verdict at
`select.auto_margin`. With `--ppl`, FITTED's model is built (windows merged, map folded) and its perplexity on
`eval.ppl_data` printed, as `compress --eval` measures it. In process, the model in memory; no Ray.
"""

from __future__ import annotations

import argparse
import json
import math
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("fitted")
    ap.add_argument("rival")
    ap.add_argument("--items", default="192,576", help="item counts to replay the gate on")
    ap.add_argument("--ppl", action="store_true", help="also the fitted plan's held-out perplexity")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch
    import yaml

    from swm_ray.compute.stack import InMemoryStack
    from swm_ray.compute.validation import plans_logliks
    from swm_ray.config import RunConfig
    from swm_ray.io.data import calibration_sets
    from swm_ray.io.models import load_model, resolve_model_path
    from swm_ray.methods.planners import compensate_plan
    from swm_ray.methods.session import LocalScoring
    from swm_ray.methods.tasksignal import auto_task_rows, text_losses

    torch.set_num_threads(args.threads)
    plan = json.load(open(f"{args.run}/plan.json"))
    auto = plan["extra"]["auto"]
    cands = {c["candidate"]: c for c in auto["candidates"]}
    fitted, rival = cands[args.fitted], cands[args.rival]
    cfg = RunConfig.model_validate(yaml.safe_load(open(f"{args.run}/config.resolved.yaml")))
    src = cfg.model.source
    print(f"{args.run}: {src}, seed {cfg.data.seed}; {args.fitted} {fitted['windows']} against {args.rival} "
          f"{rival['windows']}; the run's gate: {fitted.get('fit_gate')}", flush=True)
    sets = calibration_sets(cfg, cfg.select.auto_validation_max, fit=True)
    model, tok = load_model(src)
    stack = InMemoryStack(model)
    scoring = LocalScoring(stack, sets.plan, fit_calib=sets.fit)
    windows = [tuple(w) for w in fitted["windows"]]
    comp = compensate_plan(cfg, scoring, windows, fitted["merge"], scoring.site_for(), fitted["compensate"])
    rwin = [tuple(w) for w in rival["windows"]]
    rcomp = None if rival["compensate"] == "none" else compensate_plan(
        cfg, scoring, rwin, rival["merge"], scoring.site_for(), rival["compensate"]).fits  # a fitted rival: its map
    plans = [(windows, fitted["merge"], comp.fits), (rwin, rival["merge"], rcomp)]
    z = cfg.select.auto_margin
    path = resolve_model_path(src)
    for n in [int(x) for x in args.items.split(",")]:
        t0 = time.perf_counter()
        rows, why = auto_task_rows(cfg.model_copy(update={"select": cfg.select.model_copy(
            update={"auto_task_items": n})}), path)  # the items as auto draws them, n of them
        if rows is None:
            raise SystemExit(f"no task items: {why}")
        ll = plans_logliks(stack, rows.rows, rows.spans, plans, cfg.merge.attention)
        d = text_losses(rows, ll[0]) - text_losses(rows, ll[1])
        se = float(d.std(ddof=1) / math.sqrt(len(d)))
        verdict = "passed" if not d.mean() > z * se else "set aside"
        print(f"{len(d)} items: {float(np.mean(d)):+.4f} ± {se:.4f} nats per byte ({float(np.mean(d)) / se:+.2f} "
              f"standard errors; {verdict} at a margin of {z}) in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.ppl:
        from swm_ray.edits.fold import compensate_model
        from swm_ray.edits.merge import apply_windows
        from swm_ray.evaluation.perplexity import load_ppl_texts, perplexity

        edited, _ = load_model(src)
        apply_windows(edited, windows, fitted["merge"], cfg.merge.attention)
        compensate_model(edited, windows, comp.fits)
        e = cfg.eval
        res = perplexity(edited.eval(), tok, load_ppl_texts(e.ppl_data), chunk=e.ppl_chunk,
                         max_tokens=e.ppl_max_tokens, bos=e.ppl_bos, batch_size=e.ppl_batch_size)
        print(f"{args.fitted} {windows}: perplexity {res['ppl']:.2f} on {e.ppl_data} ({res['tokens']} tokens)")


if __name__ == "__main__":
    main()
