"""Replay the race of `--method auto` under other stopping rules, from what a run without stopping saw.

A run with `--set select.auto_stop_margin=1e9` lets every search finish and records in `plan.json`
(`extra.auto.trajectory`) each candidate's partial plan on the held-out rows at every level it reached, round
by round, with the candidate checks it had asked for by then. This script replays those rounds and applies a
stopping rule as the race would have: which searches a rule stops, where, how many of their checks it saves,
and whether the plan the run chose (everything run to the end) survives.

    python benchmarks/stop_rules.py runs/nostop-smollm2-6/plan.json runs/nostop-qwen-6/plan.json [--z 2]

Rules (rivals of a search's partial plan that removes k layers; it stops when behind the best rival by more
than z standard errors of the paired per-row difference):
  partial   the release's rule: partial plans of other searches and rankings at level >= k, finished plans
            that remove >= k layers
  finals    finished plans only (a sound bound when removing more layers never lowers the loss)
  half      finished plans; partial plans only once the search has done at least half of its steps
  same      finished plans; partial plans at exactly level k

Checks are the candidate checks each search asked for that were not yet in the shared memo: a search stopped
early may leave checks it shared with another (SLEB and `swm/keep-first`) to that one, so the savings are
upper bounds. A resumed run (`--resume`) does not count the checks it read back from its first process: replay
runs made in one go.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from swm_ray.compute.validation import RowLosses
from swm_ray.methods.auto import STOP_RULES, stop_decision


def _losses(event: dict) -> RowLosses:
    return RowLosses(np.asarray(event["rows"], dtype=np.float64))


def replay(auto: dict, rule: str, z: float, n_remove: int) -> dict:
    """The stops `rule` makes over the recorded rounds, as the race makes them: after each round every search
    still running is measured against its rivals (`auto.stop_rivals`); a stopped search's last partial plan
    stays a rival. Returns {"stopped": {search: where}, "checks": checks asked, "searches": names}."""
    traj = auto["trajectory"]
    searches = sorted(n for n, ev in traj.items() if "@" not in n and any(not e["finished"] for e in ev))
    ends = {n: min((e["round"] for e in ev if e["finished"]), default=math.inf) for n, ev in traj.items()}
    partial: dict[str, tuple[int, RowLosses]] = {}
    finals: dict[str, tuple[RowLosses, int]] = {}
    stopped: dict[str, dict] = {}
    spent: dict[str, int] = {}
    reached: set[int] = set()
    for rnd in sorted({e["round"] for ev in traj.values() for e in ev}):
        now = [(n, e) for n, ev in sorted(traj.items()) for e in ev if e["round"] == rnd and n not in stopped]
        for n, e in now:
            lo = _losses(e)
            if e["finished"]:
                finals[n] = (lo, e["level"])
                if e["checks"] is not None:
                    spent[n] = e["checks"]
            elif "@" not in n:
                partial[n] = (e["level"], lo)
                spent[n] = e["checks"]
        # rankings enter at the levels the running searches reach (a stopped search reaches none)
        reached |= {e["level"] for n, e in now if n in searches and not e["finished"]}
        for n, ev in traj.items():
            for e in ev:
                if "@" in n and e["round"] <= rnd and e["level"] in reached:
                    partial[n] = (e["level"], _losses(e))
        for n in searches:
            if n in stopped or ends[n] <= rnd or n not in partial:
                continue
            level, lo = partial[n]
            where = stop_decision(rule, n, level, lo, n_remove, partial, finals, z)
            if where is not None:
                stopped[n] = where
    return {"stopped": stopped, "checks": sum(spent.values()), "searches": searches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plans", nargs="+", type=Path, help="plan.json of runs with select.auto_stop_margin=1e9")
    ap.add_argument("--z", type=float, default=2.0, help="the stopping margin in standard errors (default 2)")
    ap.add_argument("--rules", default=",".join(STOP_RULES), help=f"comma-separated, of {', '.join(STOP_RULES)}")
    a = ap.parse_args()
    print("| run | chosen (no stopping) | rule | stopped (level, behind, diff ± se) | checks | of no-stop | "
          "chosen survives |")
    print("|---|---|---|---|---|---|---|")
    for p in a.plans:
        plan = json.loads(p.read_text())
        auto = plan["extra"]["auto"]
        if "trajectory" not in auto:
            raise SystemExit(f"{p}: no extra.auto.trajectory (a run of this release with auto_stop_margin=1e9 "
                             "records one)")
        n_remove = len(plan.get("removed_layers") or []) or max(
            (e["level"] for ev in auto["trajectory"].values() for e in ev if e["finished"]), default=0)
        chosen = auto["chosen"].split("+")[0]
        full = replay(auto, "finals", math.inf, n_remove)["checks"]
        for rule in a.rules.split(","):
            out = replay(auto, rule, a.z, n_remove)
            desc = "; ".join(f"{n} at {s['level']} ({s['behind']}, {s['diff']:.3f} ± {s['se']:.3f})"
                             for n, s in sorted(out["stopped"].items())) or "none"
            print(f"| {p.parent.name} | {auto['chosen']} | {rule} | {desc} | {out['checks']} | "
                  f"{out['checks'] / max(full, 1):.2f} | {'yes' if chosen not in out['stopped'] else '**no**'} |")


if __name__ == "__main__":
    main()
