"""A finished `auto` run's close call decided again from its record by each close-call rule: which plan each
`select.auto_close_signal` would have chosen, with no forward pass.

    .venv/bin/python benchmarks/close_replay.py RUN [RUN ...] [--signals accuracy,text,resolved]

RUN is a compress output folder whose `plan.json` has `extra.auto` with per-item task values (`task_items`, runs
from `e0cd59a` on). The decision is `methods.auto.replay_close_call`, through the same `_close_pick` the option
runs. The line for the run's own rule should name the plan the run chose (its fit gate aside); a plan another
rule picks had no fit gate in the run: measure it, and its perplexity, with `gate_replay.py RUN PLAN RIVAL --ppl`.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--signals", default="accuracy,text,resolved")
    args = ap.parse_args()

    import yaml

    from swm_ray.methods.auto import replay_close_call

    for run in args.runs:
        auto = json.load(open(f"{run}/plan.json"))["extra"]["auto"]
        sel = yaml.safe_load(open(f"{run}/config.resolved.yaml"))["select"]
        z, own = sel["auto_margin"], sel.get("auto_close_signal", "accuracy")
        wins = {c["candidate"]: c["windows"] for c in auto["candidates"]}
        print(f"{run}: chose {auto['chosen']} {wins[auto['chosen']]} by {own}")
        for signal in args.signals.split(","):
            try:
                got = replay_close_call(auto, signal, z)
            except ValueError as e:
                print(f"  {signal}: not replayable: {e}")
                continue
            mark = " (the run's rule)" if signal == own else ""
            print(f"  {signal:9s}{mark}: {got['chosen']} {wins[got['chosen']]}; between {got['contenders'] or '-'}: "
                  f"{got['why']}")


if __name__ == "__main__":
    main()
