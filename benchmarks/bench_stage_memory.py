"""Peak memory of a whole `swm-ray` command: every process it starts (driver, Ray's workers and actors, their
helpers), sampled together.

    python benchmarks/bench_stage_memory.py -- compress --layers 6 --then-width 0.1 --eval \\
        --set "eval.tasks=[]" --out runs/mem --overwrite
    python benchmarks/bench_stage_memory.py --python /other/checkout/.venv/bin/python -- compress ...

The command runs in a session of its own; every 0.2 s the resident memory (RSS) of every process of that session
is read from /proc. Printed: the peak of their sum, the peak of the largest single process (the driver or an
actor holding a model), what ran at the peak of the sum (the largest processes by name, the last line printed),
and the wall time, as one JSON object. `--python` runs another checkout's interpreter
(its own `swm_ray`), and `--checkout DIR` puts another source tree first on the path of every process it
starts (Ray's workers inherit it), so two versions are measured the same way side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _session_rss(sid: int) -> dict[int, int]:
    """{pid: RSS bytes} of every live process whose session id is `sid`."""
    page = os.sysconf("SC_PAGE_SIZE")
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) != sid:  # field 6 of stat: the session id
                continue
            out[int(d.name)] = int((d / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return out


def _name(pid: int) -> str:
    """A process's short name: Ray's title (`ray::ModelActor.check`), or its command's first words."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    return "driver" if "swm_ray.cli" in cmd else " ".join(Path(w).name for w in cmd.split()[:2])[:60]


def measure(cmd: list[str], period: float = 0.2, checkout: str | None = None) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(checkout).resolve()), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    peak_total = peak_one = 0
    at_peak: dict = {}
    while proc.poll() is None:
        rss = _session_rss(proc.pid)
        if rss:
            total = sum(rss.values())
            if total > peak_total:  # what ran at the peak: the processes that held most, the last line printed
                top = sorted(rss.items(), key=lambda kv: -kv[1])[:4]
                at_peak = {"seconds": round(time.perf_counter() - t0, 1),
                           "last_output": next((ln.strip() for ln in reversed(lines) if ln.strip()), "")[-160:],
                           "processes_mib": [[_name(pid), round(b / 2**20, 1)] for pid, b in top]}
            peak_total = max(peak_total, total)
            peak_one = max(peak_one, max(rss.values()))
        time.sleep(period)
    reader.join(timeout=10)
    tail = "".join(lines)[-3000:]
    return {"command": " ".join(cmd[3:]), "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_total_mib": round(peak_total / 2**20, 1), "peak_process_mib": round(peak_one / 2**20, 1),
            "at_peak": at_peak, "output_tail": tail if proc.returncode else tail[-400:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="the interpreter (and so the checkout) to run")
    ap.add_argument("--checkout", default=None, help="a source tree whose swm_ray every process imports first")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the swm-ray arguments")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    cmd = [a.python, "-c", "from swm_ray.cli import main; main()", *args]
    print(json.dumps(measure(cmd, checkout=a.checkout), indent=1))


if __name__ == "__main__":
    main()
