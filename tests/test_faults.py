"""Nothing lost when a worker or the driver dies (real Ray, real SIGKILL, no mocks): actor restarts give the
identical matrix, windows and folder; `--resume` continues an interrupted run; no hang when the cluster
cannot place the actors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from swm_ray.config import build_config
from swm_ray.errors import UserError
from swm_ray.io.runstate import SUFFIX
from swm_ray.jobs.analyze import run_analyze
from swm_ray.jobs.compress import run_compress

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """A tiny Llama with 12 layers (more steps for a search to be interrupted in)."""
    d = tmp_path_factory.mktemp("deep")
    model, tok = tiny_model("llama", n_layers=12, seed=3)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.random.default_rng(11).integers(4, 256, size=(192, 24)).tolist()
    path = tmp_path_factory.mktemp("rows") / "rows.parquet"
    pq.write_table(pa.table({"input_ids": rows}), path)
    return path


def _cfg(model, data, out, **flags):
    base = {"model.source": str(model), "data.source": str(data), "data.samples": 192, "data.seq_len": 24,
            "data.batch_size": 4, "out": str(out), "ray.actors": 1, "model.stream": "never", "select.method": "swm"}
    return build_config(flags={**base, **flags})


def _actor_pids() -> set[int]:
    """PIDs of live model-holding actors (Ray titles its worker processes `ray::ModelActor...`) of this test
    process's Ray session only (their raylet runs in its session folder): other Ray runs on the machine are
    left alone."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path() if ray.is_initialized() else None
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                if not cmd.startswith("ray::ModelActor") or (d / "stat").read_text().split()[2] == "Z":
                    continue
                env = dict(v.split("=", 1) for v in (d / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in v)
                raylet = Path("/proc") / env.get("RAY_RAYLET_PID", "-") / "cmdline"
                if session and session not in raylet.read_bytes().decode(errors="replace"):
                    continue
            except OSError:
                continue
            pids.add(int(d.name))
    return pids


def _kill_when(ready, timeout: float = 1800.0) -> dict:
    """A thread that SIGKILLs every model actor once `ready()` holds; reports the pids it killed and the
    actor pids seen afterwards (a restart shows up as a new pid). It watches until the run ends (the test sets
    `stop`), so a slow machine only makes the run take longer; `timeout` guards against a hung run."""
    seen: dict = {"killed": set(), "after": set(), "error": None}

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not seen.get("stop"):
            if ready():
                pids = _actor_pids()
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                seen["killed"] = pids
                while time.monotonic() < deadline and not seen.get("stop"):
                    seen["after"] |= _actor_pids() - pids
                    time.sleep(0.05)
                return
            time.sleep(0.01)
        seen["error"] = ("the run ended before the point to kill at" if seen.get("stop")
                         else "the run never reached the point to kill at")

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    seen["thread"] = t
    return seen


def test_actor_killed_mid_statistics_gives_the_identical_matrix(ray_session, deep_model, many_rows, tmp_path):
    want = run_analyze(_cfg(deep_model, many_rows, tmp_path / "clean"))
    partial = tmp_path / f".killed{SUFFIX}"
    seen = _kill_when(lambda: partial.exists() and any(partial.glob("hsic-*.npy")))
    got = run_analyze(_cfg(deep_model, many_rows, tmp_path / "killed"))
    seen["stop"] = True
    seen["thread"].join()
    assert seen["error"] is None and seen["killed"], "no actor was killed mid-statistics"
    assert seen["after"], "no restarted actor appeared"
    assert got["minibatches"] == want["minibatches"] == 48
    np.testing.assert_array_equal(np.load(tmp_path / "killed" / "similarity.npy"),
                                  np.load(tmp_path / "clean" / "similarity.npy"))
    assert not partial.exists()  # a completed run removes its partial state


def _compensation(folder: Path) -> dict[str, torch.Tensor]:
    """The fitted maps a plan carries (what a restarted actor could get wrong; the weights themselves are copied
    from the same checkpoint whatever happened)."""
    from swm_ray.plan.plan import Plan

    return Plan.load(folder / "plan.json").tensors


def _clean_and_killed(model, rows, tmp_path: Path, flags: dict, checks: int) -> tuple[dict, dict]:
    """One clean run, then the same run with an actor killed once `checks` candidate checks are memoised."""
    want = run_compress(_cfg(model, rows, tmp_path / "clean", **flags))
    memo = tmp_path / f".killed{SUFFIX}" / "memo.json"
    seen = _kill_when(lambda: memo.exists() and _scores(memo) >= checks)
    got = run_compress(_cfg(model, rows, tmp_path / "killed", **flags))
    seen["stop"] = True
    seen["thread"].join()
    assert seen["error"] is None and seen["killed"] and seen["after"]
    return want, got


def test_actor_killed_mid_search_gives_the_identical_windows_and_fits(ray_session, deep_model, many_rows, tmp_path):
    flags = {"select.layers": 5, "merge.compensate": "lstsq", "merge.fit_samples": 192}
    want, got = _clean_and_killed(deep_model, many_rows, tmp_path, flags, checks=11)
    assert got["plan"]["windows"] == want["plan"]["windows"]
    assert got["plan"]["similarities"] == want["plan"]["similarities"]
    a, b = _compensation(tmp_path / "clean"), _compensation(tmp_path / "killed")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    errors = [(w["error_before"], w["error_after"]) for w in got["plan"]["compensation"]["windows"]]
    assert errors == [(w["error_before"], w["error_after"]) for w in want["plan"]["compensation"]["windows"]]


def _race(plan: dict) -> dict:
    """What auto decided and measured, without its timings and counters."""
    rec = dict(plan["extra"]["auto"])
    for k in ("seconds", "passes"):
        rec.pop(k)
    rec["candidates"] = [{k: v for k, v in c.items() if k not in ("checks", "checks_shared")}
                         for c in rec["candidates"]]
    rec["trajectory"] = {n: [{k: v for k, v in e.items() if k != "checks"} for e in ev]
                         for n, ev in rec["trajectory"].items()}
    return rec


AUTO = {"select.method": "auto", "select.layers": 4, "data.samples": 64,
        "select.auto_candidates": ["swm", "swm/keep-first", "sleb", "shortgpt", "replaceme"]}


def test_actor_killed_inside_a_racing_candidate_gives_the_identical_choice(ray_session, deep_model, many_rows,
                                                                            tmp_path):
    """The default method: an actor killed while the race is inside its best-first searches; the restarted actor
    rebuilds its reference pass and the race ends with the same held-out losses, stops and choice."""
    want, got = _clean_and_killed(deep_model, many_rows, tmp_path, AUTO, checks=25)
    assert got["plan"]["windows"] == want["plan"]["windows"] and _race(got["plan"]) == _race(want["plan"])


def _scores(memo) -> int:
    """Candidate checks saved so far in a run's memo.json."""
    return len(json.loads(memo.read_text())["checks"])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from swm_ray.cli import main; main()", *args]


def _kill_driver_then_resume(args: list[str], out: Path, tmp_path: Path, checks: int) -> tuple[dict, dict]:
    """Run `swm-ray compress ARGS` fresh, then again at `out` killed (driver and its embedded Ray) once `checks`
    candidate checks are saved, then rerun without and with --resume; returns (fresh plan, resumed plan)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    fresh = subprocess.run(_cli(*args, "--out", str(tmp_path / "fresh")), env=env, capture_output=True, text=True,
                           timeout=900)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    memo = out.parent / f".{out.name}{SUFFIX}" / "memo.json"
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if memo.exists() and _scores(memo) >= checks:
                break
            time.sleep(0.01)
    finally:
        alive = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, as a lost machine would
        proc.wait()
    assert alive, "the run finished before it could be interrupted"
    assert not out.exists()
    again = subprocess.run(_cli(*args, "--out", str(out)), env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and "--resume" in again.stderr
    resumed = subprocess.run(_cli(*args, "--out", str(out), "--resume"), env=env, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (out.parent / f".{out.name}{SUFFIX}").exists()
    return (json.loads((tmp_path / "fresh" / "plan.json").read_text()),
            json.loads((out / "plan.json").read_text()))


def test_driver_killed_then_resume(deep_model, many_rows, tmp_path):
    """The driver (and its embedded Ray) dies after two committed steps; the same command with --resume gives the
    same plan, scores and fitted maps with fewer candidate checks than a fresh run."""
    args = ["compress", str(deep_model), "--data", str(many_rows), "--samples", "192", "--seq-len", "24",
            "--layers", "5", "--actors", "1", "--no-stream-layers", "--method", "swm", "--compensate", "lstsq",
            "--set", "merge.fit_samples=192"]
    plan_fresh, plan = _kill_driver_then_resume(args, tmp_path / "run", tmp_path, 21)
    assert plan["windows"] == plan_fresh["windows"] and plan["similarities"] == plan_fresh["similarities"]
    assert 0 < plan["extra"]["candidate_evaluations"] < plan_fresh["extra"]["candidate_evaluations"]
    assert plan["extra"]["resumed_scores"] >= 21
    a, b = _compensation(tmp_path / "fresh"), _compensation(tmp_path / "run")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_driver_killed_in_the_race_then_resume(deep_model, many_rows, tmp_path):
    """The default method, interrupted once its one-shot candidates have finished and its searches have made
    checks: --resume replays the race from the saved checks to the same losses, stops and choice."""
    args = ["compress", str(deep_model), "--data", str(many_rows), "--samples", "64", "--seq-len", "24",
            "--layers", "4", "--actors", "1", "--no-stream-layers",
            "--set", "select.auto_candidates=[swm,swm/keep-first,sleb,shortgpt,replaceme]"]
    plan_fresh, plan = _kill_driver_then_resume(args, tmp_path / "run", tmp_path, 20)
    assert plan["windows"] == plan_fresh["windows"] and _race(plan) == _race(plan_fresh)
    assert plan["extra"]["resumed_scores"] >= 20
    assert plan["extra"]["candidate_evaluations"] < plan_fresh["extra"]["candidate_evaluations"]


def test_resume_without_partial_state_is_a_one_line_error(tiny_llama_dir, tokens_parquet, tmp_path):
    cfg = build_config(flags={"model.source": str(tiny_llama_dir), "data.source": str(tokens_parquet),
                              "data.samples": 16, "data.seq_len": 16, "data.batch_size": 4, "select.method": "swm",
                              "select.layers": 1, "out": str(tmp_path / "o"), "resume": True})
    with pytest.raises(UserError, match="--resume: no interrupted run") as e:
        run_compress(cfg)
    assert "\n" not in str(e.value)
    res = subprocess.run(_cli("analyze", str(tiny_llama_dir), "--data", str(tokens_parquet), "--samples", "16",
                              "--seq-len", "16", "--batch-size", "4", "--out", str(tmp_path / "a"), "--resume"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("error: --resume: no interrupted run")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


PLACEMENT = """
import sys, time, ray
from swm_ray.config import build_config
from swm_ray.errors import UserError
from swm_ray.jobs.compress import run_compress
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
cfg = build_config(flags={"model.source": sys.argv[1], "data.source": sys.argv[2], "data.samples": 16,
    "data.seq_len": 16, "data.batch_size": 4, "select.method": "swm", "select.layers": 1, "out": sys.argv[3],
    "ray.actors": 2,
    "ray.gpus_per_actor": 2, "ray.placement_timeout_s": 3})
t0 = time.monotonic()
try:
    run_compress(cfg)
except UserError as e:
    print(f"ERROR after {time.monotonic() - t0:.1f} s: {e} (exit {e.exit_code})")
"""


def test_more_gpus_than_exist_ends_within_the_timeout(tiny_llama_dir, tokens_parquet, tmp_path):
    res = subprocess.run([sys.executable, "-c", PLACEMENT, str(tiny_llama_dir), str(tokens_parquet),
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("ERROR after")), None)
    assert line is not None, res.stderr[-2000:]
    secs = float(line.split()[2])
    assert secs < 60  # the placement timeout (3 s) plus start-up, not a hang
    assert "could not place 2 actors" in line and "'GPU': 2" in line and "GPU: 2" in line and "(exit 1)" in line
    assert not (tmp_path / "o").exists()
