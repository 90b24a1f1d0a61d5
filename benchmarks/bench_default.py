"""The default (`--method auto`, the race) next to `--method swm` alone and next to the queue it replaced, side by
side in one run, as a user runs them (the CLI, an embedded Ray, one actor on this machine).

    python benchmarks/bench_default.py --layers 2,4,6 --out runs/bench-default.json
    python benchmarks/bench_default.py --model builtin:qwen2.5-0.5b --layers 6 --variants auto,swm
    python benchmarks/bench_default.py --variants before:swm,before:auto,swm,auto --before /path/to/old/checkout

Variants (in this order for every target, so machine noise hits all alike):
- `swm`: `--method swm` (output criterion, best-first, the reference merge);
- `auto`: the default;
- `queue`: every candidate to the end, no stopping, no further rows, no task-style items
  (`select.auto_margin=1e9 select.auto_validation_max=8 select.auto_task_items=0`): the choice of the auto that
  ran its candidates one after the other, on the same held-out rows;
- `before:<variant>`: the same variant from another source tree (`--before DIR`, put first on the path of the
  command and of its Ray workers), e.g. the release whose `auto` ran its candidates one after the other, each
  with its own passes (its plans carry no pass counters).
Per run: wall seconds (the whole command: model load, calibration, search, writing), the plan's counters
(`extra.passes`: reference passes, tokens run through decoder layers and those as forward passes over the
planning rows), the chosen plan and its held-out loss. Prints a markdown table; `--out` keeps every record and
a rerun skips what it already holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "swm": ["--method", "swm"],
    "auto": [],
    "queue": ["--set", "select.auto_margin=1e9", "--set", "select.auto_validation_max=8",
              "--set", "select.auto_task_items=0"],
}


def run(model: str, layers: int, variant: str, folder: Path, extra: list[str], before: str | None) -> dict:
    out = folder / f"{variant.replace(':', '-')}-{layers}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    flags = VARIANTS[variant.split(":")[-1]]
    if variant.startswith("before:"):
        if not before:
            raise SystemExit(f"variant {variant} needs --before DIR (the other source tree)")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [before, env.get("PYTHONPATH")]))
        if variant == "before:auto":
            flags = []
    cmd = [sys.executable, "-c", "from swm_ray.cli import main; main()", "compress", model, "--layers", str(layers),
           "--out", str(out), "--overwrite", *flags, *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=before if variant.startswith("before:")
                         else None)
    secs = time.perf_counter() - t0
    if res.returncode:
        return {"variant": variant, "layers": layers, "error": res.stderr.strip().splitlines()[-1:]}
    plan = json.loads((out / "plan.json").read_text())
    auto = plan["extra"].get("auto") or {}
    chosen = next((c for c in auto.get("candidates", []) if c["candidate"] == auto.get("chosen")), {})
    return {"variant": variant, "layers": layers, "seconds": round(secs, 1),
            "selection_seconds": plan["extra"].get("selection_seconds"), "passes": plan["extra"].get("passes"),
            "windows": plan["windows"], "merge": plan["merge"], "chosen": auto.get("chosen"),
            "decided_by": auto.get("decided_by"), "validation_nll": chosen.get("validation_nll"),
            "validation_rows": chosen.get("validation_rows"),
            "candidates": [{k: c.get(k) for k in ("candidate", "windows", "validation_nll", "stopped")}
                           for c in auto.get("candidates", [])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--layers", default="6", help="comma-separated layer counts")
    ap.add_argument("--variants", default="swm,auto,queue")
    ap.add_argument("--folder", default="runs/bench-default")
    ap.add_argument("--before", default=None, help="another source tree, for the before:<variant> rows")
    ap.add_argument("--out", default=None, help="JSON of every record (a rerun skips what it holds)")
    ap.add_argument("extra", nargs="*", help="more compress arguments, after --")
    a = ap.parse_args()
    done = json.loads(Path(a.out).read_text()) if a.out and Path(a.out).exists() else []
    have = {(r["variant"], r["layers"]) for r in done if "error" not in r}
    for layers in [int(x) for x in a.layers.split(",")]:
        for variant in a.variants.split(","):
            if (variant, layers) in have:
                continue
            rec = {"model": a.model, **run(a.model, layers, variant, Path(a.folder).resolve(), a.extra, a.before)}
            print(json.dumps(rec), flush=True)
            done.append(rec)
            if a.out:
                Path(a.out).write_text(json.dumps(done, indent=1))
    print("\n| layers | variant | seconds | forward passes | checks | chosen | windows | validation NLL |")
    print("|---|---|---|---|---|---|---|---|")
    for r in done:
        if "error" in r:
            print(f"| {r['layers']} | {r['variant']} | error: {r['error']} | | | | | |")
            continue
        p = r["passes"] or {}
        print(f"| {r['layers']} | {r['variant']} | {r['seconds']} | {p.get('forward_passes')} | {p.get('checks')} | "
              f"{r['chosen'] or r['variant']} | {r['windows']} | {r['validation_nll'] or ''} |")


if __name__ == "__main__":
    main()
